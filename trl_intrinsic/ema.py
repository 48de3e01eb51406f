"""Copies of trainable weights that move slowly: an EMA for evaluation and saving, DiffusionNFT's old policy.

A :class:`ParameterCopy` holds a detached copy of a list of parameters. It is blended towards them in
place (:func:`ema_update_`), swapped into the model for a block of code without copying
(:meth:`ParameterCopy.swapped`), and saved to / loaded from a safetensors file for an exact resume.

Flow-GRPO's reference keeps an EMA of the trainable weights with decay ``min((1 + s) / (10 + s), decay)``
after optimizer step ``s`` (:func:`warmup_ema_decay`), applied every ``update_interval`` steps, and
evaluates and saves the EMA weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ParameterCopy", "ema_update_", "warmup_ema_decay"]


@torch.no_grad()
def ema_update_(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], decay: float
) -> None:
    """In place, without gradients: ``target ← decay·target + (1 − decay)·source`` for each pair.

    Args:
        target_params: tensors to update (e.g. an EMA of a LoRA adapter's parameters).
        source_params: tensors to blend in (e.g. the trained adapter's), same order and shapes; they
            are cast to each target's dtype and device.
        decay: η in [0, 1]; 0 copies ``source``, 1 leaves ``target`` unchanged.
    """
    if not (isinstance(decay, (int, float)) and 0 <= decay <= 1):
        raise ValueError(f"`decay` must be in [0, 1], got {decay!r}.")
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(
            f"`target_params` has {len(targets)} tensors but `source_params` has {len(sources)}; "
            "pass the parameters of the two adapters in the same order."
        )
    for i, (tgt, src) in enumerate(zip(targets, sources)):
        if tgt.shape != src.shape:
            raise ValueError(
                f"`target_params[{i}]` has shape {tuple(tgt.shape)} but `source_params[{i}]` has "
                f"{tuple(src.shape)}; pass the parameters of the two adapters in the same order."
            )
        if tgt is src:
            continue
        tgt.mul_(decay).add_(src.detach().to(device=tgt.device, dtype=tgt.dtype), alpha=1.0 - decay)


def warmup_ema_decay(step: int, decay: float) -> float:
    """Flow-GRPO's EMA decay after optimizer step ``step``: ``min((1 + step) / (10 + step), decay)``, so the
    first updates follow the weights closely."""
    return min((1 + step) / (10 + step), decay)


class ParameterCopy:
    """A detached copy of ``params`` (same order, shapes, dtypes and devices).

    Args:
        params: the parameters to copy, e.g. the trainable ones of a model.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = list(params)
        self.tensors = [p.detach().clone() for p in self.params]

    def nbytes(self) -> int:
        """Bytes held by the copy."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def blend_(self, decay: float) -> None:
        """``copy ← decay·copy + (1 − decay)·params`` (see :func:`ema_update_`)."""
        ema_update_(self.tensors, self.params, decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Put the copy's values into the parameters for the block (tensors are exchanged, not copied)."""
        with torch.no_grad():
            for param, copy in zip(self.params, self.tensors, strict=True):
                param.data, copy.data = copy.data, param.data
        try:
            yield
        finally:
            with torch.no_grad():
                for param, copy in zip(self.params, self.tensors, strict=True):
                    param.data, copy.data = copy.data, param.data

    def save(self, path: str | os.PathLike) -> None:
        """Write the copy to a safetensors file (tensors named by position)."""
        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(self.tensors)}, str(path))

    def load(self, path: str | os.PathLike, what: str) -> None:
        """Read a copy written by :meth:`save`; ``what`` names it in the errors (e.g. "the EMA weights")."""
        if not os.path.isfile(path):
            raise ValueError(
                f"{path} does not exist: the checkpoint has no {what}. Resume from a checkpoint written by a run "
                "with the same settings."
            )
        saved = load_file(str(path))
        if len(saved) != len(self.tensors):
            raise ValueError(
                f"{path} holds {len(saved)} tensors but the trainer has {len(self.tensors)} trainable ones; "
                "resume with the LoRA configuration of the run that saved it."
            )
        with torch.no_grad():
            for i, tensor in enumerate(self.tensors):
                tensor.copy_(saved[str(i)])
