"""Collapse statistics: closed forms, and the trainer's logging and warning."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.flow import diagnostics
from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.trainers import common


def test_latent_statistics_match_a_hand_computation():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])  # (1, 1, 2, 2)
    stats = diagnostics.latent_statistics(x)
    mean = 2.0
    std = math.sqrt(((0 - mean) ** 2 + (1 - mean) ** 2 + (2 - mean) ** 2 + (5 - mean) ** 2) / 4)
    vertical = (abs(2 - 0) + abs(5 - 1)) / 2
    horizontal = (abs(1 - 0) + abs(5 - 2)) / 2
    assert stats["std"].item() == pytest.approx(std)
    assert stats["texture"].item() == pytest.approx((vertical + horizontal) / 2)


def test_flat_latents_and_identical_groups_score_zero():
    flat = torch.full((4, 3, 8, 8), 0.7)
    stats = diagnostics.latent_statistics(flat)
    assert torch.all(stats["std"] == 0) and torch.all(stats["texture"] == 0)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    same_in_group = noise.repeat_interleave(2, dim=0)  # groups [0, 0, 1, 1] hold identical samples
    groups = torch.tensor([0, 0, 1, 1])
    assert diagnostics.group_diversity(diagnostics.pooled(same_in_group), groups).item() == 0.0
    assert diagnostics.group_diversity(diagnostics.pooled(noise.repeat(2, 1, 1, 1)), groups).item() > 0.1


def test_group_diversity_is_the_mean_within_group_std():
    features = torch.tensor([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0], [1.0, 3.0]])
    groups = torch.tensor([5, 5, 9, 9])
    # group 5: per-feature std (1, 2) → 1.5; group 9: (0, 1) → 0.5
    assert diagnostics.group_diversity(features, groups).item() == pytest.approx(1.0)


def test_pooling_keeps_small_latents_and_shrinks_large_ones():
    assert diagnostics.pooled(torch.ones(2, 4, 8, 8)).shape == (2, 256)
    assert diagnostics.pooled(torch.ones(2, 16, 128, 128)).shape == (2, 16 * 64)


def test_image_std_counts_blank_images():
    blank = torch.full((1, 3, 16, 16), 0.9)
    textured = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    std = diagnostics.image_std(torch.cat([blank, textured]))
    assert std[0].item() == 0.0 < diagnostics.BLANK_IMAGE_STD < std[1].item()


@pytest.mark.parametrize(
    "call",
    [
        lambda: diagnostics.latent_statistics(torch.zeros(3, 8, 8)),
        lambda: diagnostics.image_std(torch.zeros(3, 8, 8)),
        lambda: diagnostics.group_diversity(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)),
    ],
)
def test_wrong_shapes_are_rejected(call):
    with pytest.raises(ValueError, match="must"):
        call()


def _trainer(tmp_path, **overrides):
    args = FlowGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=1, resolution=32,
        num_inference_steps=3, logging_steps=1, save_strategy="no", disable_tqdm=True, **overrides,
    )  # fmt: skip
    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [lambda prompts, images, **kwargs: [float(image.getpixel((0, 0))[0]) for image in images]],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )


def test_trainer_logs_collapse_statistics_and_warns_once(tmp_path, monkeypatch, record_train_metrics):
    trainer = _trainer(tmp_path)
    logged = record_train_metrics(trainer)
    trainer.train()
    metrics = logged[0]
    for key in ("latent_std", "latent_texture", "group_diversity", "image_std", "blank_fraction"):
        assert len(metrics[f"collapse/{key}"]) == 1 and math.isfinite(metrics[f"collapse/{key}"][0]), key
    assert metrics["collapse/texture_ratio"] == [1.0]
    assert metrics["collapse/group_diversity"][0] > 0  # different noise per sample

    warnings = []
    monkeypatch.setattr(common.logger, "warning", lambda message: warnings.append(message))
    textured = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    groups = torch.tensor([0, 0, 1, 1])
    trainer._log_collapse_statistics("train", textured, None, groups)
    assert warnings == []
    trainer._log_collapse_statistics("train", textured * 0.1, None, groups)  # texture ratio ≈ 0.1
    trainer._log_collapse_statistics("train", textured * 0.1, None, groups)  # still collapsed: no repeat
    assert len(warnings) == 1 and "timestep_fraction" in warnings[0]
    trainer._log_collapse_statistics("train", textured * 10, None, groups)  # recovered
    trainer._log_collapse_statistics("train", textured * 0.1, None, groups)  # collapses again: warns again
    assert len(warnings) == 2


def test_collapse_warning_can_be_disabled_and_is_validated(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, collapse_warning_ratio=0.0)
    warnings = []
    monkeypatch.setattr(common.logger, "warning", lambda message: warnings.append(message))
    trainer._collapse_reference = 1.0
    trainer._log_collapse_statistics("train", torch.zeros(4, 16, 4, 4), None, torch.tensor([0, 0, 1, 1]))
    assert warnings == [] and trainer._metrics["train"]["collapse/texture_ratio"] == [0.0]
    with pytest.raises(ValueError, match="collapse_warning_ratio"):
        FlowGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, collapse_warning_ratio=1.5)
