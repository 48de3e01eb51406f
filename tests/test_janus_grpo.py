from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from trl import ModelConfig, TrlParser

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.autoregressive import janus_completion_logps, position_ids_from_mask
from trl_intrinsic.autoregressive.janus import janus_rollout, restore_janus_generation_config
from trl_intrinsic.autoregressive.self_certainty import self_certainty
from trl_intrinsic.rewards import nsc_reward
from trl_intrinsic.seeding import derived_generator
from trl_intrinsic.testing import tiny_janus
from trl_intrinsic.toyworld.evaluation import evaluate_janus

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "iris_janus_pro_1b.yaml"


def _dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["a red circle", "two blue squares"], "tag": ["single", "counting"]})


def _config(tmp_path, **overrides) -> IntrinsicGRPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=5,
        max_steps=1,
        learning_rate=1e-2,
        beta=0.01,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    kwargs.update(overrides)
    return IntrinsicGRPOConfig(**kwargs)


class _Recorder:
    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append(
            {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs}
        )
        return [float(i) for i in range(len(prompts))]


def _trainer(tmp_path, recorder=None, **overrides):
    model, processor = tiny_janus(seed=0)
    funcs = [nsc_reward] + ([recorder] if recorder is not None else [])
    return IntrinsicGRPOTrainer(
        model,
        funcs,
        args=_config(tmp_path, **overrides),
        train_dataset=_dataset(),
        processing_class=processor,
    )


def _batch(trainer):
    return [dict(x) for x in trainer.train_dataset.select([0, 0, 1, 1])]


def test_rollout_rewards_and_self_certainty_recomputation(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder)
    out = trainer._generate_and_score_completions(_batch(trainer))
    (call,) = recorder.calls
    assert call["prompts"] == ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    assert call["tag"] == ["single", "single", "counting", "counting"]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in call["completions"])
    assert [len(ids) for ids in call["completion_ids"]] == [16] * 4
    assert call["trainer_state"] is trainer.state
    assert all(isinstance(c, str) for c in call["cot"])

    # Recompute with one teacher-forced conditional forward over prompt + CoT + BOI + image tokens.
    janus = trainer._janus()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    is_image = out["mm_token_type_ids"].bool()
    with torch.no_grad():
        embeds = torch.where(
            is_image[..., None],
            janus.prepare_embeddings_for_image_generation(ids.masked_fill(~is_image, 0)),
            janus.get_input_embeddings()(ids.masked_fill(is_image, 0)),
        )
        hidden = janus.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).last_hidden_state
    prompt_len = out["prompt_ids"].shape[1]
    trained = (out["completion_mask"] * out["tool_mask"]).bool()
    for i in range(4):
        positions = (
            prompt_len - 1 + torch.nonzero(trained[i]).squeeze(-1)
        )  # hidden state predicting each token
        image_pos = positions[is_image[i, positions + 1]]
        text_pos = positions[~is_image[i, positions + 1]]
        assert len(image_pos) == 16 and len(text_pos) >= 1  # both parts are trained
        sc_image = self_certainty(janus.model.generation_head(hidden[i, image_pos]))
        sc_text = self_certainty(janus.lm_head(hidden[i, text_pos]))
        assert call["self_certainty_image"][i] == pytest.approx(sc_image.mean().item(), rel=1e-4, abs=1e-7)
        assert call["self_certainty_text"][i] == pytest.approx(sc_text.mean().item(), rel=1e-4, abs=1e-7)
        both = torch.cat([sc_text, sc_image]).mean().item()
        assert call["self_certainty"][i] == pytest.approx(both, rel=1e-4, abs=1e-7)
        assert call["cot"][i] == trainer._tokenizer.decode(ids[i, text_pos + 1], skip_special_tokens=True)

    # The rollout's tokens are scored by the training forward (finite log-probs, ratio 1 on the first step).
    with torch.no_grad():
        logps, _ = janus_completion_logps(
            janus, ids, mask, out["mm_token_type_ids"], out["completion_ids"].shape[1]
        )
    assert torch.isfinite(logps[trained]).all()
    # NSC and the recorder both scored; group advantages of the recorder's 0,1,2,3 are ±1 within each pair.
    assert out["advantages"].shape == (4,)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_lora_training_changes_only_adapter(tmp_path):
    trainer = _trainer(tmp_path)
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("language_model" in k for k in changed)
    assert not any(k for k in before if "lora_" in k and "vision_model" in k)


