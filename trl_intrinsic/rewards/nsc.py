"""Rewards built on the self-certainty of the policy's tokens: IRIS's NSC and Intuitor's self-certainty.

``IntrinsicGRPOTrainer`` passes every reward function the per-completion self-certainty
(:func:`trl_intrinsic.autoregressive.self_certainty.self_certainty`, mean over the completion tokens) as
the ``self_certainty`` kwarg. IRIS rewards its negative (:func:`nsc_reward`: a policy is rewarded for
being *less* certain), Intuitor the self-certainty itself (:func:`self_certainty_reward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["nsc_reward", "self_certainty_reward"]


def _read_self_certainty(self_certainty: Sequence[float] | torch.Tensor | None, name: str) -> list[float]:
    if self_certainty is None:
        raise ValueError(
            f"`{name}` needs the `self_certainty` kwarg; use it with IntrinsicGRPOTrainer, which passes it "
            "to every reward function."
        )
    if isinstance(self_certainty, torch.Tensor):
        return [float(s) for s in self_certainty.reshape(-1).tolist()]
    return [float(s) for s in self_certainty]


def nsc_reward(
    completions: Any = None, *, self_certainty: Sequence[float] | torch.Tensor | None = None, **kwargs: Any
) -> list[float]:
    """IRIS reward: the negative self-certainty ``−SC`` of each completion (higher = less certain).

    Args:
        completions: ignored (present for TRL's reward-call convention).
        self_certainty: per-completion mean self-certainty, as passed by ``IntrinsicGRPOTrainer``.

    Returns:
        ``[-s for s in self_certainty]``.
    """
    return [-s for s in _read_self_certainty(self_certainty, "nsc_reward")]


def self_certainty_reward(
    completions: Any = None, *, self_certainty: Sequence[float] | torch.Tensor | None = None, **kwargs: Any
) -> list[float]:
    """Intuitor-style reward: the self-certainty ``SC`` of each completion (higher = more certain).

    Args:
        completions: ignored (present for TRL's reward-call convention).
        self_certainty: per-completion mean self-certainty, as passed by ``IntrinsicGRPOTrainer``.

    Returns:
        ``list(self_certainty)`` as floats.
    """
    return _read_self_certainty(self_certainty, "self_certainty_reward")


nsc_reward.__name__ = "nsc_reward"
nsc_reward.requires_images = False  # type: ignore[attr-defined]
self_certainty_reward.__name__ = "self_certainty_reward"
self_certainty_reward.requires_images = False  # type: ignore[attr-defined]
