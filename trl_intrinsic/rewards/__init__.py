"""Reward functions: intrinsic (SOLACE, self-certainty) and external image scorers, as plain callables.

Names are resolved lazily on first access, so ``import trl_intrinsic.rewards`` imports neither
transformers nor any scorer's model code.

Flow rewards are called ``f(prompts, images, **kwargs) -> list[float | None]`` (see
``FlowGRPOTrainer``); Janus/TRL rewards ``f(prompts=, completions=, **kwargs)``. The external image
scorers and :class:`RemoteReward` (a reward computed by a server: :mod:`trl_intrinsic.rewards.serve`)
accept both. ``self_certainty`` is the statistic the self-certainty rewards are built on
(:mod:`trl_intrinsic.autoregressive.self_certainty`), exported here for convenience.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from trl_intrinsic._lazy import lazy_exports

_LAZY = {
    # SOLACE
    "SolaceReward": "trl_intrinsic.rewards.solace",
    "solace_reward": "trl_intrinsic.rewards.solace",
    # self-certainty (IRIS, Intuitor): the statistic and the rewards built on it
    "self_certainty": "trl_intrinsic.autoregressive.self_certainty",
    "nsc_reward": "trl_intrinsic.rewards.nsc",
    "self_certainty_reward": "trl_intrinsic.rewards.nsc",
    # external image scorers
    "CLIPScore": "trl_intrinsic.rewards.external",
    "clip_score": "trl_intrinsic.rewards.external",
    "PickScore": "trl_intrinsic.rewards.external",
    "pick_score": "trl_intrinsic.rewards.external",
    "AestheticScore": "trl_intrinsic.rewards.external",
    "HPSv2": "trl_intrinsic.rewards.external",
    "ImageReward": "trl_intrinsic.rewards.external",
    "OCRScore": "trl_intrinsic.rewards.external",
    "ocr_score": "trl_intrinsic.rewards.external",
    # a reward scored by a server (python -m trl_intrinsic.rewards.serve)
    "RemoteReward": "trl_intrinsic.rewards.remote",
    "AsyncRemoteReward": "trl_intrinsic.rewards.remote",
    "RemoteRewardError": "trl_intrinsic.rewards.remote",
    # the toy world's rule-based verifier
    "verifier_reward": "trl_intrinsic.toyworld.reward",
    "verifier_reward_partial": "trl_intrinsic.toyworld.reward",
}

__all__ = [
    "AestheticScore",
    "AsyncRemoteReward",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "OCRScore",
    "PickScore",
    "RemoteReward",
    "RemoteRewardError",
    "SolaceReward",
    "clip_score",
    "nsc_reward",
    "ocr_score",
    "pick_score",
    "reward_by_name",
    "self_certainty",
    "self_certainty_reward",
    "solace_reward",
    "verifier_reward",
    "verifier_reward_partial",
]

if TYPE_CHECKING:  # pragma: no cover
    from trl_intrinsic.autoregressive.self_certainty import self_certainty
    from trl_intrinsic.rewards.external import (
        AestheticScore,
        CLIPScore,
        HPSv2,
        ImageReward,
        OCRScore,
        PickScore,
        clip_score,
        ocr_score,
        pick_score,
    )
    from trl_intrinsic.rewards.nsc import nsc_reward, self_certainty_reward
    from trl_intrinsic.rewards.remote import AsyncRemoteReward, RemoteReward, RemoteRewardError
    from trl_intrinsic.rewards.solace import SolaceReward, solace_reward
    from trl_intrinsic.toyworld.reward import verifier_reward, verifier_reward_partial

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


def reward_by_name(name: str) -> Any:
    """The reward function exported here under ``name`` (e.g. ``"nsc_reward"``); classes such as
    :class:`SolaceReward` are configured and passed as objects.

    Raises:
        ValueError: ``name`` is not a reward of this module; the message lists the available names.
    """
    available = sorted(n for n in __all__ if n[0].islower() and n not in ("reward_by_name", "self_certainty"))
    if name not in available:
        raise ValueError(f"Unknown reward name {name!r} in `reward_funcs`; available: {available}.")
    return getattr(sys.modules[__name__], name)