def test_full_finetuning_reaches_both_heads_and_keeps_frozen_parts(tmp_path):
    trainer = _trainer(tmp_path, janus_lora=False, beta=0.0)
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.generation_head.") for k in changed), "image tokens must reach the loss"
    assert any(k.startswith("model.language_model.") for k in changed)
    # lm_head is tied to the input embeddings: text tokens reach the loss through it.
    assert "model.language_model.embed_tokens.weight" in changed
    for frozen in ("model.vision_model.", "model.aligner.", "model.vqmodel.", "model.generation_aligner."):
        assert not any(k.startswith(frozen) for k in changed), frozen


def test_use_cot_false_generates_no_cot(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder, use_cot=False)
    out = trainer._generate_and_score_completions(_batch(trainer))
    (call,) = recorder.calls
    assert call["cot"] == [""] * 4
    assert out["completion_ids"].shape[1] == 17  # BOI + 16 image tokens
    assert int(out["tool_mask"].sum()) == 4 * 16
    assert call["self_certainty"] == pytest.approx(call["self_certainty_image"])


def test_adapter_save_and_reload_round_trip(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "README.md").exists()
    base, processor = tiny_janus(seed=0)
    restore_janus_generation_config(base, processor)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 64, (2, 24))
    mask = torch.ones_like(ids)
    image = torch.zeros_like(ids)
    image[:, 8:] = 1
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        expected, _ = janus_completion_logps(trained.get_base_model(), ids, mask, image, 20)
        got, _ = janus_completion_logps(reloaded.get_base_model(), ids, mask, image, 20)
        untrained, _ = janus_completion_logps(tiny_janus(seed=0)[0], ids, mask, image, 20)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(untrained, expected)


def test_invalid_janus_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="cfg_weight"):
        _config(tmp_path, cfg_weight=0.5)
    with pytest.raises(ValueError, match="num_generations"):
        _config(tmp_path, num_generations=1, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match="image_token_num"):
        _trainer(tmp_path, image_token_num=576)
    with pytest.raises(ValueError, match="image_size"):
        _trainer(tmp_path, image_size=384)
    model, processor = tiny_janus(seed=0)
    model.model.generation_head = None
    with pytest.raises(ValueError, match="generation_head"):
        IntrinsicGRPOTrainer(model, [nsc_reward], args=_config(tmp_path), processing_class=processor)


def test_paper_recipe_config_parses():
    config, model_config = TrlParser((IntrinsicGRPOConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(CONFIG), "--use_cpu", "true", "--bf16", "false"]
    )
    assert model_config.model_name_or_path == "deepseek-community/Janus-Pro-1B"
    assert (config.num_generations, config.cfg_weight, config.learning_rate, config.beta) == (
        8,
        5.0,
        1e-6,
        0.01,
    )
    assert (config.max_completion_length, config.image_token_num, config.image_size) == (1024, 576, 384)
    assert config.use_cot and config.janus_lora


class _HeadLogits:
    """Forward hook keeping the output of an output head (text or generation) at every call."""

    def __init__(self, module: torch.nn.Module):
        self.outputs: list[torch.Tensor] = []
        self._handle = module.register_forward_hook(lambda _m, _a, out: self.outputs.append(out.detach()))

    def remove(self) -> None:
        self._handle.remove()


