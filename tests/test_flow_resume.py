"""Resuming FlowGRPOTrainer from ``checkpoint-N`` continues exactly where the run stopped, and a run killed
while saving leaves the previous checkpoint usable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl.trainer.utils import RepeatSampler

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.flow.weights import LORA_WEIGHTS_NAME
from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.trainers.common import last_complete_checkpoint, load_extra_state

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]
SCRIPTS = Path(__file__).parent / "scripts"


class LatentRecorder:
    """A latent-only reward (no VAE decode) that records the step, prompts and final latents it sees."""

    requires_images = False
    __name__ = "latent_mean"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, images, latents, trainer_state, **kwargs):
        self.calls.append((trainer_state.global_step, list(prompts), latents.clone()))
        return [float(z.mean()) for z in latents]


class StopAt(TrainerCallback):
    """Stop training after ``step`` optimizer steps, keeping the schedule of the full run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(output_dir, recorder, max_steps, callbacks=None, **overrides):
    values = dict(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to="none", seed=3, disable_tqdm=True,
        per_device_train_batch_size=2, num_generations=2, steps_per_generation=2, num_iterations=1,
        resolution=32, num_inference_steps=3, guidance_scale=1.0, learning_rate=3e-3, beta=0.01,
        max_steps=max_steps, logging_steps=1, save_strategy="steps", save_steps=3, lr_scheduler_type="linear",
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [recorder],
        args=FlowGRPOConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, lora_dropout=0.0),
        callbacks=callbacks,
    )


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize(
    "options", [{}, {"grpo_guard": True, "ema": True, "ema_update_interval": 2}], ids=["plain", "guard-ema"]
)
def test_resume_mid_generation_reproduces_the_uninterrupted_run(tmp_path, options):
    # 4 prompts, 2 per generation batch of 4 images sampled once for 2 micro-steps: an epoch is 4 steps.
    # Stop at step 3 (its rollouts were sampled at step 2), run to step 6: the resumed run crosses a
    # generation and an epoch boundary (step 4). GRPO-Guard's off-policy micro-steps also need the
    # sampling policy's step means from the buffer; an EMA of the weights is restored from the checkpoint.
    full_recorder = LatentRecorder()
    full = _trainer(tmp_path / "full", full_recorder, max_steps=6, **options)
    full.train()

    first = _trainer(
        tmp_path / "resumed", LatentRecorder(), max_steps=6, callbacks=[StopAt(3)], **options
    )
    first.train()
    assert first.state.global_step == 3
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / LORA_WEIGHTS_NAME).is_file()
    assert (checkpoint / "rollout_buffer_0.safetensors").is_file()  # mid-cycle: the unused rollouts are kept
    assert _lora(first).keys() == _lora(full).keys()

    resumed_recorder = LatentRecorder()
    resumed = _trainer(tmp_path / "resumed", resumed_recorder, max_steps=6, **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6

    # no re-sampling at the resume point: step 3 trains on the rollouts sampled at step 2
    assert [step for step, *_ in full_recorder.calls] == [0, 2, 4]
    assert [step for step, *_ in resumed_recorder.calls] == [4]
    # same sampler position (prompts, across the epoch boundary) and the same noise streams
    for (_, prompts_a, latents_a), (_, prompts_b, latents_b) in zip(
        full_recorder.calls[2:], resumed_recorder.calls, strict=True
    ):
        assert prompts_a == prompts_b
        torch.testing.assert_close(latents_a, latents_b, rtol=1e-5, atol=1e-6)

    # the same adapter weights and optimizer moments
    full_weights, resumed_weights = _lora(full), _lora(resumed)
    assert any(v.abs().max() > 0 for k, v in full_weights.items() if "lora_B" in k)
    torch.testing.assert_close(resumed_weights, full_weights, rtol=1e-5, atol=1e-7)
    if options.get("ema"):
        torch.testing.assert_close(resumed._ema.tensors, full._ema.tensors, rtol=1e-5, atol=1e-7)
    full_state = full.optimizer.state_dict()["state"]
    resumed_state = resumed.optimizer.state_dict()["state"]
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        torch.testing.assert_close(resumed_state[key]["exp_avg_sq"], full_state[key]["exp_avg_sq"])
        assert int(resumed_state[key]["step"]) == int(full_state[key]["step"]) == 6
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    # the collapse yardstick is the first rollout of the run, not of the resumed process
    assert load_extra_state(checkpoint)["latent_texture"] == full._collapse_reference
    assert resumed._collapse_reference == full._collapse_reference is not None


def test_shuffle_order_is_trls_and_survives_a_resume(tmp_path):
    trainer = _trainer(tmp_path, LatentRecorder(), max_steps=1)
    sampler = trainer._get_train_sampler()
    reference = RepeatSampler(
        PROMPTS, mini_repeat_count=2, batch_size=2, repeat_count=2, shuffle=True, seed=trainer.args.seed
    )
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert orders[-1] == list(reference)  # TRL's epoch-after-epoch order
    assert orders[0] != orders[1] or orders[1] != orders[2]
    fresh = trainer._get_train_sampler()
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]  # a new sampler (as after a resume) replays epoch 2, not epoch 0


def test_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    output_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "flow_train_killed_in_save.py"), str(output_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL, raised while checkpoint-2 was written
    assert (
        output_dir / "checkpoint-2" / LORA_WEIGHTS_NAME
    ).is_file()  # the weights made it, the state did not
    assert not (output_dir / "checkpoint-2" / "trainer_state.json").exists()
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-1")

    trainer = _trainer(output_dir, LatentRecorder(), max_steps=3, save_steps=1, num_iterations=1)
    with pytest.raises(ValueError, match="incomplete"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-2"))
    trainer = _trainer(output_dir, LatentRecorder(), max_steps=3, save_steps=1, num_iterations=1)
    trainer.train(resume_from_checkpoint=True)  # picks checkpoint-1
    assert trainer.state.global_step == 3
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-3")


def test_resume_mid_generation_needs_the_same_layout(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    trainer = _trainer(tmp_path, LatentRecorder(), max_steps=1, save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    buffer = checkpoint / "rollout_buffer_0.safetensors"
    with safe_open(str(buffer), framework="pt") as f:
        assert f.metadata()["num_processes"] == "1"

    # a different number of micro-steps per generation cannot reuse the saved rollouts
    other = _trainer(
        tmp_path, LatentRecorder(), max_steps=2, steps_per_generation=4, per_device_train_batch_size=1
    )
    with pytest.raises(ValueError, match="steps_per_generation"):
        other.train(resume_from_checkpoint=str(checkpoint))

    # nor can another number of processes (the buffer of a 2-process run, resumed by one process)
    save_file(load_file(buffer), str(buffer), metadata={"step": "1", "num_processes": "2"})
    resumed = _trainer(tmp_path, LatentRecorder(), max_steps=2)
    with pytest.raises(ValueError, match="num_processes=2"):
        resumed.train(resume_from_checkpoint=str(checkpoint))

    # a checkpoint saved between two generations without this process's rollouts is refused
    buffer.unlink()
    with pytest.raises(ValueError, match="rollout_buffer_0"):
        _trainer(tmp_path, LatentRecorder(), max_steps=2).train(resume_from_checkpoint=str(checkpoint))
