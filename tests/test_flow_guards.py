"""Per-task rewards on a mixed prompt set, and the collapse guard that stops training."""

import json
import os

import pytest
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.testing import tiny_sd3_pipeline


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", seed=0, disable_tqdm=True,
        per_device_train_batch_size=4, num_generations=2, max_steps=1, resolution=32, num_inference_steps=3,
        logging_steps=1, save_strategy="no", learning_rate=1e-3, guidance_scale=1.0,
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOConfig(**values)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)


TOY = {"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"}


def test_a_mixed_prompt_set_trains_with_per_task_rewards(tmp_path):
    # The verifier applies to toy prompts (metadata), OCR to prompts with quoted text; each returns None elsewhere.
    dataset = Dataset.from_dict(
        {
            "prompt": ["a photo of a square", 'a sign that says "OPEN"'],
            "metadata": [json.dumps(TOY), None],
        }
    )
    seen = []

    def recorder(prompts, images, **kwargs):
        seen.append(list(prompts))
        return [None] * len(prompts)  # applies to nothing: weights and advantages must ignore it

    trainer = FlowGRPOTrainer(
        tiny_sd3_pipeline(), ["verifier_reward", "ocr_score", recorder], args=_config(tmp_path, max_steps=2),
        train_dataset=dataset, peft_config=_lora(),
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2 and seen
    logged = [h for h in trainer.state.log_history if "rewards/verifier_reward/mean" in h]
    assert len(logged) == 2
    for entry in logged:  # each reward is averaged over the samples it applies to; the empty one logs nothing
        assert (
            entry["rewards/verifier_reward/mean"] in (0.0, 0.5, 1.0)
            and 0.0 <= entry["rewards/ocr_score/mean"] <= 1
        )
        assert entry["rewards/recorder/mean"] is None


def test_a_sample_no_reward_applies_to_is_a_clear_error(tmp_path):
    dataset = Dataset.from_dict(
        {"prompt": ["a photo of a square", "a plain landscape"], "metadata": [json.dumps(TOY), None]}
    )
    trainer = FlowGRPOTrainer(
        tiny_sd3_pipeline(), ["verifier_reward", "ocr_score"], args=_config(tmp_path), train_dataset=dataset,
        peft_config=_lora(),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"No reward function applies .*'a plain landscape'"):
        trainer.train()


def test_collapse_action_stop_ends_training_without_checkpointing_the_collapsed_step(tmp_path):
    def latent_mean(prompts, images, latents, **kwargs):
        return [float(z.mean()) for z in latents]

    latent_mean.requires_images = False
    args = _config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, collapse_action="stop")
    trainer = FlowGRPOTrainer(
        tiny_sd3_pipeline(), [latent_mean], args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        peft_config=_lora(),
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 3 and not trainer._collapse_stop  # healthy: trains to the end
    assert os.path.isdir(tmp_path / "checkpoint-3")

    collapsed = tmp_path / "collapsed"
    args = _config(collapsed, max_steps=3, save_strategy="steps", save_steps=1, collapse_action="stop")
    trainer = FlowGRPOTrainer(
        tiny_sd3_pipeline(), [latent_mean], args=args, train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
        peft_config=_lora(),
    )  # fmt: skip
    trainer._collapse_reference = 1e9  # every rollout's texture is then ≈ 0 of the yardstick: a collapse
    trainer.train()
    assert trainer.state.global_step == 1 and trainer._collapse_stop
    assert not os.path.exists(collapsed / "checkpoint-1")
    with pytest.raises(ValueError, match="collapse_action"):
        _config(tmp_path, collapse_action="halt")
