"""GRPO maths shared by the trainers: group advantages, the clipped objective and the Flow-GRPO KL.

For a prompt group g with rewards ``r_i``::

    A_i = (r_i − mean_g(r)) / (std + 1e-4)

where ``std`` is the group's standard deviation (``scale_rewards="group"``), that of all the rewards
of the gathered batch (``"batch"``: Flow-GRPO's ``global_std`` and TRL's ``"batch"``) or 1
(``"none"``). Advantages are clipped to ``±adv_clip_max``. With the ratio ``ρ = exp(log p − log p_old)`` the per-sample loss is::

    max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))

and the Flow-GRPO KL between two Gaussian steps with a shared std is
``‖μθ − μref‖² / (2·std²)`` averaged over the sample's elements. GRPO-Guard's normalised ratio of a flow
SDE step is :func:`ratio_norm_log_ratio`.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")


def normalize_scale_rewards(scale_rewards: str | bool) -> str:
    """Map TRL's accepted values (``True``/``False`` included) to "group", "batch" or "none"."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"`scale_rewards` must be one of {SCALE_REWARDS} (or a bool), got {scale_rewards!r}."
        )
    return scale_rewards


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale_rewards: str | bool = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-prompt-group normalised advantages.

    Args:
        rewards: (N,) rewards of the whole gathered batch; NaN marks a sample no reward scored.
        group_ids: (N,) integer prompt-group id of each sample.
        scale_rewards: "group", "batch" or "none" (see module docstring).
        eps: added to the std.

    Returns:
        (N,) advantages; 0 for NaN rewards. Standard deviations are population (ddof = 0) and
        ignore NaN entries.
    """
    scale_rewards = normalize_scale_rewards(scale_rewards)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"`rewards` and `group_ids` must both have shape (N,), got {tuple(rewards.shape)} and {tuple(group_ids.shape)}."
        )
    rewards = rewards.float()
    valid = ~torch.isnan(rewards)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = torch.zeros(num_groups, device=rewards.device).index_add_(0, inverse, valid.float())
    total = torch.zeros(num_groups, device=rewards.device).index_add_(0, inverse, filled)
    mean = (total / count.clamp_min(1))[inverse]
    centered = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        sq = torch.zeros(num_groups, device=rewards.device).index_add_(0, inverse, centered**2)
        std = torch.sqrt(sq / count.clamp_min(1))[inverse]
    elif scale_rewards == "batch":  # the std of the raw rewards of the whole batch, as Flow-GRPO and TRL
        batch_mean = filled.sum() / valid.sum().clamp_min(1)
        spread = torch.where(valid, rewards - batch_mean, torch.zeros_like(rewards))
        std = torch.sqrt((spread**2).sum() / valid.sum().clamp_min(1)).expand_as(rewards)
    return centered / (std + eps)


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    adv_clip_max: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO/PPO surrogate, averaged over the batch.

    Args:
        log_prob: (B,) log-probabilities under the current policy (with gradients).
        old_log_prob: (B,) log-probabilities under the sampling policy.
        advantages: (B,) advantages.
        epsilon_low: lower clipping width: the ratio is clipped to ``[1 − epsilon_low, 1 + epsilon_high]``.
        epsilon_high: upper clipping width.
        adv_clip_max: if set, advantages are clipped to ``±adv_clip_max`` first.

    Returns:
        The scalar loss and detached statistics: ``ratio`` (B,) and ``clipped`` (B,) bool.
    """
    return clipped_ratio_loss(
        log_prob - old_log_prob,
        advantages,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        adv_clip_max=adv_clip_max,
    )


def clipped_ratio_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    adv_clip_max: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`clipped_policy_loss` for a given log-ratio ``log ρ`` (B,), e.g. GRPO-Guard's normalised one."""
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"ratio": ratio.detach(), "clipped": (clipped > unclipped).detach()}
    return loss, stats


