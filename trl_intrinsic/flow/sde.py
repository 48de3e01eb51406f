"""One reverse step of a flow-matching sampler as a stochastic process, with its log-density.

Flow matching interpolates ``x_σ = (1 − σ)·x0 + σ·ε`` and the model predicts the velocity
``v = ε − x0``. The deterministic sampler takes Euler steps ``x' = x + v·dt`` with
``dt = σ' − σ < 0``. Flow-GRPO replaces it by an SDE with the same marginals so that every step is a
Gaussian policy ``x' ~ N(μ, s²)`` whose log-probability can be differentiated:

``flow_sde`` (Flow-GRPO, Liu et al. 2025), with ``a = noise_level``::

    std = a·sqrt(σ / (1 − σ))                      (σ = 1 uses sigma_max in the denominator)
    μ   = x·(1 + std²·dt / (2σ)) + v·(1 + std²·(1 − σ) / (2σ))·dt
    x'  = μ + std·sqrt(−dt)·ε

``cps`` (coefficient-preserving sampling)::

    std = σ'·sin(aπ/2)
    μ   = (x − σ·v)·(1 − σ') + (x + (1 − σ)·v)·sqrt(σ'² − std²)
    x'  = μ + std·ε

``x − σ·v`` is the model's estimate of the clean sample and ``x + (1 − σ)·v`` its estimate of the
noise, so CPS re-mixes them at level σ' while keeping the total variance of the coefficients.
With ``noise_level = 0`` both reduce to the deterministic Euler step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDE_TYPES = ("flow_sde", "cps")


@dataclass
class SDEStepOutput:
    """Result of :func:`sde_step_with_logprob`.

    Attributes:
        prev_sample: ``x'`` (B, ...), float32: the sample at ``sigma_next``.
        log_prob: (B,) float32: log-density of ``prev_sample`` under ``N(μ, s²)``, averaged over all
            non-batch dimensions (nats per element). Zero for a deterministic step.
        prev_sample_mean: ``μ`` (B, ...), float32: the mean of the step (carries gradients).
        std_dev: (B, 1, ...) float32: ``std`` before the ``sqrt(−dt)`` factor (``flow_sde``) or the
            noise std itself (``cps``); broadcastable against the sample. Used by the KL penalty.
        noise_std: (B, 1, ...) float32: the std of the step's Gaussian, ``std·sqrt(−dt)`` (``flow_sde``)
            or ``std`` (``cps``); 0 for a deterministic step.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev: torch.Tensor
    noise_std: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast a scalar or (B,) sigma to shape (B, 1, ..., 1) in float32 on ``like``'s device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(
            f"`{name}` must be a scalar or have shape (batch,) = ({like.shape[0]},), got {tuple(value.shape)}."
        )
    return value.view(-1, *([1] * (like.ndim - 1)))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_type: str = "flow_sde",
    sigma_max: float | torch.Tensor | None = None,
) -> SDEStepOutput:
    """Take one SDE step from ``sigma`` to ``sigma_next`` and return its Gaussian log-probability.

    Args:
        velocity: model velocity ``v`` at (``sample``, ``sigma``), shape (B, ...).
        sample: current sample ``x`` at noise level ``sigma``, shape (B, ...).
        sigma: current noise level σ in [0, 1], a scalar or (B,).
        sigma_next: next noise level σ' < σ, a scalar or (B,).
        noise_level: ``a ≥ 0``; 0 gives the deterministic Euler (ODE) step.
        prev_sample: if given, the step is not sampled: the log-probability of this ``x'`` is
            evaluated instead (used to recompute log-probs of stored transitions during training).
        generator: RNG(s) for the step noise; a list gives one generator per batch row.
        sde_type: ``"flow_sde"`` (Flow-GRPO) or ``"cps"`` (coefficient-preserving sampling).
        sigma_max: for ``flow_sde`` where σ = 1, replaces σ in the denominator ``1 − σ``;
            conventionally the schedule's second sigma.

    Returns:
        :class:`SDEStepOutput` with ``prev_sample``, ``log_prob`` (B,), ``prev_sample_mean`` and
        ``std_dev``, all in float32.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"`sde_type` must be one of {SDE_TYPES}, got {sde_type!r}.")
    if noise_level < 0 or not math.isfinite(noise_level):
        raise ValueError(f"`noise_level` must be a finite number ≥ 0, got {noise_level}.")
    if velocity.shape != sample.shape:
        raise ValueError(
            f"`velocity` {tuple(velocity.shape)} and `sample` {tuple(sample.shape)} must have the same shape."
        )
    x = sample.float()
    v = velocity.float()
    s = _per_sample(sigma, x, "sigma")
    s_next = _per_sample(sigma_next, x, "sigma_next")
    dt = s_next - s

    if sde_type == "flow_sde":
        at_one = s >= 1.0
        if sigma_max is None and bool(at_one.any()):
            raise ValueError(
                "`sigma_max` is required for a `flow_sde` step from sigma = 1: pass the schedule's second sigma."
            )
        denominator = (
            torch.where(at_one, _per_sample(sigma_max, x, "sigma_max"), s) if sigma_max is not None else s
        )
        std = noise_level * torch.sqrt(s / (1.0 - denominator))
        mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        noise_scale = std * torch.sqrt(-dt)
    else:
        std = s_next * math.sin(noise_level * math.pi / 2)
        mean = (x - s * v) * (1 - s_next) + (x + (1 - s) * v) * torch.sqrt((s_next**2 - std**2).clamp_min(0))
        noise_scale = std

    if prev_sample is None:
        if noise_level == 0:
            prev_sample = mean
        else:
            noise = _randn_like(mean, generator)
            prev_sample = mean + noise_scale * noise
    prev_sample = prev_sample.float()

    # A deterministic step (zero noise: noise_level = 0, or CPS into sigma = 0) has no density: log p = 0.
    stochastic = noise_scale > 0
    scale = torch.where(stochastic, noise_scale, torch.ones_like(noise_scale))
    log_density = (
        -((prev_sample.detach() - mean) ** 2) / (2 * scale**2)
        - torch.log(scale)
        - 0.5 * math.log(2 * math.pi)
    )
    log_density = torch.where(stochastic, log_density, torch.zeros_like(log_density))
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))
    return SDEStepOutput(
        prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev=std, noise_std=noise_scale
    )


def _randn_like(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; one generator per row when a list is given."""
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {x.shape[0]}.")
        return torch.stack(
            [
                torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
                for g in generator
            ]
        )
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
