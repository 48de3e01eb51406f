"""DiffusionNFTTrainer on the tiny SD3 pipeline: the update, the old policy, resume, saving."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from trl_intrinsic import DiffusionNFTConfig, DiffusionNFTTrainer
from trl_intrinsic.flow.nft import old_policy_decay
from trl_intrinsic.testing import tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def brightness(prompts, images, **kwargs):
    """Mean pixel value in [0, 1]."""
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def constant(prompts, images, **kwargs):
    return [1.0] * len(prompts)


constant.requires_images = False


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=1, resolution=32,
        num_inference_steps=3, logging_steps=1, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
    )  # fmt: skip
    values.update(overrides)
    return DiffusionNFTConfig(**values)


def _trainer(tmp_path, reward_funcs=(brightness,), **overrides):
    return DiffusionNFTTrainer(
        tiny_sd3_pipeline(),
        list(reward_funcs),
        args=_config(tmp_path, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, lora_dropout=0.0),
    )


def _lora(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


def test_equal_rewards_leave_the_weights_unchanged(tmp_path):
    # Every r = ½ and v_θ = v_old (the old policy starts as θ): the NFT gradient vanishes.
    trainer = _trainer(tmp_path, reward_funcs=[constant], beta=0.0, max_steps=1)
    before = _lora(trainer)
    trainer.train()
    after = _lora(trainer)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_unequal_rewards_change_only_the_lora_weights(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, beta=1e-4)
    frozen = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    before = _lora(trainer)
    trainer.train()
    assert any((_lora(trainer)[k] - before[k]).abs().max() > 0 for k in before)
    for name, value in trainer.model.named_parameters():
        if not value.requires_grad:
            torch.testing.assert_close(value, frozen[name], rtol=0, atol=0)


def test_bad_values_are_refused_before_any_model_loads(tmp_path):
    for field, value in (("nft_beta", 0.0), ("nft_beta", 1.5), ("beta", -1.0), ("timestep_schedule", "cosine"),
                         ("timestep_fraction", 0.0), ("old_policy_max_decay", 2.0)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            _config(tmp_path, **{field: value})
    assert _config(tmp_path, num_inference_steps=10).timesteps_per_image == 9  # ⌊10 × 0.99⌋, as the reference


class _RecordOldPolicy(TrainerCallback):
    """Record the trained and old weights after each optimizer step (before the next generation)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(
            (
                state.global_step,
                [p.detach().clone() for p in self.trainer._trainable],
                [p.detach().clone() for p in self.trainer._old.tensors],
            )
        )


def test_old_policy_follows_its_decay_schedule(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, old_policy_decay_rate=0.2, old_policy_max_decay=0.3)
    recorder = _RecordOldPolicy(trainer)
    trainer.add_callback(recorder)
    history = []
    original = trainer.log
    trainer.log = lambda logs, start_time=None: (
        history.append(dict(trainer._metrics["train"])),
        original(logs),
    )
    trainer.train()
    decays = [m["old_policy/decay"][0] for m in history if "old_policy/decay" in m]
    assert decays == pytest.approx([old_policy_decay(s, rate=0.2, max_decay=0.3) for s in (0, 1, 2)])
    assert decays == pytest.approx([0.0, 0.2, 0.3])
    # Before generation batch k+1 (after step k): θ_old ← η_k·θ_old + (1 − η_k)·θ_k.
    (_, theta1, old1), (_, _, old2), _ = recorder.steps
    # old1 is the old policy used for batch 1: θ_0 (η_0 = 0 copies θ at step 0, the initial weights).
    expected = [0.2 * o + 0.8 * t for o, t in zip(old1, theta1)]
    for got, want in zip(old2, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_restores_the_old_policy_and_reproduces_the_run(tmp_path):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, old_policy_decay_rate=0.3,
                    steps_per_generation=2, per_device_train_batch_size=2, lr_scheduler_type="constant")  # fmt: skip
    full = _trainer(tmp_path / "full", output_dir=str(tmp_path / "full"), **settings)
    full.train()
    stopped = _trainer(tmp_path / "part", output_dir=str(tmp_path / "part"), **settings)
    stopped.add_callback(_StopAt(3))
    stopped.train()  # checkpoint-2 is saved, training stops at step 3 (mid generation)
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / "old_policy.safetensors").is_file()
    resumed = _trainer(tmp_path / "part", output_dir=str(tmp_path / "part"), **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(resumed._trainable, full._trainable):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed._old.tensors, full._old.tensors):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_brightness_reward_makes_images_brighter(tmp_path):
    trainer = _trainer(
        tmp_path, max_steps=20, learning_rate=0.1, lr_scheduler_type="constant", per_device_train_batch_size=8,
        num_generations=4, scale_rewards="group", beta=0.0, old_policy_decay_rate=0.0, eval_num_inference_steps=3,
        per_device_eval_batch_size=8, eval_strategy="no",
    )  # fmt: skip
    evaluation = Dataset.from_dict({"prompt": PROMPTS})

    def mean_brightness():
        trainer.eval_dataset = evaluation
        return trainer.evaluate()["eval_reward"]

    before = mean_brightness()
    trainer.train()
    after = mean_brightness()
    print(f"brightness {before:.4f} -> {after:.4f}")
    # The random tiny model's images barely vary (within-group std ≈ 0.002); evaluation samples are paired.
    assert after > before + 0.004, (before, after)


def test_saves_a_diffusers_lora_with_a_model_card(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "DiffusionNFT" in card and "2509.16117" in card and "load_lora_weights" in card
    assert json.loads((out / "training_args.json").read_text())["nft_beta"] == 1.0
    fresh = tiny_sd3_pipeline()
    fresh.load_lora_weights(str(out))  # loads in diffusers
