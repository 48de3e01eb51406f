"""Configuration of :class:`~trl_intrinsic.DiffusionNFTTrainer`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl_intrinsic.flow.nft import TIMESTEP_SCHEDULES
from trl_intrinsic.trainers.common import FlowTrainingConfig
from trl_intrinsic.validation import Range, check_choice


@dataclass
class DiffusionNFTConfig(FlowTrainingConfig):
    r"""
    Configuration of [`DiffusionNFTTrainer`]: TRL's [`~trl.GRPOConfig`], the flow knobs of
    [`~trl_intrinsic.trainers.common.FlowTrainingConfig`] and those of DiffusionNFT
    (see `trl_intrinsic.flow.nft` for the maths and where the paper and the reference code differ).

    Rollouts are sampled deterministically (the flow ODE, Euler steps) by the *old* policy, without
    classifier-free guidance by default (`guidance_scale=1.0`); only their final latents are kept. Training
    re-noises each of them at `⌊timestep_fraction · num_inference_steps⌋` of the sampler's own noise levels
    and regresses the implicit positive and negative policies onto the flow-matching target. `beta` keeps
    TRL's meaning, the weight of a KL term to the base model (here `‖v_θ − v_ref‖²`, the reference code's
    1e-4 by default); the strength of the implicit guidance is `nft_beta`.

    Parameters:
        nft_beta (`float`, *optional*, defaults to `1.0`):
            β of the implicit policies `v± = v_old ± β·(v_θ − v_old)`, in (0, 1] (the reference uses 1.0, and
            0.1 for OCR and multi-reward training).
        timestep_schedule (`str`, *optional*, defaults to `"sampler"`):
            Where the training noise levels come from: `"sampler"` (the reference: distinct sigmas of the
            rollout schedule) or `"uniform"` (continuous, shifted by `timestep_shift`).
        timestep_fraction (`float`, *optional*, defaults to `0.99`):
            Noise levels per image and generation batch: `⌊fraction · num_inference_steps⌋` (at least 1); each
            takes its own noise and backward pass, and all go into the same optimizer step.
        timestep_shift (`float`, *optional*, defaults to `3.0`):
            SD3 time shift of the `"uniform"` schedule.
        adaptive_weighting (`bool`, *optional*, defaults to `True`):
            The reference's self-normalised x0-space weighting of each loss term; `False` gives the paper's
            plain velocity regression.
        old_policy_flat_steps (`int`, *optional*, defaults to `0`):
        old_policy_decay_rate (`float`, *optional*, defaults to `1e-3`):
        old_policy_max_decay (`float`, *optional*, defaults to `0.5`):
            The old (sampling) policy is updated before each generation batch,
            `θ_old ← η·θ_old + (1 − η)·θ` with `η = min(max(step − flat, 0)·rate, max)` after `step` optimizer
            steps (reference `decay_type=1`; `(75, 7.5e-3, 0.999)` for OCR; `rate=0` trains on-policy).
    """

    guidance_scale: float = field(
        default=1.0,
        metadata={"help": "Classifier-free guidance weight of rollouts (1 = none, DiffusionNFT's)."},
    )
    beta: float = field(
        default=1e-4, metadata={"help": "Weight of the KL term ‖v_θ − v_ref‖² to the base model."}
    )
    nft_beta: float = field(
        default=1.0, metadata={"help": "β of the implicit positive/negative policies, in (0, 1]."}
    )
    timestep_schedule: str = field(
        default="sampler", metadata={"help": "'sampler' (reference) or 'uniform'."}
    )
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Noise levels per image: floor(fraction · num_inference_steps)."}
    )
    timestep_shift: float = field(default=3.0, metadata={"help": "Time shift of the 'uniform' schedule."})
    adaptive_weighting: bool = field(
        default=True, metadata={"help": "The reference's adaptive loss weighting."}
    )
    old_policy_flat_steps: int = field(
        default=0, metadata={"help": "Optimizer steps with an on-policy old model."}
    )
    old_policy_decay_rate: float = field(
        default=1e-3, metadata={"help": "Growth of the old policy's decay per step."}
    )
    old_policy_max_decay: float = field(
        default=0.5, metadata={"help": "Cap of the old policy's decay, in [0, 1]."}
    )

    def _field_rules(self) -> list[Range]:
        return [
            *super()._field_rules(),
            Range("nft_beta", 0, 1, low_open=True, fix="β of the implicit policies; the reference uses 1.0."),
            Range("timestep_fraction", 0, 1, low_open=True),
            Range("timestep_shift", 0, low_open=True, fix="1.0 means no shift."),
            Range("old_policy_flat_steps", 0, integer=True),
            Range(
                "old_policy_decay_rate", 0, fix="0 keeps the old policy equal to the trained one (on-policy)."
            ),
            Range("old_policy_max_decay", 0, 1),
        ]

    def __post_init__(self):
        super().__post_init__()
        check_choice("timestep_schedule", self.timestep_schedule, TIMESTEP_SCHEDULES)

    @property
    def timesteps_per_image(self) -> int:
        """Noise levels each image is trained at per generation batch."""
        return max(1, math.floor(self.timestep_fraction * self.num_inference_steps))
