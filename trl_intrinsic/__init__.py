"""trl_intrinsic: RL post-training of text-to-image models on intrinsic rewards, built on TRL.

The trainers are imported lazily so that light modules (``toyworld``, ``data``, ``rewards``) do not
pay for importing TRL and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trl_intrinsic._lazy import lazy_exports

__version__ = "0.1.0.dev0"

_LAZY = {
    "DiffusionNFTConfig": "trl_intrinsic.trainers.diffusion_nft_config",
    "DiffusionNFTTrainer": "trl_intrinsic.trainers.diffusion_nft_trainer",
    "FlowGRPOConfig": "trl_intrinsic.trainers.flow_grpo_config",
    "FlowGRPOTrainer": "trl_intrinsic.trainers.flow_grpo_trainer",
    "IntrinsicGRPOConfig": "trl_intrinsic.trainers.intrinsic_grpo_config",
    "IntrinsicGRPOTrainer": "trl_intrinsic.trainers.intrinsic_grpo_trainer",
    **{
        name: f"trl_intrinsic.{name}"
        for name in ("autoregressive", "data", "flow", "rewards", "testing", "toyworld", "trainers")
    },
}

__all__ = [
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
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
    from trl_intrinsic.trainers.diffusion_nft_config import DiffusionNFTConfig
    from trl_intrinsic.trainers.diffusion_nft_trainer import DiffusionNFTTrainer
    from trl_intrinsic.trainers.flow_grpo_config import FlowGRPOConfig
    from trl_intrinsic.trainers.flow_grpo_trainer import FlowGRPOTrainer
    from trl_intrinsic.trainers.intrinsic_grpo_config import IntrinsicGRPOConfig
    from trl_intrinsic.trainers.intrinsic_grpo_trainer import IntrinsicGRPOTrainer

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
