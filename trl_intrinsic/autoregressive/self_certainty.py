"""Self-certainty of a model's token distributions: the statistic behind IRIS and Intuitor rewards.

For next-token logits ``z ∈ R^V`` with ``p = softmax(z)``, the self-certainty is the KL divergence
from the uniform distribution ``U`` to ``p``::

    SC(z) = KL(U ‖ p) = −log V − (1/V)·Σ_v log p_v = logsumexp(z) − mean(z) − log V      (nats)

It is 0 for a uniform ``p`` and grows as ``p`` concentrates. Per completion it is averaged over
the completion tokens (:func:`sequence_mean`); :func:`record_generation_self_certainty` catches it from
the logits a text LM's ``generate`` already produces. The rewards built on it (IRIS's negative
self-certainty, Intuitor's self-certainty) are in :mod:`trl_intrinsic.rewards.nsc`; the rollouts that
compute it from the logits they already produce are in :mod:`trl_intrinsic.autoregressive.janus` and
the trainer's generation hook.

The ``− log V`` term: IRIS's released code leaves it out. That is harmless when every token of a
completion shares one vocabulary, but a Janus completion mixes chain-of-thought tokens (V = 102,400)
and image tokens (V = 16,384); without the term each text token carries an extra ``log V_text`` and
each image token ``log V_image`` nats, so the mean depends on the share of text tokens and the
reward is biased against (or for) long chains of thought. We keep it, so that a uniform prediction
scores 0 whatever the vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SelfCertaintyRecorder",
    "record_generation_self_certainty",
    "self_certainty",
    "sequence_mean",
]

DEFAULT_CHUNK_SIZE = 64
"""Rows of logits converted to fp32 at a time: peak extra memory is ``chunk_size × V`` floats."""


def self_certainty(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token self-certainty ``KL(U ‖ softmax(z)) = logsumexp(z) − mean(z) − log V``.

    Computed on the raw logits (temperature 1) with fp32 accumulation, ``chunk_size`` rows at a
    time, so that at most a ``(chunk_size, V)`` fp32 copy of the logits exists at once even for
    ``(B, T, V)`` inputs in bf16 with ``V = 102,400``. No gradient is tracked.

    Args:
        logits: ``(..., V)`` logits, any float dtype, ``V ≥ 1``.
        mask: optional ``(...)`` bool/0-1 tensor with the leading shape of ``logits``; positions
            where it is 0 are not computed and come back as 0.
        chunk_size: number of rows (positions) processed at once.

    Returns:
        ``(...)`` fp32 tensor of per-token self-certainty in nats (≥ 0 up to rounding).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("`logits` must be a floating-point torch.Tensor of shape (..., V).")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"`logits` must have a non-empty last (vocabulary) dim, got shape {tuple(logits.shape)}."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    lead_shape = logits.shape[:-1]
    if mask is not None and tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"`mask` must have the logits' leading shape {tuple(lead_shape)}, got {tuple(mask.shape)}."
        )
    out = torch.zeros(lead_shape.numel(), dtype=torch.float32, device=logits.device)
    rows = torch.arange(lead_shape.numel(), device=logits.device)
    if mask is not None:
        rows = rows[mask.reshape(-1).bool()]
    log_v = math.log(logits.shape[-1])
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            # Index the leading dims directly: reshaping a non-contiguous view (e.g. ``logits[:, :-1]``)
            # would copy the whole tensor.
            chunk = logits[torch.unravel_index(idx, lead_shape)].float()
            out[idx] = torch.logsumexp(chunk, dim=-1) - chunk.mean(dim=-1) - log_v
    return out.reshape(lead_shape)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1, per row.

    Args:
        values: ``(B, T)`` per-token values (e.g. from :func:`self_certainty`).
        mask: ``(B, T)`` bool/0-1 mask.

    Returns:
        ``(B,)`` fp32 means; 0 for rows with an empty mask.
    """
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(
            f"`values` and `mask` must both have shape (B, T), got {tuple(values.shape)} and {tuple(mask.shape)}."
        )
    m = mask.to(torch.float32)
    return (values.float() * m).sum(-1) / m.sum(-1).clamp_min(1.0)


class SelfCertaintyRecorder:
    """Forward hook computing the self-certainty of the last position of every forward's logits.

    During ``generate`` each forward call of the model predicts one new token per row from the logits of its
    last position, so the recorded values, stacked, are the per-token self-certainty of the generated tokens.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.steps: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        logits = output["logits"] if isinstance(output, dict) else output.logits
        self.steps.append(self_certainty(logits[:, -1, :], chunk_size=self.chunk_size))

    def per_token(self) -> torch.Tensor:
        """(B, steps) fp32 self-certainty of each generated position."""
        if not self.steps:
            raise RuntimeError("No forward pass was recorded during generation.")
        return torch.stack(self.steps, dim=1)

    def per_completion(self, completion_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The per-token self-certainty of each generated completion (its first ``len(ids)`` positions), on CPU."""
        per_token = self.per_token()
        if per_token.shape[0] != len(completion_ids):
            raise RuntimeError(
                f"Recorded {per_token.shape[0]} rows of generation logits for {len(completion_ids)} completions."
            )
        longest = max((len(ids) for ids in completion_ids), default=0)
        if per_token.shape[1] < longest:
            raise RuntimeError(
                f"Recorded {per_token.shape[1]} generation steps for completions of up to {longest} tokens."
            )
        return [per_token[i, : len(ids)].cpu() for i, ids in enumerate(completion_ids)]


@contextlib.contextmanager
def record_generation_self_certainty(
    model: torch.nn.Module, chunk_size: int
) -> Iterator[SelfCertaintyRecorder]:
    """Record the self-certainty of every token ``model.generate`` produces inside the block.

    Args:
        model: the causal LM whose ``forward`` ``generate`` calls (the base model under a PEFT wrapper).
        chunk_size: see :func:`self_certainty`.
    """
    recorder = SelfCertaintyRecorder(chunk_size)
    handle = model.register_forward_hook(recorder, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()
