"""Derived random seeds: one scheme for every random stream the package draws.

A training run must sample the same rollouts, SDE noise and reward probes whether it runs uninterrupted
or is resumed from a checkpoint, on one process or several. Each stream therefore gets its own generator,
seeded from the run's seed and the integers that identify the draw (a stream name, the training step, a
sample's global position, a prompt group...), never from a global RNG that advances with everything
else.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derived_generator", "derived_seed"]


def derived_seed(seed: int, *key: int | str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``key`` (integers and short stream names).

    Distinct keys give independent-looking seeds (a keyed BLAKE2b hash), equal keys give equal seeds on
    every process and after every resume.
    """
    text = "/".join(str(part) for part in (int(seed), *key))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def derived_generator(
    seed: int, *key: int | str, device: torch.device | str | None = None
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (CPU by default) seeded with :func:`derived_seed`."""
    generator = torch.Generator(device=device) if device is not None else torch.Generator()
    return generator.manual_seed(derived_seed(seed, *key))
