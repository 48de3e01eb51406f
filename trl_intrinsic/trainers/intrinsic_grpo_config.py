"""Configuration of :class:`~trl_intrinsic.IntrinsicGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from trl_intrinsic.autoregressive.janus import DEFAULT_COT_TEMPLATE
from trl_intrinsic.trainers.common import GRPO_FIELD_RULES, check_generation_batch
from trl_intrinsic.validation import Range, check_ranges

__all__ = ["IntrinsicGRPOConfig"]


@dataclass
class IntrinsicGRPOConfig(GRPOConfig):
    r"""
    Configuration of [`IntrinsicGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus the knobs of self-certainty
    rewards and of IRIS on Janus-Pro.

    Every `GRPOConfig` field keeps its meaning (`num_generations`, `beta`, `epsilon`, `scale_rewards`,
    `reward_weights`, `max_completion_length`, `temperature`, `log_completions`, …). For Janus models
    `max_completion_length` bounds the chain-of-thought (CoT) and `temperature` is its sampling
    temperature; the image tokens have their own `image_temperature`.

    Parameters:
        self_certainty_chunk_size (`int`, *optional*, defaults to `64`):
            Positions whose logits are converted to fp32 at once when computing self-certainty; peak extra
            memory is `self_certainty_chunk_size × vocab_size` floats.
        use_cot (`bool`, *optional*, defaults to `True`):
            Janus only. Generate a semantic chain-of-thought with the text head before the image tokens, and
            train on both. `False` gives plain image-token GRPO.
        cot_template (`str`, *optional*):
            Janus only. The user message asking for the CoT; `{prompt}` is replaced by the dataset prompt.
            Defaults to [`~trl_intrinsic.autoregressive.janus.DEFAULT_COT_TEMPLATE`].
        cfg_weight (`float`, *optional*, defaults to `5.0`):
            Janus only. Classifier-free guidance weight of image-token sampling,
            `logits = uncond + cfg_weight · (cond − uncond)`; `1.0` disables guidance. IRIS uses 5.
        image_temperature (`float`, *optional*, defaults to `1.0`):
            Janus only. Sampling temperature of the image tokens (applied after guidance).
        image_token_num (`int` or `None`, *optional*, defaults to `None`):
            Janus only. Image tokens per image; `None` uses the model's own count
            (`config.vision_config.num_image_tokens`, 576 for Janus-Pro). A different value raises.
        image_size (`int` or `None`, *optional*, defaults to `None`):
            Janus only. Side of the decoded images in pixels; `None` uses the model's own size. A value the
            VQ decoder does not produce raises.
        janus_lora (`bool`, *optional*, defaults to `True`):
            Janus only. Without a `peft_config`, train a LoRA adapter (`janus_lora_r`, `janus_lora_alpha`, `janus_lora_dropout`,
            `janus_lora_target_modules`) on the language model. `False` fine-tunes the language model and the
            generation head fully. The vision encoder, the VQ model and the aligners are always frozen.
        janus_lora_r (`int`, *optional*, defaults to `16`):
            Rank of the default Janus LoRA adapter.
        janus_lora_alpha (`int`, *optional*, defaults to `32`):
            Alpha of the default Janus LoRA adapter.
        janus_lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout of the default Janus LoRA adapter.
        janus_lora_target_modules (`list[str]`, *optional*):
            Module names (inside the language model) of the default Janus LoRA adapter.
    """

    self_certainty_chunk_size: int = field(
        default=64,
        metadata={
            "help": "Positions whose logits are converted to fp32 at once when computing self-certainty."
        },
    )
    use_cot: bool = field(
        default=True,
        metadata={
            "help": "Janus: generate and train on a semantic chain-of-thought before the image tokens."
        },
    )
    cot_template: str = field(
        default=DEFAULT_COT_TEMPLATE,
        metadata={
            "help": "Janus: user message asking for the chain-of-thought; `{prompt}` is the dataset prompt."
        },
    )
    cfg_weight: float = field(
        default=5.0,
        metadata={
            "help": "Janus: classifier-free guidance weight of image-token sampling (1.0 = no guidance)."
        },
    )
    image_temperature: float = field(
        default=1.0, metadata={"help": "Janus: sampling temperature of the image tokens."}
    )
    image_token_num: int | None = field(
        default=None, metadata={"help": "Janus: image tokens per image; None uses the model's own count."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Janus: side of the decoded images in pixels; None uses the model's size."},
    )
    janus_lora: bool = field(
        default=True,
        metadata={"help": "Janus: without a peft_config, train a LoRA adapter on the language model."},
    )
    janus_lora_r: int = field(default=16, metadata={"help": "Rank of the default Janus LoRA adapter."})
    janus_lora_alpha: int = field(default=32, metadata={"help": "Alpha of the default Janus LoRA adapter."})
    janus_lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout of the default Janus LoRA adapter."}
    )
    janus_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names inside the language model for the default Janus LoRA adapter."},
    )

    def __post_init__(self):
        # Checked before GRPOConfig's own validation, so that every message names the field and the fix.
        check_ranges(self, INTRINSIC_FIELD_RULES)
        check_generation_batch(self)
        super().__post_init__()
        if "{prompt}" not in self.cot_template:
            raise ValueError("`cot_template` must contain the placeholder `{prompt}` for the dataset prompt.")


INTRINSIC_FIELD_RULES = (
    *GRPO_FIELD_RULES,
    Range("epsilon", 0, low_open=True, fix="the clipping range of the importance ratio; TRL uses 0.2."),
    Range("epsilon_high", 0, low_open=True, optional=True),
    Range("temperature", 0, low_open=True, fix="1.0 samples from the model's distribution."),
    Range("max_completion_length", 1, integer=True, optional=True),
    Range("self_certainty_chunk_size", 1, integer=True),
    Range("cfg_weight", 1, fix="1.0 disables classifier-free guidance; IRIS uses 5.0."),
    Range("image_temperature", 0, low_open=True),
    Range("image_token_num", 1, integer=True, optional=True, fix="None uses the model's own count."),
    Range("image_size", 1, integer=True, optional=True, fix="None uses the model's size."),
    Range("janus_lora_r", 1, integer=True),
    Range("janus_lora_alpha", 1, integer=True),
    Range("janus_lora_dropout", 0, 1, high_open=True, fix="0 keeps the update on-policy."),
)
"""Valid ranges of the numeric fields of :class:`IntrinsicGRPOConfig` and the ``GRPOConfig`` fields it uses."""
