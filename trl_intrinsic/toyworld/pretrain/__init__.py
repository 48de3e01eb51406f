"""Pretraining of the toy models shipped in ``trl_intrinsic/toyworld/weights`` (not needed at runtime).

    python -m trl_intrinsic.toyworld.pretrain flow [--minutes M] [--seed S] [--output DIR] [--init-from DIR]
    python -m trl_intrinsic.toyworld.pretrain janus [--seed S] [--minutes M] [--max-steps N] \\
        [--vq-max-steps N] [--threads T] [--output DIR]

- :mod:`~trl_intrinsic.toyworld.pretrain.flow`: the toy ``StableDiffusion3Pipeline`` (VAE, then flow matching);
- :mod:`~trl_intrinsic.toyworld.pretrain.janus`: the toy ``JanusForConditionalGeneration`` (VQ tokenizer, then
  the language model on IRIS-formatted sequences with a chain-of-thought);
- :mod:`~trl_intrinsic.toyworld.pretrain.common`: their shared settings, render stream and helpers;
- :mod:`~trl_intrinsic.toyworld.pretrain.components`: the small model builders, shared with
  :mod:`trl_intrinsic.testing`;
- ``__main__``: the command line.

The runtime (``trl_intrinsic.toyworld``) never imports this package; it imports the runtime (scenes,
rendering, verifier, models, evaluation). Names are resolved lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trl_intrinsic._lazy import lazy_exports

__all__ = [
    "FlowPretrainConfig",
    "JanusPretrainConfig",
    "build_flow_pipeline",
    "build_janus",
    "build_janus_tokenizer",
    "main",
    "pretrain_flow",
    "pretrain_janus",
]

_FLOW = "trl_intrinsic.toyworld.pretrain.flow"
_JANUS = "trl_intrinsic.toyworld.pretrain.janus"
_LAZY = {
    "FlowPretrainConfig": _FLOW,
    "build_flow_pipeline": _FLOW,
    "pretrain_flow": _FLOW,
    "JanusPretrainConfig": _JANUS,
    "build_janus": _JANUS,
    "build_janus_tokenizer": _JANUS,
    "pretrain_janus": _JANUS,
    "main": "trl_intrinsic.toyworld.pretrain.__main__",
}

if TYPE_CHECKING:  # pragma: no cover
    from trl_intrinsic.toyworld.pretrain.__main__ import main
    from trl_intrinsic.toyworld.pretrain.flow import FlowPretrainConfig, build_flow_pipeline, pretrain_flow
    from trl_intrinsic.toyworld.pretrain.janus import (
        JanusPretrainConfig,
        build_janus,
        build_janus_tokenizer,
        pretrain_janus,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
