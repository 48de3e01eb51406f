"""Configuration of :class:`~trl_intrinsic.FlowGRPOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl_intrinsic.flow.sde import SDE_TYPES
from trl_intrinsic.trainers.common import FlowTrainingConfig
from trl_intrinsic.validation import Range, check_choice


@dataclass
class FlowGRPOConfig(FlowTrainingConfig):
    r"""
    Configuration of [`FlowGRPOTrainer`]: TRL's [`~trl.GRPOConfig`], the flow knobs of
    [`~trl_intrinsic.trainers.common.FlowTrainingConfig`] (resolution, steps, guidance, ...) and those of
    Flow-GRPO's SDE sampling.

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
        cfg_uncond_gradient (`bool`, *optional*, defaults to `False`):
            With classifier-free guidance, the trained velocity is `v_u + w·(v_c − v_u)`. `False` stops the gradient
            through `v_u` (the unconditional prediction), as Flow-GRPO's reference script does: training then runs
            the conditional half alone with gradients, and while the weights are those that sampled (the first
            pass over a generation batch, before its optimizer step) it reuses the unconditional velocity
            recorded during sampling instead of recomputing it. `True` back-propagates through both halves (one
            forward and backward of twice the rows). On one toy prompt at equal CPU time (5 CPU-minutes, 3
            seeds) the two reach the same accuracy within noise (detached − full: +0.013 ± 0.026), the
            detached one with 20% more updates (`docs/results.md`).
        grpo_guard (`bool`, *optional*, defaults to `False`):
            GRPO-Guard (Wang et al. 2025, arXiv 2510.22319), against the over-optimisation that the clipping
            range fails to stop: the importance ratio of an SDE step is biased below 1 once the policy moves and
            its spread varies by orders of magnitude across timesteps, so clipping stops acting where updates
            are largest. *RatioNorm* replaces `log ρ` by `(log ρ + mean(Δμ²)/(2s²))·s` (`s` the step's noise
            std, `Δμ` the change of the step mean; see `grpo_math.ratio_norm_log_ratio`) and *gradient
            reweighting* divides each step's loss by its size `|dt|`, as the reference's Flow-GRPO form does.
            The rollout then also stores every step's mean (one more latent per step in the buffer). With
            `num_iterations=1` and `steps_per_generation=1` the ratio is 1 and only the per-step weights
            change. Try it when the trained reward keeps rising while held-out quality or another reward falls.
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
        timestep_fraction (`float`, *optional*, defaults to `1.0`):
            Fraction of the stochastic steps that are trained (`⌈fraction · |window|⌉` steps).
        timestep_selection (`str`, *optional*, defaults to `"prefix"`):
            Which stochastic steps are trained: the first (`"prefix"`, Flow-GRPO: high noise) or the last
            (`"suffix"`, SOLACE: the later, low-noise steps).
    """

    beta: float = field(
        default=0.04, metadata={"help": "KL coefficient (Flow-GRPO's KL between step means)."}
    )
    epsilon: float = field(default=1e-4, metadata={"help": "Clipping range of the importance ratio."})
    noise_level: float = field(default=0.7, metadata={"help": "Noise level `a` of the SDE."})
    sde_type: str = field(default="flow_sde", metadata={"help": "'flow_sde' or 'cps'."})
    sde_window_size: int = field(
        default=0, metadata={"help": "Flow-GRPO-Fast window length; 0 = every step but the terminal one."}
    )
    sde_window_range: list[int] | None = field(
        default=None, metadata={"help": "[lo, hi]: the window lies within steps lo..hi-1."}
    )
    timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of stochastic steps trained."})
    timestep_selection: str = field(
        default="prefix", metadata={"help": "Train the first ('prefix') or last ('suffix') stochastic steps."}
    )

    grpo_guard: bool = field(
        default=False,
        metadata={"help": "GRPO-Guard: RatioNorm of the importance ratio and per-step gradient reweighting."},
    )
    cfg_uncond_gradient: bool = field(
        default=False,
        metadata={
            "help": "Back-propagate through the unconditional half of CFG in training (False: detach it, as the reference)."
        },
    )

    def _field_rules(self) -> list[Range]:
        return [
            *super()._field_rules(),
            Range(
                "noise_level",
                0,
                fix="the SDE noise level `a`: Flow-GRPO trains with 0.7; 0 is the deterministic sampler.",
            ),
            Range(
                "epsilon",
                0,
                low_open=True,
                fix="the clipping range of the importance ratio; Flow-GRPO uses 1e-4.",
            ),
            Range("epsilon_high", 0, low_open=True, optional=True),
            Range("timestep_fraction", 0, 1, low_open=True, fix="1.0 trains every stochastic step."),
            Range(
                "sde_window_size", 0, integer=True, fix="0 makes every step but the terminal one stochastic."
            ),
        ]

    def __post_init__(self):
        super().__post_init__()
        check_choice("sde_type", self.sde_type, SDE_TYPES)
        if self.timestep_selection not in ("prefix", "suffix"):
            raise ValueError(
                f"`timestep_selection` must be 'prefix' or 'suffix', got {self.timestep_selection!r}."
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
