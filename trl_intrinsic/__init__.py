"""trl_intrinsic: RL post-training of text-to-image models on intrinsic rewards, built on TRL.

The trainers are imported lazily so that light modules (``toyworld``, ``data``, ``rewards``) do not
pay for importing TRL and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

_LAZY = {
    "FlowGRPOConfig": "trl_intrinsic.trainers.flow_grpo_config",
    "FlowGRPOTrainer": "trl_intrinsic.trainers.flow_grpo_trainer",
    "IntrinsicGRPOConfig": "trl_intrinsic.trainers.intrinsic_grpo_config",
    "IntrinsicGRPOTrainer": "trl_intrinsic.trainers.intrinsic_grpo_trainer",
}
_SUBMODULES = {"toyworld", "rewards", "flow", "data", "testing", "trainers", "autoregressive"}

__all__ = [
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "IntrinsicGRPOConfig",
    "IntrinsicGRPOTrainer",
    "__version__",
    "autoregressive",
    "data",
    "flow",
    "rewards",
    "testing",
    "toyworld",
    "trainers",
]

if TYPE_CHECKING:  # pragma: no cover
    from trl_intrinsic.trainers.flow_grpo_config import FlowGRPOConfig
    from trl_intrinsic.trainers.flow_grpo_trainer import FlowGRPOTrainer
    from trl_intrinsic.trainers.intrinsic_grpo_config import IntrinsicGRPOConfig
    from trl_intrinsic.trainers.intrinsic_grpo_trainer import IntrinsicGRPOTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"trl_intrinsic.{name}")
    raise AttributeError(f"module 'trl_intrinsic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
