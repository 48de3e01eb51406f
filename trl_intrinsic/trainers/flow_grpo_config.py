"""Configuration of :class:`~trl_intrinsic.FlowGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from trl_intrinsic.flow.sde import SDE_TYPES


@dataclass
class FlowGRPOConfig(GRPOConfig):
    r"""
    Configuration of [`FlowGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus the knobs of Flow-GRPO sampling.

    Shared knobs keep their TRL names and meanings: `num_generations` (G images per prompt),
    `per_device_train_batch_size` (images per micro-batch — sampling and training micro-batches have this
    same size), `steps_per_generation`, `num_iterations`, `beta` (KL to the base model), `epsilon` /
    `epsilon_high` (ratio clipping), `scale_rewards` (`"group"`, `"batch"` or `"none"`), `reward_weights`,
    `multi_objective_aggregation` (`"normalize_then_sum"` normalises each reward's advantages separately
    before weighting — the SOLACE authors' hybrid mode), `log_completions`, `model_init_kwargs`.
    Text-generation knobs of `GRPOConfig` (`max_completion_length`, `temperature`, vLLM, …) are ignored.
    LoRA settings come with the `peft_config` (in scripts, TRL's `ModelConfig`: `lora_r`, `lora_alpha`,
    `lora_target_modules`); without target modules, the pipeline adapter's defaults are used.

    Defaults differing from `GRPOConfig` follow Flow-GRPO: `learning_rate=3e-4`, `beta=0.04`,
    `epsilon=1e-4`, `scale_rewards="batch"`; activation checkpointing is off by default.

    Parameters:
        resolution (`int`, *optional*, defaults to `512`):
            Side of the generated square images, in pixels.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Sampler steps of training rollouts.
        eval_num_inference_steps (`int`, *optional*, defaults to `40`):
            Sampler steps of evaluation samples (deterministic, `noise_level=0`).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            Classifier-free guidance weight of rollouts (`≤ 1` trains without guidance; for guidance-distilled
            models such as FLUX.1-dev it is the guidance embedding).
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional branch of classifier-free guidance.
        max_sequence_length (`int` or `None`, *optional*):
            Token budget of the long text encoder (T5 / Gemma); the pipeline's default when `None`.
        noise_level (`float`, *optional*, defaults to `0.7`):
            `a` of the SDE: the step std is `a·sqrt(σ/(1−σ))` (`flow_sde`) or `σ'·sin(aπ/2)` (`cps`).
        sde_type (`str`, *optional*, defaults to `"flow_sde"`):
            `"flow_sde"` (Flow-GRPO) or `"cps"` (coefficient-preserving sampling).
        sde_window_size (`int`, *optional*, defaults to `0`):
            Flow-GRPO-Fast: make only this many consecutive steps stochastic (at a random position inside
            `sde_window_range`, the same on every process) and train only those. `0` makes every step but
            the terminal one stochastic.
        sde_window_range (`list[int]` or `None`, *optional*):
            `[lo, hi]`: the window lies within steps `lo … hi−1`; `None` means `[0, num_inference_steps − 1]`.
        same_latent (`bool`, *optional*, defaults to `False`):
            Start the `num_generations` images of a prompt from the same initial noise (Flow-GRPO's
            `sample.same_latent`). The images of a group then differ only through the stochastic steps the
            policy takes, so the group baseline removes the reward variance that comes from the initial
            noise, which no update can change.
        timestep_fraction (`float`, *optional*, defaults to `1.0`):
            Fraction of the stochastic steps that are trained (`⌈fraction · |window|⌉` steps).
        timestep_selection (`str`, *optional*, defaults to `"prefix"`):
            Which stochastic steps are trained: the first (`"prefix"`, Flow-GRPO: high noise) or the last
            (`"suffix"`, SOLACE: the later, low-noise steps).
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `±adv_clip_max`.
        save_full_pipeline (`bool`, *optional*, defaults to `False`):
            When fine-tuning without LoRA, also save the whole pipeline at the end of training.
        collapse_warning_ratio (`float`, *optional*, defaults to `0.5`):
            Warn when the texture of the final latents (`collapse/texture_ratio`, see
            `trl_intrinsic.flow.diagnostics`) falls below this fraction of its value at the first
            training step, or when more than half of the decoded images are blank: the signs of
            SOLACE's known collapse to textureless images. `0` disables the warning; the statistics
            are logged either way.
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    beta: float = field(
        default=0.04, metadata={"help": "KL coefficient (Flow-GRPO's KL between step means)."}
    )
    epsilon: float = field(default=1e-4, metadata={"help": "Clipping range of the importance ratio."})
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "Reward scaling: 'group', 'batch' (Flow-GRPO's default) or 'none'."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute the transformer's activations in the backward pass."}
    )

    resolution: int = field(default=512, metadata={"help": "Side of the generated square images, in pixels."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampler steps of training rollouts."})
    eval_num_inference_steps: int = field(
        default=40, metadata={"help": "Sampler steps of evaluation samples."}
    )
    guidance_scale: float = field(
        default=4.5, metadata={"help": "Classifier-free guidance weight of rollouts."}
    )
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional branch."})
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Token budget of the long text encoder; pipeline default when None."}
    )
    noise_level: float = field(default=0.7, metadata={"help": "Noise level `a` of the SDE."})
    sde_type: str = field(default="flow_sde", metadata={"help": "'flow_sde' or 'cps'."})
    sde_window_size: int = field(
        default=0, metadata={"help": "Flow-GRPO-Fast window length; 0 = every step but the terminal one."}
    )
    sde_window_range: list[int] | None = field(
        default=None, metadata={"help": "[lo, hi]: the window lies within steps lo..hi-1."}
    )
    same_latent: bool = field(
        default=False, metadata={"help": "The images of a prompt group start from the same initial noise."}
    )
    timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of stochastic steps trained."})
    timestep_selection: str = field(
        default="prefix", metadata={"help": "Train the first ('prefix') or last ('suffix') stochastic steps."}
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±adv_clip_max."})
    save_full_pipeline: bool = field(
        default=False, metadata={"help": "Without LoRA, also save the whole pipeline at the end."}
    )
    collapse_warning_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Warn when latent texture falls below this fraction of its first value; 0 disables."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"`resolution` must be a positive multiple of 8, got {self.resolution}.")
        for name in ("num_inference_steps", "eval_num_inference_steps"):
            if getattr(self, name) < 2:
                raise ValueError(f"`{name}` must be at least 2, got {getattr(self, name)}.")
        if self.noise_level < 0:
            raise ValueError(
                f"`noise_level` must be ≥ 0 (0 is the deterministic sampler), got {self.noise_level}."
            )
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {self.sde_type!r}.")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(
                f"`timestep_fraction` must be in (0, 1], got {self.timestep_fraction}; 1.0 trains every "
                "stochastic step."
            )
        if self.timestep_selection not in ("prefix", "suffix"):
            raise ValueError(
                f"`timestep_selection` must be 'prefix' or 'suffix', got {self.timestep_selection!r}."
            )
        if self.sde_window_size < 0:
            raise ValueError(
                f"`sde_window_size` must be ≥ 0 (0 disables the window), got {self.sde_window_size}."
            )
        if self.sde_window_range is not None:
            if len(self.sde_window_range) != 2:
                raise ValueError(f"`sde_window_range` must be [lo, hi], got {self.sde_window_range}.")
            lo, hi = self.sde_window_range
            if not 0 <= lo < hi <= self.num_inference_steps - 1:
                raise ValueError(
                    f"`sde_window_range` {self.sde_window_range} must satisfy 0 <= lo < hi <= "
                    f"num_inference_steps - 1 = {self.num_inference_steps - 1}."
                )
        width = (
            (self.sde_window_range[1] - self.sde_window_range[0])
            if self.sde_window_range
            else (self.num_inference_steps - 1)
        )
        if self.sde_window_size > width:
            raise ValueError(
                f"`sde_window_size` ({self.sde_window_size}) exceeds the {width} steps available for the SDE "
                "window (`sde_window_range`, or num_inference_steps - 1); lower it or raise num_inference_steps."
            )
        if not 0.0 <= self.collapse_warning_ratio < 1.0:
            raise ValueError(
                f"`collapse_warning_ratio` must be in [0, 1) (0 disables the warning), got {self.collapse_warning_ratio}."
            )
        if self.adv_clip_max <= 0:
            raise ValueError(f"`adv_clip_max` must be > 0, got {self.adv_clip_max}.")
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be ≥ 0, got {self.guidance_scale}.")
