"""What the two pretraining scripts share: the settings base class, the render stream and small helpers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from trl_intrinsic.toyworld.rendering import render
from trl_intrinsic.toyworld.scenes import TAGS, TEST_TAGS, prompt_space, sample_metadata

__all__ = [
    "PretrainConfig",
    "TrainStream",
    "all_prompts",
    "format_scores",
    "render_batch",
    "timed_log",
    "to_pil",
]


@dataclass
class PretrainConfig:
    """Settings both toy models are pretrained with. Times are wall-clock minutes; ``max_steps`` stops earlier.

    Stage 1 (the image tokenizer: a VAE or a VQ model) has its own settings in the subclasses; these are the
    stage-2 (transformer / language model) settings, the evaluations and the threads.
    """

    seed: int = 0
    minutes: float = 25.0
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 7e-4
    warmup_steps: int = 100
    # Tags to draw training prompts from; a repeated tag is drawn more often (position and colour
    # binding learn slowest).
    train_tags: tuple[str, ...] = (
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "position",
        "color_attr",
        "color_attr",
    )
    eval_every_minutes: float = 5.0
    eval_per_tag: int = 24
    final_eval_per_tag: int = 200
    threads: int = 1

    # Stage-1 settings `__post_init__` checks too (named per model: "vae_…" or "vq_…").
    _stage1_minutes: ClassVar[tuple[str, ...]] = ()
    _stage1_counts: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in ("minutes", *self._stage1_minutes, "eval_every_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        for name in ("batch_size", *self._stage1_counts, "eval_per_tag", "final_eval_per_tag", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")


def all_prompts() -> list[dict]:
    """Every metadata dict of both splits."""
    out = [m for tag in TAGS for m in prompt_space(tag, "train")]
    return out + [m for tag in TEST_TAGS for m in prompt_space(tag, "test")]


def render_batch(metadatas: Sequence[dict], seeds: Sequence[int]) -> torch.Tensor:
    """Renders as a (B, 3, 32, 32) float tensor in [-1, 1]."""
    arrays = np.stack(
        [np.asarray(render(m, seed=int(s)), dtype=np.float32) for m, s in zip(metadatas, seeds)]
    )
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) pixels in [-1, 1] as RGB PIL images."""
    from PIL import Image

    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


class TrainStream:
    """Endless, seeded stream of (metadata, render seed) from the train split."""

    def __init__(self, seed: int, tags: Sequence[str]):
        self._rng = np.random.default_rng(seed)
        self._tags = list(tags)

    def next(self, n: int) -> tuple[list[dict], list[int]]:
        metas = sample_metadata(n, seed=int(self._rng.integers(2**31)), tags=self._tags)
        seeds = self._rng.integers(2**31, size=n).tolist()
        return metas, seeds


def format_scores(scores: dict[str, Any]) -> str:
    """Accuracies of :func:`~trl_intrinsic.toyworld.evaluate` on one line (numbers only: no counts, prompts or
    records)."""
    return " ".join(
        f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, int | float) and not isinstance(v, bool)
    )


def timed_log(start: float) -> Callable[[str], None]:
    """A logger prefixing each message with the minutes since ``start`` (``time.monotonic()``); it writes
    through ``tqdm`` so that progress bars stay intact."""

    def log(message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"[{(time.monotonic() - start) / 60:5.1f} min] {message}")
        sys.stdout.flush()

    return log
