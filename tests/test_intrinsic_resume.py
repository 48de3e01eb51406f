"""Resuming IntrinsicGRPOTrainer from ``checkpoint-N`` continues exactly where the run stopped (same sampled
completions, adapter weights and optimizer state as an uninterrupted run), checkpoints hold no pickled training
arguments, and a run killed while saving leaves the previous checkpoint usable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOTrainer

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.testing import tiny_causal_lm, tiny_janus
from trl_intrinsic.trainers.common import last_complete_checkpoint

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from intrinsic_train_killed_in_save import make_trainer as make_killed_run_trainer

SCRIPTS = Path(__file__).parent / "scripts"

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


class NSCRecorder:
    """The NSC reward (``-self_certainty``), recording the step, prompts and sampled tokens of every call."""

    __name__ = "nsc"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, trainer_state, self_certainty, **kwargs):
        self.calls.append(
            {
                "step": trainer_state.global_step,
                "prompts": [str(p) for p in prompts],
                "completion_ids": [list(ids) for ids in completion_ids],
                "cot": kwargs.get("cot"),
            }
        )
        return [-s for s in self_certainty]


class StopAt(TrainerCallback):
    """Stop training after ``step`` optimizer steps, keeping the schedule of the full run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on two busy cores: one intra-op thread is many times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(kind, output_dir, recorder, max_steps, callbacks=None, peft=True, **overrides):
    values = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", seed=1, disable_tqdm=True,
        per_device_train_batch_size=2, num_generations=2, steps_per_generation=2, num_iterations=1,
        max_completion_length=6, learning_rate=1e-2, beta=0.01, max_steps=max_steps, logging_steps=1,
        save_strategy="steps", save_steps=3, lr_scheduler_type="linear", gradient_checkpointing=False,
    )  # fmt: skip
    values.update(overrides)
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    if kind == "janus":  # IRIS on a tiny Janus: CoT + 16 image tokens, the default language-model LoRA
        model, processor = tiny_janus(seed=0)
        values["max_completion_length"] = 4
        return IntrinsicGRPOTrainer(
            model, [recorder], args=IntrinsicGRPOConfig(**values), train_dataset=dataset,
            processing_class=processor, callbacks=callbacks,
        )  # fmt: skip
    model, tokenizer = tiny_causal_lm(seed=0)
    return IntrinsicGRPOTrainer(
        model, [recorder], args=IntrinsicGRPOConfig(**values), train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        if peft else None,
        callbacks=callbacks,
    )  # fmt: skip


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        # 2 prompts x 2 completions sampled once for 2 micro-steps; an epoch (4 prompts) is 4 steps. The run
        # stops at step 5, in epoch 1 between two generations (4 and 6), and the resumed run crosses the epoch
        # boundary of step 8.
        ("text", {}),
        # one prompt per generation, trained twice (old log-probs are buffered too)
        ("text", {"steps_per_generation": 1, "num_iterations": 2}),
        ("janus", {}),
    ],
    ids=["text-steps_per_generation", "text-num_iterations", "janus"],
)
def test_resume_mid_generation_reproduces_the_uninterrupted_run(tmp_path, kind, overrides):
    full_recorder = NSCRecorder()
    full = _trainer(kind, tmp_path / "full", full_recorder, max_steps=10, **overrides)
    full.train()
    assert [call["step"] for call in full_recorder.calls] == [0, 2, 4, 6, 8]

    first = _trainer(
        kind,
        tmp_path / "resumed",
        NSCRecorder(),
        max_steps=10,
        callbacks=[StopAt(5)],
        save_steps=5,
        **overrides,
    )
    first.train()
    assert first.state.global_step == 5
    checkpoint = tmp_path / "resumed" / "checkpoint-5"
    # step 5 trains on rollouts sampled at step 4: each process keeps them in the checkpoint
    assert (checkpoint / "rollout_buffer_0.safetensors").is_file()

    resumed_recorder = NSCRecorder()
    resumed = _trainer(kind, tmp_path / "resumed", resumed_recorder, max_steps=10, save_steps=5, **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 10

    # no re-sampling at the resume point; the next rollouts have the same prompts (sampler position, in
    # epoch 1 and across the epoch boundary) and the same sampled tokens (RNG streams) as the uninterrupted run
    assert [call["step"] for call in resumed_recorder.calls] == [6, 8]
    for expected, got in zip(full_recorder.calls[3:], resumed_recorder.calls, strict=True):
        assert got["prompts"] == expected["prompts"]
        assert got["completion_ids"] == expected["completion_ids"]
        assert got["cot"] == expected["cot"]
    if not overrides:  # epochs 0 and 1 differ in order: a sampler replaying epoch 0 would be caught
        assert full_recorder.calls[3]["prompts"] != full_recorder.calls[1]["prompts"]

    # the same adapter weights, optimizer moments and learning rate
    full_weights, resumed_weights = _lora(full), _lora(resumed)
    assert full_weights and any(v.abs().max() > 0 for k, v in full_weights.items() if "lora_B" in k)
    torch.testing.assert_close(resumed_weights, full_weights, rtol=1e-5, atol=1e-7)
    full_state = full.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert full_state.keys() == resumed_state.keys() and full_state
    for key in full_state:
        assert int(resumed_state[key]["step"]) == int(full_state[key]["step"]) == 10
        torch.testing.assert_close(
            resumed_state[key]["exp_avg"], full_state[key]["exp_avg"], rtol=1e-5, atol=1e-8
        )
        torch.testing.assert_close(
            resumed_state[key]["exp_avg_sq"], full_state[key]["exp_avg_sq"], rtol=1e-5, atol=1e-10
        )
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    full_losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed_losses == pytest.approx(full_losses, rel=1e-4, abs=1e-7)


def test_trl_grpo_trainer_resamples_at_a_mid_generation_resume(tmp_path):
    """What the buffer fixes: TRL's GRPOTrainer forgets the rollouts of checkpoint-3, samples again at step 3
    with the updated policy and shifts every later generation by one step."""

    def run(output_dir, max_steps, callbacks=None, resume=None):
        recorder = NSCRecorder()
        trainer = _trainer("text", output_dir, recorder, max_steps=max_steps, callbacks=callbacks)
        plain = GRPOTrainer(
            trainer.model, [recorder], args=trainer.args, train_dataset=trainer.train_dataset,
            processing_class=trainer.processing_class, callbacks=callbacks,
        )  # fmt: skip
        # GRPOTrainer does not compute self-certainty: give the recorder a constant one
        plain.reward_funcs = [lambda **kw: recorder(**kw, self_certainty=[0.0] * len(kw["prompts"]))]
        plain.reward_func_names = ["nsc"]
        plain.train(resume_from_checkpoint=resume)
        return recorder

    run(tmp_path, max_steps=6, callbacks=[StopAt(3)])
    resumed = run(tmp_path, max_steps=6, resume=str(tmp_path / "checkpoint-3"))
    assert [call["step"] for call in resumed.calls] == [3, 5]


def test_checkpoints_and_saved_models_hold_no_pickled_arguments(tmp_path):
    recorder = NSCRecorder()
    trainer = _trainer("text", tmp_path / "lora", recorder, max_steps=1, save_steps=1, cfg_weight=3.0)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    for folder in (tmp_path / "lora" / "checkpoint-1", tmp_path / "adapter"):
        names = set(os.listdir(folder))
        assert "training_args.bin" not in names
        assert "adapter_model.safetensors" in names
        saved = json.loads((folder / "training_args.json").read_text())
        assert (saved["cfg_weight"], saved["steps_per_generation"], saved["seed"]) == (3.0, 2, 1)
    # Trainer's own state files are the only torch pickles left, and only in the checkpoint
    checkpoint_pickles = {
        n for n in os.listdir(tmp_path / "lora" / "checkpoint-1") if n.endswith((".bin", ".pt", ".pth"))
    }
    assert checkpoint_pickles == {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert not [n for n in os.listdir(tmp_path / "adapter") if n.endswith((".bin", ".pt", ".pth"))]

    # full fine-tuning: the model in safetensors, reloadable, equal to the trained weights
    full = _trainer(
        "text", tmp_path / "full", NSCRecorder(), max_steps=1, save_strategy="no", beta=0.0, peft=False
    )
    full.train()
    full.save_model(str(tmp_path / "model"))
    names = set(os.listdir(tmp_path / "model"))
    assert {"model.safetensors", "config.json", "training_args.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    torch.testing.assert_close(reloaded.state_dict(), full.model.state_dict())


def test_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    output_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "intrinsic_train_killed_in_save.py"), str(output_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL, raised while checkpoint-2 was written
    assert (output_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()  # the weights made it
    assert not (output_dir / "checkpoint-2" / "trainer_state.json").exists()  # the state did not
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-1")

    trainer = make_killed_run_trainer(str(output_dir))
    with pytest.raises(ValueError, match="incomplete"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2"))
    trainer = make_killed_run_trainer(str(output_dir))
    trainer.train(resume_from_checkpoint=True)  # picks checkpoint-1, mid-generation: its rollouts are reused
    assert trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-3")


def test_resume_mid_generation_needs_the_same_layout(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    trainer = _trainer("text", tmp_path, NSCRecorder(), max_steps=1, save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    buffer = checkpoint / "rollout_buffer_0.safetensors"
    with safe_open(str(buffer), framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["num_processes"], metadata["step"], metadata["steps_per_generation"]) == ("1", "1", "2")

    def resume(**overrides):
        _trainer("text", tmp_path, NSCRecorder(), max_steps=2, **overrides).train(
            resume_from_checkpoint=str(checkpoint)
        )

    with pytest.raises(ValueError, match="steps_per_generation=2"):  # 4 micro-steps per generation now
        resume(steps_per_generation=4, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="num_iterations=1"):
        resume(num_iterations=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        resume(gradient_accumulation_steps=2, steps_per_generation=2, per_device_train_batch_size=1)

    # the buffer of a 2-process run, resumed by one process
    save_file(load_file(buffer), str(buffer), metadata={**metadata, "num_processes": "2"})
    with pytest.raises(ValueError, match="num_processes=2"):
        resume()

    # a checkpoint between two generations without this process's rollouts
    buffer.unlink()
    with pytest.raises(ValueError, match="rollout_buffer_0"):
        resume()