def test_training_forward_reproduces_rollout_logps(tmp_path):
    """The policy log-prob of a token (raw conditional logits, temperature 1) is the same in the rollout's
    cached loops and in the teacher-forced training forward, for CoT and image tokens. Guidance and the
    sampling temperatures only shape the sampler, not this quantity."""
    trainer = _trainer(tmp_path, beta=0.0, temperature=0.7, image_temperature=0.8, cfg_weight=5.0)
    janus = trainer._janus()
    text_head, image_head = _HeadLogits(janus.lm_head), _HeadLogits(janus.model.generation_head)
    try:
        out = trainer._generate_and_score_completions(_batch(trainer))
    finally:
        text_head.remove()
        image_head.remove()
    # beta = 0 and one step per generation: the heads ran only inside the two sampling loops.
    assert "old_per_token_logps" not in out and "ref_per_token_logps" not in out
    assert len(image_head.outputs) == 16 and all(
        o.shape == (8, 64) for o in image_head.outputs
    )  # [cond; uncond]
    assert 1 <= len(text_head.outputs) <= 5

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    width = out["completion_ids"].shape[1]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, width, mm_token_type_ids=out["mm_token_type_ids"]
        )
    is_image = out["mm_token_type_ids"][:, -width:].bool()
    trained = (out["completion_mask"] * out["tool_mask"]).bool()
    checked_text = 0
    for i in range(4):
        text_slots = torch.nonzero(trained[i] & ~is_image[i]).squeeze(-1)
        image_slots = torch.nonzero(is_image[i]).squeeze(-1)
        assert len(image_slots) == 16 and bool(trained[i, image_slots].all())
        for step, slot in enumerate(text_slots.tolist()):  # CoT token `step` was sampled at loop step `step`
            token = out["completion_ids"][i, slot]
            rollout = torch.log_softmax(text_head.outputs[step][i].double(), -1)[token]
            assert logps[i, slot].item() == pytest.approx(rollout.item(), abs=1e-5)
            checked_text += 1
        for step, slot in enumerate(image_slots.tolist()):
            token = out["completion_ids"][i, slot]
            conditional = torch.log_softmax(image_head.outputs[step][i].double(), -1)[token]
            assert logps[i, slot].item() == pytest.approx(conditional.item(), abs=1e-5)
            # The guided, tempered sampling distribution is a different quantity: make sure the test can tell.
            cond, uncond = image_head.outputs[step][i], image_head.outputs[step][i + 4]
            guided = torch.log_softmax((uncond + 5.0 * (cond - uncond)).double() / 0.8, -1)[token]
            assert abs(guided.item() - conditional.item()) > 1e-3
    assert checked_text >= 4


