"""The toy world's verifier as a reward function for the flow and autoregressive trainers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trl_intrinsic.toyworld.verifier import verify

__all__ = ["make_verifier_reward", "verifier_reward", "verifier_reward_partial"]


def _unwrap(image: Any) -> Any:
    # Autoregressive trainers may hand one completion as a list holding its image.
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"completions: expected one image per completion, got a list of {len(image)}")
        return image[0]
    return image


def _score(
    prompts: Sequence[str] | None,
    images: Sequence[Any] | None,
    completions: Sequence[Any] | None,
    metadata: Sequence[Mapping[str, Any] | str] | None,
    partial_credit: bool,
) -> list[float | None]:
    if images is None:
        images = completions
    if images is None:
        raise ValueError(
            "images: the verifier reward needs images (flow trainers) or completions (autoregressive)"
        )
    if metadata is None:
        raise ValueError("metadata: the verifier reward needs the dataset's 'metadata' column")
    if isinstance(metadata, (str, Mapping)):
        raise TypeError("metadata: expected one metadata item per image (a list), got a single item")
    if len(metadata) != len(images):
        raise ValueError(f"metadata: {len(metadata)} items for {len(images)} images")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images")
    rewards: list[float | None] = []
    for image, meta in zip(images, metadata):
        image = _unwrap(image)
        if image is None or meta is None or meta == "":  # no image, or not a toy-world prompt: does not apply
            rewards.append(None)
            continue
        result = verify(image, meta)
        rewards.append(result.score if partial_credit else float(result.correct))
    return rewards


def verifier_reward(
    prompts: Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    *,
    metadata: Sequence[Mapping[str, Any] | str],
    completions: Sequence[Any] | None = None,
    partial_credit: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 if an image satisfies its metadata, else 0.0; ``None`` for a missing (``None``) image or a row
    without metadata (not a toy-world prompt: the reward does not apply, as TRL's per-task rewards).

    Args:
        prompts: the prompts (only their number is checked).
        images: PIL images or (H, W, 3) arrays, from flow trainers.
        metadata: one GenEval-style metadata item (dict or JSON string) per image — the dataset's
            ``metadata`` column, which the trainers pass through.
        completions: images from autoregressive trainers, used when ``images`` is ``None``.
        partial_credit: return the share of satisfied include/exclude clauses instead.
    """
    return _score(prompts, images, completions, metadata, partial_credit)


verifier_reward.requires_images = True


def make_verifier_reward(partial_credit: bool = False) -> Callable[..., list[float | None]]:
    """A verifier reward with ``partial_credit`` fixed, named after it for trainer logs."""

    def reward(
        prompts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        *,
        metadata: Sequence[Mapping[str, Any] | str],
        completions: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        return _score(prompts, images, completions, metadata, partial_credit)

    reward.__name__ = reward.__qualname__ = "verifier_reward_partial" if partial_credit else "verifier_reward"
    reward.requires_images = True
    return reward


verifier_reward_partial = make_verifier_reward(partial_credit=True)
