"""Toy models pretrained on the toy world and shipped with the package (safetensors, loaded offline).

``load_toy_pipeline()`` returns the toy ``StableDiffusion3Pipeline`` trained by
``python -m trl_intrinsic.toyworld.pretrain flow`` (see ``weights/flow/TRAINING.md`` for the exact
command, its wall time and the accuracy it reached). Sample it at 32×32 px with
``max_sequence_length=1`` (it has no T5 encoder; see :data:`FLOW_SAMPLING`).

``load_toy_janus()`` returns the toy ``JanusForConditionalGeneration`` and its ``JanusProcessor``
trained by ``python -m trl_intrinsic.toyworld.pretrain janus`` (``weights/janus/TRAINING.md``): 64
image tokens per 32×32 image, a word-level tokenizer, and a text head that writes a short description
of the scene (the chain-of-thought of IRIS rollouts) before the image. Sample it as IRIS does, with
:data:`JANUS_SAMPLING`.

Importing this module is light (torch and diffusers load on the first call).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "FLOW_SAMPLING",
    "JANUS_SAMPLING",
    "TOY_FLOW_DIR",
    "TOY_JANUS_DIR",
    "load_toy_janus",
    "load_toy_pipeline",
]

TOY_FLOW_DIR = Path(__file__).resolve().parent / "weights" / "flow"
"""Directory of the shipped toy flow pipeline."""

TOY_JANUS_DIR = Path(__file__).resolve().parent / "weights" / "janus"
"""Directory of the shipped toy Janus model and processor."""

FLOW_SAMPLING: dict[str, Any] = {
    "num_inference_steps": 10,
    "guidance_scale": 4.5,
    "height": 32,
    "width": 32,
    "max_sequence_length": 1,
}
"""Sampling settings the toy flow pipeline was trained for and evaluated with. Without a T5 encoder
the pipeline appends ``max_sequence_length`` zero tokens to the prompt embedding; training used one."""

JANUS_SAMPLING: dict[str, Any] = {
    "cfg_weight": 5.0,
    "image_temperature": 1.0,
    "temperature": 1.0,
    "max_cot_tokens": 32,
}
"""Sampling settings the toy Janus was evaluated with, in ``IntrinsicGRPOConfig`` terms: classifier-free
guidance weight and temperature of the image tokens, temperature of the chain-of-thought and its token
budget (``max_completion_length``; the longest toy description takes fewer tokens, EOS included)."""


def load_toy_pipeline(path: str | Path | None = None, **kwargs: Any):
    """Load the toy ``StableDiffusion3Pipeline`` offline, in fp32 on CPU.

    Args:
        path: a directory written by ``pretrain flow``; default :data:`TOY_FLOW_DIR` (the shipped model).
        **kwargs: passed to ``StableDiffusion3Pipeline.from_pretrained`` (e.g. ``dtype``).

    Returns:
        A ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3=None``). ``pipe(prompts,
        **FLOW_SAMPLING).images`` gives 32×32 PIL images.
    """
    import torch
    from diffusers import StableDiffusion3Pipeline

    path = TOY_FLOW_DIR if path is None else Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"path: {path} holds no pipeline (no model_index.json); train one with "
            "`python -m trl_intrinsic.toyworld.pretrain flow --output DIR`"
        )
    options = {"dtype": torch.float32, "text_encoder_3": None, "tokenizer_3": None, **kwargs}
    options["local_files_only"] = True
    options["use_safetensors"] = True
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_toy_janus(path: str | Path | None = None, **kwargs: Any):
    """Load the toy ``JanusForConditionalGeneration`` and its ``JanusProcessor`` offline, in fp32 on CPU.

    Args:
        path: a directory written by ``pretrain janus``; default :data:`TOY_JANUS_DIR` (the shipped model).
        **kwargs: passed to ``JanusForConditionalGeneration.from_pretrained`` (e.g. ``dtype``).

    Returns:
        ``(model, processor)``, the model in eval mode with its generation config restored
        (:func:`trl_intrinsic.autoregressive.janus.restore_janus_generation_config`: ``save_pretrained`` drops the
        ``boi_token_id``). Sample it as the trainer does with
        :func:`trl_intrinsic.autoregressive.janus.janus_rollout` and :data:`JANUS_SAMPLING` (32×32 images),
        or score it with :func:`trl_intrinsic.toyworld.evaluation.evaluate_janus`.
    """
    import torch
    from transformers import JanusForConditionalGeneration, JanusProcessor

    from trl_intrinsic.autoregressive.janus import restore_janus_generation_config

    path = TOY_JANUS_DIR if path is None else Path(path)
    if not (path / "config.json").is_file() or not (path / "processor_config.json").is_file():
        raise ValueError(
            f"path: {path} holds no Janus model and processor (config.json, processor_config.json); train one "
            "with `python -m trl_intrinsic.toyworld.pretrain janus --output DIR`"
        )
    options = {"dtype": torch.float32, **kwargs, "local_files_only": True, "use_safetensors": True}
    model = JanusForConditionalGeneration.from_pretrained(path, **options)
    processor = JanusProcessor.from_pretrained(path, local_files_only=True)
    restore_janus_generation_config(model, processor)
    model.eval()
    return model, processor
