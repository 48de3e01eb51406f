"""GRPO maths shared by the trainers: group advantages, the clipped objective and the Flow-GRPO KL.

For a prompt group g with rewards ``r_i``::

    A_i = (r_i − mean_g(r)) / (std + 1e-4)

where ``std`` is the group's standard deviation (``scale_rewards="group"``), that of the whole
gathered batch (``"batch"``, Flow-GRPO's default) or 1 (``"none"``). Advantages are clipped to
``±adv_clip_max``. With the ratio ``ρ = exp(log p − log p_old)`` the per-sample loss is::

    max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))

and the Flow-GRPO KL between two Gaussian steps with a shared std is
``‖μθ − μref‖² / (2·std²)`` averaged over the sample's elements.
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
    elif scale_rewards == "batch":
        std = torch.sqrt((centered**2).sum() / valid.sum().clamp_min(1)).expand_as(rewards)
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
        epsilon_low, epsilon_high: the ratio is clipped to ``[1 − epsilon_low, 1 + epsilon_high]``.
        adv_clip_max: if set, advantages are clipped to ``±adv_clip_max`` first.

    Returns:
        The scalar loss and detached statistics: ``ratio`` (B,) and ``clipped`` (B,) bool.
    """
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {"ratio": ratio.detach(), "clipped": (clipped > unclipped).detach()}
    return loss, stats


def gaussian_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std_dev: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps sharing ``std_dev``: ``‖μ − μref‖² / (2·std²)``.

    Args:
        mean, ref_mean: (B, ...) step means of the policy and the reference.
        std_dev: broadcastable to ``mean``; the step std before the ``sqrt(−dt)`` factor.

    Returns:
        (B,) KL averaged over the non-batch dimensions.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std_dev**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))
