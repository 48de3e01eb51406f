"""Autoregressive text-to-image models (Janus-Pro): rollouts with self-certainty capture and training forwards."""

from trl_intrinsic.autoregressive.janus import (
    decode_images,
    janus_completion_logps,
    janus_image_size,
    janus_num_image_tokens,
    position_ids_from_mask,
    sample_cot,
    sample_image_tokens,
)

__all__ = [
    "decode_images",
    "janus_completion_logps",
    "janus_image_size",
    "janus_num_image_tokens",
    "position_ids_from_mask",
    "sample_cot",
    "sample_image_tokens",
]
