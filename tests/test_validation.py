"""Every numeric field of the configs is refused when out of range (NaN and infinities included), with a message
naming the field, the value and the fix; bad combinations and empty datasets are refused before any model loads."""

import math

import pytest
from datasets import Dataset

from trl_intrinsic import (
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
    IntrinsicGRPOConfig,
    IntrinsicGRPOTrainer,
)
from trl_intrinsic.rewards import SolaceReward
from trl_intrinsic.trainers.intrinsic_grpo_config import INTRINSIC_FIELD_RULES
from trl_intrinsic.validation import Range

BASE = {"use_cpu": True, "bf16": False, "report_to": "none"}


def _rules(config_class, tmp_path):
    if config_class is IntrinsicGRPOConfig:
        return INTRINSIC_FIELD_RULES
    return config_class(output_dir=str(tmp_path), **BASE)._field_rules()


def _bad_values(rule: Range):
    """Values just outside the rule, of the wrong type, and non-finite ones."""
    values = []
    if not rule.optional:
        values.append((None, TypeError))
    values.append(("1", TypeError))
    if rule.integer:
        values.append((2.5, TypeError))
    else:
        values += [(math.nan, ValueError), (math.inf, ValueError), (-math.inf, ValueError)]
    if rule.low is not None:
        values.append((rule.low if rule.low_open else rule.low - 1, ValueError))
    if rule.high is not None:
        values.append((rule.high if rule.high_open else rule.high + 1, ValueError))
    return [(v if not rule.integer or not isinstance(v, float) or v == 2.5 else int(v), e) for v, e in values]


@pytest.mark.parametrize("config_class", [FlowGRPOConfig, DiffusionNFTConfig, IntrinsicGRPOConfig])
def test_every_numeric_field_is_range_checked(tmp_path, config_class):
    rules = _rules(config_class, tmp_path)
    names = {rule.name for rule in rules}
    assert {"num_generations", "learning_rate", "beta", "per_device_train_batch_size"} <= names
    if config_class is not IntrinsicGRPOConfig:
        assert {"guidance_scale", "num_inference_steps", "adv_clip_max", "resolution"} <= names
    for rule in rules:
        for value, error in _bad_values(rule):
            with pytest.raises(error) as info:
                config_class(output_dir=str(tmp_path), **BASE, **{rule.name: value})
            message = str(info.value)
            assert f"`{rule.name}`" in message and repr(value) in message, (rule.name, value, message)


def test_named_fields_that_were_accepted_silently(tmp_path):
    for field, value in (("noise_level", math.nan), ("beta", -0.1), ("epsilon", 0.0), ("num_generations", 1)):
        with pytest.raises(ValueError, match=f"`{field}`"):
            FlowGRPOConfig(output_dir=str(tmp_path), **BASE, **{field: value})
    with pytest.raises(ValueError, match=r"`reward_weights\[1\]`"):
        FlowGRPOConfig(output_dir=str(tmp_path), **BASE, reward_weights=[1.0, math.nan])


def test_a_generation_batch_that_splits_prompt_groups_names_the_fix(tmp_path):
    for config_class in (FlowGRPOConfig, DiffusionNFTConfig, IntrinsicGRPOConfig):
        with pytest.raises(ValueError, match=r"num_generations=3.*per_device_train_batch_size"):
            config_class(output_dir=str(tmp_path), **BASE, num_generations=3, per_device_train_batch_size=4)


def test_choices_and_combinations(tmp_path):
    with pytest.raises(ValueError, match="`sde_type`"):
        FlowGRPOConfig(output_dir=str(tmp_path), **BASE, sde_type="ddim")
    with pytest.raises(ValueError, match="`timestep_schedule`"):
        DiffusionNFTConfig(output_dir=str(tmp_path), **BASE, timestep_schedule="cosine")
    with pytest.raises(ValueError, match="sde_window_size"):
        FlowGRPOConfig(output_dir=str(tmp_path), **BASE, num_inference_steps=4, sde_window_size=4)
    with pytest.raises(ValueError, match="resolution"):
        FlowGRPOConfig(output_dir=str(tmp_path), **BASE, resolution=36)


@pytest.mark.parametrize("trainer_class", [FlowGRPOTrainer, DiffusionNFTTrainer, IntrinsicGRPOTrainer])
def test_empty_datasets_are_refused_before_the_model_loads(tmp_path, trainer_class):
    config_class = {FlowGRPOTrainer: FlowGRPOConfig, DiffusionNFTTrainer: DiffusionNFTConfig}.get(
        trainer_class, IntrinsicGRPOConfig
    )
    args = config_class(output_dir=str(tmp_path), **BASE)
    empty = Dataset.from_dict({"prompt": []})
    with pytest.raises(ValueError, match="`train_dataset` has no rows"):  # the model path does not exist
        trainer_class(str(tmp_path / "no-such-model"), [lambda prompts, **kw: [0.0] * len(prompts)], args=args,
                      train_dataset=empty)  # fmt: skip


def test_solace_reward_refuses_non_finite_settings():
    for field, value in (("delta", math.nan), ("delta", 0.0), ("num_probes", 0), ("num_probes", 3)):
        with pytest.raises(ValueError, match=f"`{field}`"):
            SolaceReward(**{field: value})