class _RatioRecorder(IntrinsicGRPOTrainer):
    """Keeps, for every loss computation, the training-time log-probs and the old log-probs TRL compares."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict[str, torch.Tensor]] = []

    def _get_per_token_logps_and_entropies(self, model, input_ids, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, *args, **kwargs)
        if torch.is_grad_enabled() and kwargs.get("compute_entropy"):  # the call made by `_compute_loss`
            self.steps[-1]["logps"] = out[0].detach()
        return out

    def _compute_loss(self, model, inputs):
        self.steps.append(
            {
                "old": inputs["old_per_token_logps"],
                "mask": (inputs["completion_mask"] * inputs["tool_mask"]).bool(),
                "image": inputs["mm_token_type_ids"][:, -inputs["completion_ids"].shape[1] :].bool(),
            }
        )
        return super()._compute_loss(model, inputs)


def test_importance_ratio_is_one_before_the_first_update(tmp_path):
    """Two GRPO iterations per generation: TRL stores the rollout's log-probs (computed by the trainer's
    forward at sampling time) and divides by them. On the first iteration the ratio is 1 on CoT and image
    tokens and nothing is clipped; on the second, after one update, it moves (the old log-probs are used)."""
    model, processor = tiny_janus(seed=0)
    trainer = _RatioRecorder(
        model,
        [nsc_reward],
        args=_config(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.05, epsilon=1e-4),
        train_dataset=_dataset(),
        processing_class=processor,
    )
    trainer.train()
    assert len(trainer.steps) == 2
    first, second = trainer.steps
    for step in trainer.steps:
        assert bool((step["mask"] & step["image"]).any()) and bool((step["mask"] & ~step["image"]).any())
    ratio = torch.exp(first["logps"] - first["old"])[first["mask"]]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    moved = torch.exp(second["logps"] - second["old"])[second["mask"]]
    assert (moved - 1).abs().max() > 1e-3
    clip_logs = [
        e["clip_ratio/region_mean"] for e in trainer.state.log_history if "clip_ratio/region_mean" in e
    ]
    assert clip_logs[0] == 0.0 and clip_logs[1] > 0.0  # ε = 1e-4: the moved ratios are clipped


def test_rollouts_are_unaffected_by_gradient_checkpointing(tmp_path):
    """`Trainer.train` turns gradient checkpointing on, and in training mode a checkpointed Llama drops the KV
    cache the sampling loops rely on. Rollouts are sampled in eval mode, so they are the same either way, and
    the model is back in training mode afterwards."""
    trainer = _trainer(tmp_path, gradient_checkpointing=True, max_completion_length=8)
    janus = trainer._janus()
    trainer.model.train()
    janus.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with_checkpointing = trainer._generate_and_score_completions(_batch(trainer))
    assert trainer.model.training and janus.training
    janus.gradient_checkpointing_disable()
    without = trainer._generate_and_score_completions(_batch(trainer))
    assert torch.equal(with_checkpointing["completion_ids"], without["completion_ids"])
    assert torch.equal(with_checkpointing["advantages"], without["advantages"])


def test_evaluation_samples_the_same_rollouts_whatever_the_training_step(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder, per_device_eval_batch_size=2)
    eval_dataset = Dataset.from_dict({"prompt": ["a red circle"] * 2, "tag": ["single"] * 2})  # two batches
    first = trainer.evaluate(eval_dataset)
    trainer.state.global_step = 7  # the model is unchanged: a later evaluation must draw the same rollouts
    second = trainer.evaluate(eval_dataset)
    assert first["eval_rewards/nsc_reward/mean"] == pytest.approx(
        second["eval_rewards/nsc_reward/mean"], abs=1e-6
    )
    calls = [c["completion_ids"] for c in recorder.calls]
    half = len(calls) // 2
    assert half >= 2 and calls[:half] == calls[half:]
    assert calls[0] != calls[1], "two batches of one evaluation draw different rollouts"


def test_trainer_and_toy_evaluation_sample_the_same_rollout(tmp_path):
    """The trainer's rollout is `janus_rollout`, the one `evaluate_janus` samples with: from the same random
    stream both draw the same CoT and image tokens. The trainer derives its stream from (seed, "janus", mode,
    micro-step, process)."""
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder, cfg_weight=3.0, image_temperature=0.9)
    janus, processor = trainer._janus(), trainer.processing_class
    sampling = dict(cfg_weight=3.0, image_temperature=0.9, temperature=1.0, max_cot_tokens=5)
    scores = evaluate_janus(
        janus, processor, n_per_tag=1, seed=11, batch_size=4, return_samples=True, **sampling
    )
    samples = scores["samples"]
    inputs = [{"prompt": m["prompt"], "tag": m["tag"]} for m in samples["metadata"][:4]]

    trainer._rollout_generator = lambda mode: torch.Generator().manual_seed(11)
    trainer._generate_and_score_completions(inputs)
    (call,) = recorder.calls
    assert call["cot"] == samples["cot"][:4]
    for trained, evaluated in zip(call["completions"], samples["images"][:4], strict=True):
        assert np.array_equal(np.asarray(trained), np.asarray(evaluated))

    del trainer._rollout_generator  # the trainer's own stream: derived from the seed and the micro-step
    recorder.calls.clear()
    trainer._generate_and_score_completions(inputs)
    rollout = janus_rollout(
        janus,
        processor,
        [x["prompt"] for x in inputs],
        max_cot_tokens=5,
        cfg_weight=3.0,
        image_temperature=0.9,
        generator=derived_generator(trainer.args.seed, "janus", "train", trainer._step, 0),
    )
    assert recorder.calls[0]["completion_ids"] == rollout.image.ids.tolist()
    assert recorder.calls[0]["cot"] == rollout.cot_text
