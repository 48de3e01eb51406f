import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.rewards import nsc_reward
from trl_intrinsic.testing import tiny_causal_lm

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a circle"]


def _dataset(n: int = 4) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]}
    )


def _config(tmp_path, config_cls=IntrinsicGRPOConfig, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=0.0,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


class _Recorder:
    """A reward function that keeps what the trainer passes to it."""

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append({"prompts": prompts, "completion_ids": completion_ids, **kwargs})
        return [0.0] * len(prompts)


def _reference_self_certainty(model, tokenizer, prompt, completion_ids) -> torch.Tensor:
    """Per-token KL(U ‖ p) in float64 from one teacher-forced forward over prompt + completion."""
    prompt_ids = tokenizer.apply_chat_template(
        [prompt], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logits = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]
    vocab = logits.shape[-1]
    return -math.log(vocab) - torch.log_softmax(logits, dim=-1).mean(dim=-1)


@pytest.mark.parametrize("use_peft", [False, True])
def test_reward_kwargs_match_teacher_forced_recomputation(tmp_path, use_peft):
    model, tokenizer = tiny_causal_lm(seed=0)
    recorder = _Recorder()
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_peft else None
    # Temperature ≠ 1 and top-k: the statistic must still come from the raw logits.
    args = _config(tmp_path, temperature=0.7, top_k=5)
    trainer = IntrinsicGRPOTrainer(
        model,
        [nsc_reward, recorder],
        args=args,
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "learning rate 0 must leave the weights unchanged"
    )

    reference_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    assert len(recorder.calls) == 2
    checked = 0
    for call in recorder.calls:
        assert len(call["self_certainty"]) == len(call["prompts"]) == 4
        for prompt, ids, mean, per_token in zip(
            call["prompts"], call["completion_ids"], call["self_certainty"], call["self_certainty_per_token"]
        ):
            assert len(per_token) == len(ids) > 0
            expected = _reference_self_certainty(reference_model, tokenizer, prompt, ids)
            torch.testing.assert_close(
                torch.tensor(per_token, dtype=torch.float64), expected, rtol=1e-4, atol=1e-5
            )
            assert mean == pytest.approx(expected.mean().item(), rel=1e-4, abs=1e-6)
            checked += 1
    assert checked == 8

    logs = [entry for entry in trainer.state.log_history if "self_certainty/mean" in entry]
    assert len(logs) == 2
    for entry, call in zip(logs, recorder.calls):
        assert entry["self_certainty/mean"] == pytest.approx(sum(call["self_certainty"]) / 4, rel=1e-5)
        assert entry["rewards/nsc_reward/mean"] == pytest.approx(-entry["self_certainty/mean"], rel=1e-5)


def test_no_extra_forward_pass(tmp_path):
    """The statistic is caught from generation: as many model forwards as TRL's own GRPOTrainer makes."""

    def count_forwards(trainer_cls, config_cls):
        model, tokenizer = tiny_causal_lm(seed=0)
        recorder = _Recorder()
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        trainer = trainer_cls(
            model,
            [recorder],
            args=_config(tmp_path / config_cls.__name__, config_cls=config_cls, learning_rate=1e-3),
            train_dataset=_dataset(),
            processing_class=tokenizer,
        )
        trainer.train()
        return len(calls), [c["completion_ids"] for c in recorder.calls], recorder.calls

    ours, our_completions, our_calls = count_forwards(IntrinsicGRPOTrainer, IntrinsicGRPOConfig)
    trl_count, trl_completions, _ = count_forwards(GRPOTrainer, GRPOConfig)
    assert our_completions == trl_completions  # same seed, same rollouts
    assert ours == trl_count > 0
    assert "self_certainty" in our_calls[0]


def test_completions_table_has_self_certainty(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    trainer = IntrinsicGRPOTrainer(
        model,
        [nsc_reward],
        args=_config(tmp_path, max_steps=1, log_completions=True),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = trainer._logs["extra"]["self_certainty"]
    assert len(logged) == 4
    assert [-r for r in trainer._logs["rewards"]["nsc_reward"]] == pytest.approx(logged, rel=1e-6)


def test_invalid_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        _config(tmp_path, num_generations=1, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="self_certainty_chunk_size"):
        _config(tmp_path, self_certainty_chunk_size=0)
    model, tokenizer = tiny_causal_lm(seed=0)
    with pytest.raises(ValueError, match="tools"):
        IntrinsicGRPOTrainer(
            model, [nsc_reward], args=_config(tmp_path), processing_class=tokenizer, tools=[lambda x: x]
        )
    with pytest.raises(TypeError, match="IntrinsicGRPOConfig"):
        IntrinsicGRPOTrainer(model, [nsc_reward], args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True))


def _broken(kind):
    def reward(prompts, completions, **kwargs):
        if kind == "raises":
            raise KeyError("score")
        if kind == "inf":
            return [math.inf] * len(prompts)
        if kind == "short":
            return [0.0]
        return [None if i == 0 else float(i) for i in range(len(prompts))]  # "some_none"

    reward.__name__ = f"broken_{kind}"
    return reward


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("raises", RuntimeError, "'broken_raises' raised KeyError at global step 0"),
        ("inf", ValueError, "'broken_inf' returned an infinite reward at global step 0"),
        ("short", ValueError, "'broken_short' returned 1 rewards"),
    ],
)
def test_a_broken_reward_stops_with_its_name(tmp_path, kind, error, message):
    model, tokenizer = tiny_causal_lm()
    trainer = IntrinsicGRPOTrainer(
        model, [nsc_reward, _broken(kind)], args=_config(tmp_path, max_steps=1), train_dataset=_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    with pytest.raises(error, match=message):
        trainer.train()


def test_rewards_of_none_are_skipped_samples(tmp_path):
    model, tokenizer = tiny_causal_lm()
    trainer = IntrinsicGRPOTrainer(
        model, [_broken("some_none")], args=_config(tmp_path, max_steps=1), train_dataset=_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    (logs,) = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["rewards/broken_some_none/mean"])
