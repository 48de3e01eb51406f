"""DiffusionNFT: online RL for flow models on the forward (noising) process.

Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117;
reference code ``NVlabs/DiffusionNFT`` (``scripts/train_nft_sd3.py``, ``config/nft.py``).

One iteration ``i``, with a sampling ("old") policy ``v_old`` and the trained policy ``v_θ``:

1. Sample G images per prompt with ``v_old`` using *any* solver (no likelihoods, no CFG); keep only
   the clean latents ``x0`` and their rewards.
2. Group-normalised advantages ``A`` → optimality probabilities ``r = clip(½ + A/(2·A_max), 0, 1)``
   (:func:`optimality_probability`).
3. Re-noise each ``x0`` on the forward process: ``t`` (:func:`sample_nft_timesteps`), ``ε ~ N(0, I)``,
   ``x_t = (1 − t)·x0 + t·ε``, flow-matching target ``v = ε − x0`` (:func:`forward_noise`).
4. Minimise, with the implicit positive and negative policies
   ``v⁺ = (1 − β)·v_old + β·v_θ`` and ``v⁻ = (1 + β)·v_old − β·v_θ`` (:func:`nft_loss`)::

       L(θ) = E[ r·‖v⁺(x_t) − v‖² + (1 − r)·‖v⁻(x_t) − v‖² ]

   Its minimiser is ``v_θ* = v_old + (2/β)·α(x_t)·(v_pos − v_old)`` with ``α(x_t) = E[r | x_t]`` and
   ``v_pos`` the velocity field of the reward-tilted data: a guidance direction trained into one model
   instead of applied at sampling time. With ``r = ½`` everywhere, ``v_θ* = v_old``: the gradient at
   ``v_θ = v_old`` vanishes.
5. Soft-update the sampling policy ``θ_old ← η_i·θ_old + (1 − η_i)·θ`` (:func:`old_policy_decay`,
   :func:`~trl_intrinsic.ema.ema_update_`); ``η_i`` grows with ``i``: on-policy early, more off-policy (stabler) later.

Optionally (reference, not the paper's objective) add ``β_KL·‖v_θ − v_ref‖²`` towards the base model
(:func:`kl_to_reference`).

Where the reference code and the paper differ (default = what this module does; every choice is a
knob):

- **Regression space and weighting.** The paper's objective and pseudocode regress velocities with
  uniform weight. The reference regresses x0-predictions ``x̂0± = x_t − t·v±`` and divides each
  per-sample term by its stop-gradient mean ``|x̂0± − x0|`` (floored at 1e-5): the "adaptive loss
  weighting" the paper motivates in its practical-design section; the maintainers call it the trick
  that stabilises training (NVlabs/DiffusionNFT#13). Since ``x_t = x0 + t·v``,
  ``x̂0± − x0 = t·(v − v±)``, so the term is ``t·‖v − v±‖² / mean|v − v±|``. Default: reference
  (``adaptive_weighting=True``); ``False`` gives the paper's plain velocity loss.
- **Final scale.** The reference multiplies the per-sample loss by ``adv_clip_max / β``; the paper
  has no such factor. ``∂L/∂v_θ`` is proportional to β and, through ``r − ½ = A/(2·A_max)``, to
  ``1/A_max``, so the factor makes the update size independent of both (the reference's learning rate 3e-4
  goes with it). Default: reference (``rescale=True``).
- **Optimality probability.** The paper writes ``r = ½ + ½·clip((R − E[R])/Z_c, −1, 1)`` with a free
  normaliser ``Z_c``; the reference fixes ``Z_c = adv_clip_max·(std + 1e-4)`` (A_max = 5) with per-prompt
  means and the std of *all raw rewards* of the gathered batch (``global_std=True``). Same formula;
  we take advantages already normalised by the trainer and expose ``adv_clip_max``. The reference's
  ``adv_mode`` variants (positive/negative-only, binary) are unused by its configs and not provided.
- **Timesteps.** The paper's objective is an expectation over continuous ``t`` (the maintainers:
  training times are independent of the sampling steps, NVlabs/DiffusionNFT#5). The reference draws
  ``t`` from the sampler's own shifted schedule (SD3.5, 10 steps: 1.0, 0.96, …, 0.28, 0.0089), taking
  ``⌊10 × 0.99⌋ = 9`` distinct ones per image per epoch without replacement, each with fresh noise,
  and accumulates all of them into one optimizer step. ``t = 1`` (pure noise) is included.
  Default: reference (``schedule="sampler"``, ``k`` timesteps per image); ``"uniform"`` (with an
  optional SD3-style ``shift``) is the continuous alternative.
- **Old policy.** The paper soft-updates θ_old with an increasing η_i. The reference keeps θ_old as a
  second LoRA adapter ("old"), initialised equal to θ, samples every rollout with it, and updates it
  once per epoch, after that epoch's optimizer steps, with ``η = min(max(step − flat, 0)·rate, cap)``
  where ``step`` counts optimizer steps so far: ``(flat, rate, cap) = (0, 1e-3, 0.5)`` by default,
  ``(75, 7.5e-3, 0.999)`` for OCR, ``(0, 0, 0)`` = fully on-policy. We follow the reference
  (:data:`REFERENCE_DECAY_SCHEDULES`).
- **KL to the base model.** Not in the paper's objective; the reference adds
  ``1e-4 · mean‖v_θ − v_ref‖²`` (reference = LoRA disabled). Provided separately; the caller weights it.
- **Precision.** The reference computes the adaptive normaliser in float64 (which silently makes its
  whole loss float64). We compute the normaliser in float64 and the loss in at least float32: the
  difference is rounding only.
- **Evaluation weights.** The reference also keeps a plain EMA of θ (decay ``min((1 + s)/(10 + s), 0.9)``
  per optimizer step ``s``) used only for evaluation and saved checkpoints; it is not part of the
  algorithm and not implemented here (:func:`~trl_intrinsic.ema.ema_update_` serves it too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = [
    "REFERENCE_DECAY_SCHEDULES",
    "TIMESTEP_SCHEDULES",
    "forward_noise",
    "kl_to_reference",
    "nft_loss",
    "old_policy_decay",
    "optimality_probability",
    "sample_nft_timesteps",
]

TIMESTEP_SCHEDULES = ("sampler", "uniform")

#: Keyword arguments of :func:`old_policy_decay` for the reference's ``decay_type`` 0, 1 and 2.
REFERENCE_DECAY_SCHEDULES: dict[str, dict[str, float]] = {
    "on_policy": {"flat_steps": 0, "rate": 0.0, "max_decay": 0.0},  # decay_type 0
    "default": {"flat_steps": 0, "rate": 1e-3, "max_decay": 0.5},  # decay_type 1 (GenEval, PickScore, …)
    "ocr": {"flat_steps": 75, "rate": 7.5e-3, "max_decay": 0.999},  # decay_type 2 (OCR)
}


def _check_positive(name: str, value: float, fix: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}; {fix}")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise ValueError(
            f"`beta` must be in (0, 1], got {beta!r}: it is the weight of v_θ in the implicit positive "
            "policy v⁺ = (1 − β)·v_old + β·v_θ; use the reference's 1.0 (0.1 for OCR or multi-reward)."
        )


def _per_sample(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(
            f"`{name}` must have shape (batch,) = ({like.shape[0]},), got {tuple(value.shape)}; "
            f"pass one value per sample."
        )
    return value


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """Map group-normalised advantages to the optimality probability ``r ∈ [0, 1]``.

    ``r = clip(A / (2·adv_clip_max) + ½, 0, 1)``: ``A = 0`` → ½ (neither positive nor negative),
    ``A ≥ adv_clip_max`` → 1 (positive only), ``A ≤ −adv_clip_max`` → 0 (negative only). This is the
    paper's ``½ + ½·clip((R − E[R])/Z_c, −1, 1)`` with ``Z_c = adv_clip_max·std``.

    Args:
        advantages: (N,) or any shape, dimensionless (rewards minus group mean, over a std).
        adv_clip_max: advantage at which ``r`` saturates (reference: 5).

    Returns:
        Tensor of the same shape and dtype, in [0, 1] (NaN stays NaN).
    """
    _check_positive("adv_clip_max", adv_clip_max, "the reference uses 5.")
    return (advantages / (2.0 * adv_clip_max) + 0.5).clamp(0.0, 1.0)


def sample_nft_timesteps(
    n: int,
    generator: torch.Generator | None = None,
    *,
    schedule: Literal["sampler", "uniform"] = "sampler",
    sigmas: torch.Tensor | Sequence[float] | None = None,
    k: int | None = None,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the noise levels ``t`` at which clean samples are re-noised for the NFT loss.

    ``schedule="sampler"`` (reference): ``t`` is drawn from the sampler's own sigmas (the schedule the
    rollouts used, decreasing, possibly ending in the terminal 0, which is dropped); with ``k`` the
    ``k`` times of one sample are distinct (a random subset without replacement, as the reference's
    per-sample permutation, which uses ``k = ⌊num_steps·timestep_fraction⌋``).

    ``schedule="uniform"``: ``u ~ U[t_min, t_max)`` i.i.d., then the SD3 time shift
    ``t = shift·u / (1 + (shift − 1)·u)`` (``shift = 1`` leaves ``u`` unchanged; ``shift > 1`` favours
    high noise like the SD3.5 sampling schedule, shift 3).

    Args:
        n: number of samples N.
        generator: random generator (CPU or on ``device``); draws are made on its device.
        schedule: "sampler" or "uniform".
        sigmas: the sampling sigmas in [0, 1], required for "sampler".
        k: timesteps per sample; None returns shape (N,), an int returns (N, k).
        shift: time shift for "uniform" (> 0).
        t_min, t_max: range of ``u`` for "uniform", 0 ≤ t_min < t_max ≤ 1.
        device: device of the result (default: the generator's, else CPU).

    Returns:
        float32 tensor (N,) or (N, k) of noise levels ``t`` in [0, 1] (flow-matching sigma, not the
        ×1000 transformer timestep).
    """
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f"`n` must be an int ≥ 0, got {n!r}; pass the number of samples.")
    if k is not None and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"`k` must be None or an int ≥ 1, got {k!r}; pass the timesteps per sample.")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    out_device = torch.device(device) if device is not None else draw_device
    width = 1 if k is None else k
    if schedule == "sampler":
        if sigmas is None:
            raise ValueError(
                "`sigmas` is None but schedule='sampler' needs the sampler's sigmas; pass "
                "sigmas=<the rollout's sigma schedule> or use schedule='uniform'."
            )
        pool = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
        if pool.numel() and bool(((pool < 0) | (pool > 1)).any()):
            raise ValueError(
                f"`sigmas` must lie in [0, 1], got {pool.tolist()}; pass flow-matching sigmas, not the "
                "×1000 transformer timesteps."
            )
        pool = pool[pool > 0]
        if pool.numel() < width:
            raise ValueError(
                f"`k`={k} exceeds the {pool.numel()} non-zero `sigmas`; use k ≤ {pool.numel()} or more "
                "sampling steps."
            )
        order = torch.rand(n, pool.numel(), generator=generator, device=draw_device).argsort(dim=1)
        t = pool.to(draw_device)[order[:, :width]]
    elif schedule == "uniform":
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"need 0 ≤ `t_min` < `t_max` ≤ 1, got t_min={t_min!r}, t_max={t_max!r}.")
        _check_positive("shift", shift, "use 1.0 for no shift (SD3.5 samples with 3.0).")
        u = t_min + (t_max - t_min) * torch.rand(n, width, generator=generator, device=draw_device)
        t = shift * u / (1.0 + (shift - 1.0) * u)
    else:
        raise ValueError(f"`schedule` must be one of {TIMESTEP_SCHEDULES}, got {schedule!r}.")
    t = t.to(out_device)
    return t[:, 0] if k is None else t


