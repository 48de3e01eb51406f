"""Self-certainty of a model's token distributions, and the rewards built on it (IRIS, Intuitor).

For next-token logits ``z ∈ R^V`` with ``p = softmax(z)``, the self-certainty is the KL divergence
from the uniform distribution ``U`` to ``p``::

    SC(z) = KL(U ‖ p) = −log V − (1/V)·Σ_v log p_v = logsumexp(z) − mean(z) − log V      (nats)

It is 0 for a uniform ``p`` and grows as ``p`` concentrates. Per completion it is averaged over
the completion tokens. IRIS rewards the *negative* self-certainty (``nsc_reward``), Intuitor the
self-certainty itself (``self_certainty_reward``).

The ``− log V`` term: IRIS's released code leaves it out. That is harmless when every token of a
completion shares one vocabulary, but a Janus completion mixes chain-of-thought tokens (V = 102,400)
and image tokens (V = 16,384); without the term each text token carries an extra ``log V_text`` and
each image token ``log V_image`` nats, so the mean depends on the share of text tokens and the
reward is biased against (or for) long chains of thought. We keep it, so that a uniform prediction
scores 0 whatever the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["nsc_reward", "self_certainty", "self_certainty_reward", "sequence_mean"]

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


def _read_self_certainty(self_certainty: Sequence[float] | torch.Tensor | None, name: str) -> list[float]:
    if self_certainty is None:
        raise ValueError(
            f"`{name}` needs the `self_certainty` kwarg; use it with IntrinsicGRPOTrainer, which passes it "
            "to every reward function."
        )
    if isinstance(self_certainty, torch.Tensor):
        return [float(s) for s in self_certainty.reshape(-1).tolist()]
    return [float(s) for s in self_certainty]


def nsc_reward(
    completions: Any = None, *, self_certainty: Sequence[float] | torch.Tensor | None = None, **kwargs: Any
) -> list[float]:
    """IRIS reward: the negative self-certainty ``−SC`` of each completion (higher = less certain).

    Args:
        completions: ignored (present for TRL's reward-call convention).
        self_certainty: per-completion mean self-certainty, as passed by ``IntrinsicGRPOTrainer``.

    Returns:
        ``[-s for s in self_certainty]``.
    """
    return [-s for s in _read_self_certainty(self_certainty, "nsc_reward")]


def self_certainty_reward(
    completions: Any = None, *, self_certainty: Sequence[float] | torch.Tensor | None = None, **kwargs: Any
) -> list[float]:
    """Intuitor-style reward: the self-certainty ``SC`` of each completion (higher = more certain).

    Args:
        completions: ignored (present for TRL's reward-call convention).
        self_certainty: per-completion mean self-certainty, as passed by ``IntrinsicGRPOTrainer``.

    Returns:
        ``list(self_certainty)`` as floats.
    """
    return _read_self_certainty(self_certainty, "self_certainty_reward")


nsc_reward.__name__ = "nsc_reward"
nsc_reward.requires_images = False  # type: ignore[attr-defined]
self_certainty_reward.__name__ = "self_certainty_reward"
self_certainty_reward.requires_images = False  # type: ignore[attr-defined]
