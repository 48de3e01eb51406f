"""Toy models pretrained on the toy world and shipped with the package (safetensors, loaded offline).

``load_toy_pipeline()`` returns the toy ``StableDiffusion3Pipeline`` trained by
``python -m trl_intrinsic.toyworld.pretrain flow`` (see ``weights/flow/TRAINING.md`` for the exact
command, its wall time and the accuracy it reached). Sample it at 32×32 px with
``max_sequence_length=1`` (it has no T5 encoder; see :data:`FLOW_SAMPLING`).

Importing this module is light (torch and diffusers load on the first call).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FLOW_SAMPLING", "TOY_FLOW_DIR", "load_toy_pipeline"]

TOY_FLOW_DIR = Path(__file__).resolve().parent / "weights" / "flow"
"""Directory of the shipped toy flow pipeline."""

FLOW_SAMPLING: dict[str, Any] = {
    "num_inference_steps": 10,
    "guidance_scale": 4.5,
    "height": 32,
    "width": 32,
    "max_sequence_length": 1,
}
"""Sampling settings the toy flow pipeline was trained for and evaluated with. Without a T5 encoder
the pipeline appends ``max_sequence_length`` zero tokens to the prompt embedding; training used one."""


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
