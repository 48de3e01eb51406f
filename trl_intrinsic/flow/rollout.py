"""Sampling trajectories from a flow-matching pipeline with a stochastic window (Flow-GRPO).

A rollout integrates the sampler from pure noise (σ ≈ 1) to an image latent (σ = 0). Steps inside
the *SDE window* are stochastic (:func:`~trl_intrinsic.flow.sde.sde_step_with_logprob` with
``noise_level > 0``) and carry a log-probability; steps outside it are the deterministic Euler (ODE)
steps of the pipeline's own sampler. By default the window is every step but the terminal one
(σ' = 0, which is never trained); Flow-GRPO-Fast draws a short window of ``window_size`` steps at a
random position instead, and trains only there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trl_intrinsic.flow.pipelines import FlowPipelineAdapter, PromptEmbeddings
from trl_intrinsic.flow.sde import sde_step_with_logprob


@dataclass
class Rollout:
    """A batch of B sampled trajectories over S sampler steps.

    Attributes:
        latents: (B, S+1, *latent_shape) float32: ``x`` at every sigma; ``latents[:, -1]`` is the final z0.
        log_probs: (B, S) float32: log-density of each step (nats per latent element); 0 for ODE steps.
        sigmas: (S+1,) float32 schedule, decreasing to 0.
        timesteps: (S,) float32 scheduler timesteps (``sigma · num_train_timesteps``).
        sde_steps: indices of the stochastic steps (the SDE window), ascending.
        rows: LongTensor (B,): the prompt (index into the encoded unique prompts) of each trajectory.
        means: (B, S, *latent_shape) float32 mean of every step's Gaussian (equal to the next latent for ODE
            steps), or ``None`` when not recorded (``record_means=False``).
        uncond: (B, len(record_uncond), *latent_shape) float32 unconditional velocity at the steps of
            ``record_uncond``, or ``None`` (not recorded, or no classifier-free guidance).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    sde_steps: list[int]
    rows: torch.Tensor
    means: torch.Tensor | None = None
    uncond: torch.Tensor | None = None

    @property
    def final_latents(self) -> torch.Tensor:
        """(B, *latent_shape) the sampled image latents z0."""
        return self.latents[:, -1]


def sde_window(
    num_steps: int,
    *,
    window_size: int | None = None,
    window_range: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Indices of the stochastic steps of an ``num_steps``-step sampler.

    Args:
        num_steps: S, the number of sampler steps.
        window_size: length of a Flow-GRPO-Fast window; ``None`` or 0 means every step but the last.
        window_range: ``(lo, hi)``: the window lies within steps ``lo … hi − 1``; defaults to
            ``(0, S − 1)`` so the terminal step stays deterministic.
        generator: draws the window start uniformly (seed it identically on every process).

    Returns:
        The ascending step indices of the window.
    """
    if num_steps < 2:
        raise ValueError(
            f"`num_inference_steps` must be at least 2 to leave a trainable step, got {num_steps}."
        )
    if not window_size:
        return list(range(num_steps - 1))
    lo, hi = (0, num_steps - 1) if window_range is None else (int(window_range[0]), int(window_range[1]))
    if not 0 <= lo < hi <= num_steps - 1:
        raise ValueError(
            f"`sde_window_range` {tuple(window_range)} must satisfy 0 <= lo < hi <= num_inference_steps - 1 "
            f"= {num_steps - 1} (the terminal step is never stochastic)."
        )
    if not 0 < window_size <= hi - lo:
        raise ValueError(
            f"`sde_window_size` ({window_size}) must be between 1 and the width of `sde_window_range` "
            f"({hi - lo} steps)."
        )
    start = lo + int(torch.randint(0, hi - lo - window_size + 1, (1,), generator=generator))
    return list(range(start, start + window_size))


def train_step_indices(sde_steps: Sequence[int], fraction: float, selection: str = "prefix") -> list[int]:
    """The ⌈fraction · |window|⌉ steps of the window that are trained: its first (``"prefix"``, Flow-GRPO)
    or last (``"suffix"``, SOLACE's later, low-noise steps) ones."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`timestep_fraction` must be in (0, 1], got {fraction}.")
    if selection not in ("prefix", "suffix"):
        raise ValueError(f"`timestep_selection` must be 'prefix' or 'suffix', got {selection!r}.")
    n = max(1, math.ceil(fraction * len(sde_steps) - 1e-9))
    steps = list(sde_steps)
    return steps[:n] if selection == "prefix" else steps[-n:]


@torch.no_grad()
def sample_trajectories(
    adapter: FlowPipelineAdapter,
    embeddings: PromptEmbeddings,
    rows: torch.Tensor,
    initial_latents: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    sde_steps: Sequence[int],
    guidance_scale: float,
    noise_level: float,
    sde_type: str = "flow_sde",
    generator: torch.Generator | None = None,
    transformer: torch.nn.Module | None = None,
    record_means: bool = False,
    record_uncond: Sequence[int] = (),
) -> Rollout:
    """Integrate the sampler from ``initial_latents`` and record every latent and step log-probability.

    Args:
        adapter: the pipeline adapter.
        embeddings: encoded unique prompts; ``rows`` (LongTensor (B,)) maps trajectories to prompts.
        initial_latents: (B, *latent_shape) noise at ``sigmas[0]``.
        sigmas: (S+1,) schedule; ``timesteps``: (S,) the matching scheduler timesteps.
        sde_steps: indices of the stochastic steps; all others are deterministic Euler steps.
        guidance_scale: classifier-free guidance weight (≤ 1: conditional only).
        noise_level: ``a`` of the SDE (0 reproduces the deterministic sampler everywhere).
        sde_type: ``"flow_sde"`` or ``"cps"``.
        generator: draws the SDE noise.
        transformer: module to call (defaults to the pipeline's transformer).
        record_means: also keep every step's mean (``Rollout.means``; GRPO-Guard needs the sampling policy's).
        record_uncond: steps whose unconditional velocity is kept (``Rollout.uncond``), so that training on the
            same weights need not recompute it.
    """
    num_steps = len(timesteps)
    if sigmas.shape != (num_steps + 1,):
        raise ValueError(f"`sigmas` must have shape ({num_steps + 1},), got {tuple(sigmas.shape)}.")
    stochastic = set(sde_steps)
    x = initial_latents.float()
    latents, log_probs, means, uncond = [x], [], [], []
    for i in range(num_steps):
        velocity, v_uncond = adapter.predict_velocity(
            x,
            timesteps[i],
            embeddings,
            rows,
            guidance_scale=guidance_scale,
            transformer=transformer,
            return_uncond=True,
        )
        if i in record_uncond and v_uncond is not None:
            uncond.append(v_uncond)
        step = sde_step_with_logprob(
            velocity,
            x,
            sigmas[i],
            sigmas[i + 1],
            noise_level=noise_level if i in stochastic else 0.0,
            generator=generator,
            sde_type=sde_type,
            sigma_max=sigmas[1],
        )
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
        if record_means:
            means.append(step.prev_sample_mean)
    return Rollout(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        sigmas=sigmas,
        timesteps=timesteps,
        sde_steps=sorted(stochastic),
        rows=rows,
        means=torch.stack(means, dim=1) if record_means else None,
        uncond=torch.stack(uncond, dim=1) if uncond else None,
    )