def ratio_norm_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    noise_std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio of one Gaussian SDE step (Wang et al. 2025, arXiv 2510.22319).

    For a step ``x' = μ_old + s·ε`` of the sampling policy and the current mean ``μ = μ_old + Δμ``, the
    per-element log-ratio is ``ε·Δμ / s − Δμ² / (2s²)``: its mean is negative whenever the policy moved,
    and its spread scales with ``1/s``, which differs by orders of magnitude between timesteps, so a
    fixed clipping range is too wide at some steps and too narrow at others. RatioNorm adds the bias
    back and removes the scale::

        log ρ̂ = (log p − log p_old + mean(Δμ²) / (2s²)) · s  =  mean(ε·Δμ)

    Args:
        log_prob: (B,) log-density of the stored ``x'`` under the current policy (nats per element,
            averaged over the non-batch dimensions, as :func:`~trl_intrinsic.flow.sde.sde_step_with_logprob`
            returns it).
        old_log_prob: (B,) the same under the sampling policy.
        mean: (B, ...) the current step mean ``μ`` (with gradients).
        old_mean: (B, ...) the sampling policy's step mean ``μ_old``.
        noise_std: broadcastable to (B, 1, ...): the step's noise std ``s`` (``SDEStepOutput.noise_std``).

    Returns:
        (B,) the normalised log-ratio.
    """
    dims = tuple(range(1, mean.ndim))
    s = noise_std.reshape(noise_std.shape[0], -1)[:, 0] if noise_std.ndim else noise_std
    bias = (mean - old_mean).pow(2).mean(dim=dims) / (2 * s**2)
    return (log_prob - old_log_prob + bias) * s


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std_dev: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps sharing ``std_dev``: ``‖μ − μref‖² / (2·std²)``.

    Args:
        mean: (B, ...) step means of the policy.
        ref_mean: (B, ...) step means of the reference.
        std_dev: broadcastable to ``mean``; the step std before the ``sqrt(−dt)`` factor.

    Returns:
        (B,) KL averaged over the non-batch dimensions.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std_dev**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))


AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def combine_rewards(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale_rewards: str | bool = "group",
    aggregation: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages from several rewards, with TRL's two aggregation modes.

    ``"sum_then_normalize"``: the weighted sum of the rewards (NaN entries skipped) is normalised per
    group with ``scale_rewards``. ``"normalize_then_sum"`` (the SOLACE authors' hybrid mode, GDPO):
    each reward is first normalised within its groups, so rewards of different scales contribute
    alike, then the weighted sum is standardised over the batch.

    Args:
        rewards_per_func: (N, F) rewards of the gathered batch; NaN where a reward returned None.
        weights: (F,) reward weights.
        group_ids: (N,) prompt-group ids.

    Returns:
        ``(advantages (N,), rewards (N,))``: advantages are 0 where every reward is NaN; ``rewards`` is
        the weighted sum of the raw rewards (NaN where every reward is NaN), for logging.
    """
    if rewards_per_func.ndim != 2 or rewards_per_func.shape[1] != weights.shape[0]:
        raise ValueError(
            f"`rewards_per_func` must be (N, {weights.shape[0]}), got {tuple(rewards_per_func.shape)}."
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`multi_objective_aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}.")
    unscored = torch.isnan(rewards_per_func).all(dim=1)
    weights = weights.to(rewards_per_func)
    rewards = (rewards_per_func * weights).nansum(dim=1)
    rewards[unscored] = torch.nan
    if aggregation == "sum_then_normalize":
        advantages = group_advantages(rewards, group_ids, scale_rewards=scale_rewards, eps=eps)
    else:
        per_func = torch.stack(
            [
                torch.where(
                    torch.isnan(column),
                    torch.full_like(column, torch.nan),
                    group_advantages(column, group_ids, scale_rewards="group", eps=eps),
                )
                for column in rewards_per_func.T
            ],
            dim=1,
        )
        summed = (per_func * weights).nansum(dim=1)
        summed[unscored] = torch.nan
        valid = ~unscored
        mean = summed[valid].mean() if valid.any() else summed.new_zeros(())
        std = summed[valid].std(unbiased=False) if valid.sum() > 1 else summed.new_zeros(())
        advantages = torch.where(valid, (summed - mean) / (std + eps), torch.zeros_like(summed))
    return torch.nan_to_num(advantages, nan=0.0), rewards
