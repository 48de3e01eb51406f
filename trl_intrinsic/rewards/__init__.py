"""Reward functions: intrinsic (SOLACE, self-certainty) and external image scorers, as plain callables.

Names are resolved lazily on first access, so ``import trl_intrinsic.rewards`` imports neither
transformers nor any scorer's model code.

Flow rewards are called ``f(prompts, images, **kwargs) -> list[float | None]`` (see
``FlowGRPOTrainer``); Janus/TRL rewards ``f(prompts=, completions=, **kwargs)``. The external image
scorers accept both.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_LAZY = {
    # SOLACE
    "SolaceReward": "trl_intrinsic.rewards.solace",
    "solace_reward": "trl_intrinsic.rewards.solace",
    # self-certainty (IRIS, Intuitor)
    "self_certainty": "trl_intrinsic.rewards.self_certainty",
    "nsc_reward": "trl_intrinsic.rewards.self_certainty",
    "self_certainty_reward": "trl_intrinsic.rewards.self_certainty",
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
    # the toy world's rule-based verifier
    "verifier_reward": "trl_intrinsic.toyworld",
    "verifier_reward_partial": "trl_intrinsic.toyworld",
}

__all__ = [
    "AestheticScore",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "OCRScore",
    "PickScore",
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
    from trl_intrinsic.rewards.self_certainty import nsc_reward, self_certainty, self_certainty_reward
    from trl_intrinsic.rewards.solace import SolaceReward, solace_reward
    from trl_intrinsic.toyworld import verifier_reward, verifier_reward_partial


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_intrinsic.rewards' has no attribute {name!r}")


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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _RewardsModule(types.ModuleType):
    """``self_certainty`` names both a submodule and the public function it defines.

    Importing a submodule binds it as an attribute of its package, which would shadow the function
    (``from trl_intrinsic.rewards import self_certainty`` would then return the module, depending on
    import order). Keep the function bound instead; the submodule stays importable by its full name
    (``from trl_intrinsic.rewards.self_certainty import ...``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "self_certainty" and isinstance(value, types.ModuleType):
            value = getattr(value, "self_certainty", value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _RewardsModule
