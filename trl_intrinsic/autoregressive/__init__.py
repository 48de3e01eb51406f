"""Autoregressive text-to-image models (Janus-Pro): IRIS rollouts with self-certainty capture, the training
layout and forward (:mod:`~trl_intrinsic.autoregressive.janus`), and the self-certainty statistic
(:mod:`~trl_intrinsic.autoregressive.self_certainty`).

The Janus names below are resolved lazily, so ``import trl_intrinsic.autoregressive.self_certainty`` needs
torch only. The statistic is imported from its module: ``from trl_intrinsic.autoregressive.self_certainty
import self_certainty`` (the package does not re-export it, so the name never means both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trl_intrinsic._lazy import lazy_exports

__all__ = [
    "DEFAULT_COT_TEMPLATE",
    "JanusRollout",
    "JanusTokens",
    "JanusTrainingLayout",
    "decode_images",
    "janus_completion_logps",
    "janus_image_size",
    "janus_num_image_tokens",
    "janus_prompt_ids",
    "janus_request",
    "janus_rollout",
    "position_ids_from_mask",
    "restore_janus_generation_config",
    "sample_cot",
    "sample_image_tokens",
    "training_layout",
]

_LAZY = dict.fromkeys(__all__, "trl_intrinsic.autoregressive.janus")

if TYPE_CHECKING:  # pragma: no cover
    from trl_intrinsic.autoregressive.janus import (
        DEFAULT_COT_TEMPLATE,
        JanusRollout,
        JanusTokens,
        JanusTrainingLayout,
        decode_images,
        janus_completion_logps,
        janus_image_size,
        janus_num_image_tokens,
        janus_prompt_ids,
        janus_request,
        janus_rollout,
        position_ids_from_mask,
        restore_janus_generation_config,
        sample_cot,
        sample_image_tokens,
        training_layout,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