def forward_noise(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching forward process at noise level ``t``.

    Args:
        x0: (N, ...) clean latents.
        t: (N,) noise levels in [0, 1].
        noise: (N, ...) ``ε ~ N(0, I)``, same shape as ``x0``.

    Returns:
        ``(x_t, v)``: ``x_t = (1 − t)·x0 + t·ε`` and the target velocity ``v = ε − x0``, both (N, ...)
        in at least float32. Note ``x_t = x0 + t·v``.
    """
    if noise.shape != x0.shape:
        raise ValueError(
            f"`noise` must have the shape of `x0` {tuple(x0.shape)}, got {tuple(noise.shape)}; "
            "draw it with torch.randn_like(x0)."
        )
    _per_sample(t, x0, "t")
    dtype = torch.promote_types(torch.promote_types(x0.dtype, noise.dtype), torch.float32)
    x0, noise = x0.to(dtype), noise.to(dtype)
    tb = t.to(dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tb) * x0 + tb * noise, noise - x0


def _regression(
    v_pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    dims: tuple[int, ...],
    adaptive_weighting: bool,
    weight_eps: float,
) -> torch.Tensor:
    """Per-sample (N,) regression of one implicit policy onto the flow-matching target."""
    if not adaptive_weighting:
        return ((v_pred - target) ** 2).mean(dim=dims)
    x0_error = t * (target - v_pred)  # x̂0 − x0 = (x_t − t·v_pred) − x0, since x_t = x0 + t·v
    with torch.no_grad():
        norm = x0_error.double().abs().mean(dim=dims, keepdim=True).clamp_min(weight_eps)
    return (x0_error**2 / norm.to(x0_error.dtype)).mean(dim=dims)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    *,
    adaptive_weighting: bool = True,
    rescale: bool = True,
    adv_clip_max: float = 5.0,
    weight_eps: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT policy loss ``mean_N[ r·L(v⁺) + (1 − r)·L(v⁻) ]`` (× ``adv_clip_max/β``).

    ``v⁺ = (1 − β)·v_old + β·v_θ`` and ``v⁻ = (1 + β)·v_old − β·v_θ``. Per sample, ``L(u)`` is

    - ``adaptive_weighting=True`` (reference): with the x0-prediction error
      ``e = x̂0 − x0 = (x_t − t·u) − x0 = t·(v − u)``, ``L(u) = mean(e²) / sg(max(mean|e|, weight_eps))``;
    - ``adaptive_weighting=False`` (paper): ``L(u) = mean((u − v)²)``;

    means over all non-batch dims. ``rescale=True`` (reference) multiplies by ``adv_clip_max/β``.

    Args:
        v_theta: (N, ...) velocity of the trained policy at ``(x_t, t, c)``, with gradients.
        v_old: (N, ...) velocity of the sampling (old) policy at the same inputs; detached here.
        target: (N, ...) flow-matching target ``v = ε − x0`` (from :func:`forward_noise`).
        t: (N,) noise levels of ``x_t``, in [0, 1].
        r: (N,) optimality probabilities in [0, 1] (:func:`optimality_probability`).
        beta: guidance strength β ∈ (0, 1] (reference: 1.0; 0.1 for OCR and multi-reward).
        adaptive_weighting: reference x0-space self-normalised weighting vs the paper's plain loss.
        rescale: multiply by ``adv_clip_max / β`` as the reference does.
        adv_clip_max: the ``adv_clip_max`` used to build ``r`` (only used when ``rescale``).
        weight_eps: floor of the adaptive normaliser, in x0 units (reference: 1e-5).

    Returns:
        ``(loss, stats)``: the scalar loss (at least float32) and detached 0-dim statistics:
        ``positive_loss`` / ``negative_loss`` (batch means of the two terms), ``unscaled_loss`` (the
        loss before ``rescale``), ``old_deviation`` (mean ``(v_θ − v_old)²``) and ``r_mean``.
    """
    _check_beta(beta)
    if rescale:
        _check_positive("adv_clip_max", adv_clip_max, "pass the value used in optimality_probability (5).")
    _check_positive("weight_eps", weight_eps, "the reference uses 1e-5.")
    for name, value in (("v_old", v_old), ("target", target)):
        if value.shape != v_theta.shape:
            raise ValueError(
                f"`{name}` must have the shape of `v_theta` {tuple(v_theta.shape)}, got {tuple(value.shape)}; "
                "evaluate both policies on the same x_t batch."
            )
    if v_theta.ndim < 2:
        raise ValueError(
            f"`v_theta` must be (N, ...) with at least one non-batch dim, got shape {tuple(v_theta.shape)}."
        )
    _per_sample(t, v_theta, "t")
    _per_sample(r, v_theta, "r")
    if r.numel() and bool(((r < 0) | (r > 1)).any()):
        raise ValueError(
            f"`r` must lie in [0, 1], got values in [{r.min().item()}, {r.max().item()}]; "
            "map advantages with optimality_probability()."
        )
    if t.numel() and bool(((t < 0) | (t > 1)).any()):
        raise ValueError(
            f"`t` must lie in [0, 1], got values in [{t.min().item()}, {t.max().item()}]; "
            "pass flow-matching sigmas, not ×1000 timesteps."
        )

    dtype = torch.promote_types(v_theta.dtype, torch.float32)
    v_theta = v_theta.to(dtype)
    v_old = v_old.detach().to(dtype)
    target = target.to(dtype)
    dims = tuple(range(1, v_theta.ndim))
    tb = t.to(dtype).view(-1, *([1] * len(dims)))
    r = r.to(dtype)

    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    positive = _regression(v_pos, target, tb, dims, adaptive_weighting, weight_eps)
    negative = _regression(v_neg, target, tb, dims, adaptive_weighting, weight_eps)
    per_sample = r * positive + (1 - r) * negative
    unscaled = per_sample.mean()
    loss = unscaled * (adv_clip_max / beta) if rescale else unscaled

    stats = {
        "positive_loss": positive.mean().detach(),
        "negative_loss": negative.mean().detach(),
        "unscaled_loss": unscaled.detach(),
        "old_deviation": ((v_theta - v_old) ** 2).mean().detach(),
        "r_mean": r.mean().detach(),
    }
    return loss, stats


def kl_to_reference(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample squared velocity distance to the reference (base) model.

    The reference adds ``β_KL · kl_to_reference(v_θ, v_ref).mean()`` to the loss (β_KL = 1e-4), with
    ``v_ref`` the base model (LoRA disabled) at the same ``(x_t, t, c)``.

    Args:
        v_theta: (N, ...) trained-policy velocity, with gradients.
        v_ref: (N, ...) reference velocity (detached here).

    Returns:
        (N,) ``mean over non-batch dims of (v_θ − v_ref)²``, at least float32.
    """
    if v_ref.shape != v_theta.shape or v_theta.ndim < 2:
        raise ValueError(
            f"`v_ref` must have the shape of `v_theta` (N, ...) {tuple(v_theta.shape)}, got "
            f"{tuple(v_ref.shape)}; evaluate both models on the same x_t batch."
        )
    dtype = torch.promote_types(v_theta.dtype, torch.float32)
    diff = v_theta.to(dtype) - v_ref.detach().to(dtype)
    return (diff**2).mean(dim=tuple(range(1, diff.ndim)))


def old_policy_decay(step: int, *, flat_steps: int = 0, rate: float = 1e-3, max_decay: float = 0.5) -> float:
    """The reference's decay ``η`` of the old (sampling) policy after ``step`` optimizer steps.

    ``η = 0`` while ``step < flat_steps`` (θ_old ← θ, on-policy), then
    ``η = min((step − flat_steps)·rate, max_decay)``; the update is ``θ_old ← η·θ_old + (1 − η)·θ``.
    The defaults are the reference's ``decay_type=1``; see :data:`REFERENCE_DECAY_SCHEDULES`.

    Args:
        step: optimizer steps taken so far (the reference calls this once per epoch, after training).
        flat_steps: steps during which the old policy just copies θ.
        rate: growth of η per step.
        max_decay: cap of η, in [0, 1].

    Returns:
        η in [0, max_decay].
    """
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"`step` must be an int ≥ 0, got {step!r}; pass the number of optimizer steps.")
    if not (isinstance(flat_steps, int) and flat_steps >= 0):
        raise ValueError(f"`flat_steps` must be an int ≥ 0, got {flat_steps!r}.")
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
        raise ValueError(f"`rate` must be a finite number ≥ 0, got {rate!r}; the reference uses 1e-3.")
    if not (isinstance(max_decay, (int, float)) and 0 <= max_decay <= 1):
        raise ValueError(f"`max_decay` must be in [0, 1], got {max_decay!r}; the reference uses 0.5.")
    if step < flat_steps:
        return 0.0
    return float(min((step - flat_steps) * rate, max_decay))
