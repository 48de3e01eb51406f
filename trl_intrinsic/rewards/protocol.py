"""The wire format of remote rewards: what ``RemoteReward`` sends and what ``python -m
trl_intrinsic.rewards.serve`` answers. Both sides use the functions of this module.

``POST /score`` — score N images (N ≥ 1), body (JSON)::

    {
      "prompts": ["a red circle", ...],          # N strings
      "images":  ["iVBORw0KGgo...", ...],        # N RGB PNG files, base64 (standard alphabet, padded)
      "columns": {"metadata": [{...}, ...]}      # optional: forwarded dataset columns, N JSON values each
    }

answer ``200``::

    {"rewards": [0.83, null, ...]}               # N numbers; null where the reward does not apply

A refused request gets a 4xx status (400: the body does not follow this schema; 422: the reward
refused its inputs, e.g. a missing column), a failure of the reward a 500, each with
``{"detail": "<what went wrong>"}``. Clients retry 429 and 5xx answers, never other 4xx ones.

``GET /health`` answers ``{"status": "ok", "reward": "<name>", "batch_size": <int or null>}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

__all__ = [
    "HEALTH_PATH",
    "SCORE_PATH",
    "decode_image",
    "decode_request",
    "decode_response",
    "encode_image",
    "encode_request",
    "encode_response",
]

SCORE_PATH = "/score"
HEALTH_PATH = "/health"


def encode_image(image: Image.Image) -> str:
    """A PIL image as a base64 RGB PNG (lossless: the server sees the trainer's pixels exactly)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"images: expected PIL images, got {type(image).__name__}.")
    buffer = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: Any, index: int = 0) -> Image.Image:
    """The RGB PIL image of :func:`encode_image`'s output; ``ValueError`` naming entry ``index`` otherwise."""
    if not isinstance(data, str):
        raise ValueError(f"images[{index}]: expected a base64 string, got {type(data).__name__}.")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, OSError, ValueError) as err:
        raise ValueError(f"images[{index}]: not a base64-encoded PNG ({err}).") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_request(
    prompts: Sequence[str], images: Sequence[Image.Image], columns: Mapping[str, Sequence[Any]] | None = None
) -> dict[str, Any]:
    """The ``POST /score`` body for N prompts, N images and forwarded columns of N values each."""
    body: dict[str, Any] = {"prompts": list(prompts), "images": [encode_image(im) for im in images]}
    if columns:
        body["columns"] = {name: list(values) for name, values in columns.items()}
    return body


def decode_request(payload: Any) -> tuple[list[str], list[Image.Image], dict[str, list[Any]]]:
    """``(prompts, images, columns)`` of a ``POST /score`` body; ``ValueError`` naming the bad field."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"The body must be a JSON object, got {type(payload).__name__}.")
    unknown = sorted(set(payload) - {"prompts", "images", "columns"})
    if unknown:
        raise ValueError(
            f"Unknown fields {unknown}; the body has 'prompts', 'images' and optional 'columns'."
        )
    prompts, images = payload.get("prompts"), payload.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: expected a list of strings.")
    if not isinstance(images, list) or len(images) != len(prompts) or not images:
        got = len(images) if isinstance(images, list) else type(images).__name__
        raise ValueError(
            f"images: expected a list of {len(prompts) or 'N ≥ 1'} base64 PNGs (one per prompt), got {got}."
        )
    columns = payload.get("columns") or {}
    if not isinstance(columns, Mapping):
        raise ValueError(f"columns: expected an object of lists, got {type(columns).__name__}.")
    for name, values in columns.items():
        if name in ("prompts", "images", "completions"):
            raise ValueError(f"columns[{name!r}]: this name is reserved; rename the column.")
        if not isinstance(values, list) or len(values) != len(prompts):
            raise ValueError(f"columns[{name!r}]: expected a list of {len(prompts)} values (one per image).")
    return prompts, [decode_image(data, i) for i, data in enumerate(images)], dict(columns)


def encode_response(rewards: Any, num_images: int) -> dict[str, list[float | None]]:
    """The answer for a reward's values: ``None`` and NaN become ``null``; ``ValueError`` for a wrong count
    or an infinite or non-numeric value."""
    values = rewards.tolist() if hasattr(rewards, "tolist") else list(rewards)
    if len(values) != num_images:
        raise ValueError(f"returned {len(values)} rewards for {num_images} images; return one per image.")
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward {i} is {value!r}, not a number or None.") from None
        if math.isinf(value):
            raise ValueError(f"reward {i} is infinite; return None to skip an image.")
        out.append(None if math.isnan(value) else value)
    return {"rewards": out}


def decode_response(payload: Any, num_images: int) -> list[float | None]:
    """The rewards of an answer to a request of ``num_images`` images (NaN read as ``None``); ``ValueError``
    if it is malformed or holds an infinite value."""
    rewards = payload.get("rewards") if isinstance(payload, Mapping) else None
    if not isinstance(rewards, list) or len(rewards) != num_images:
        raise ValueError(f"expected {{'rewards': [{num_images} numbers or null]}}, got {str(payload)[:200]}")
    for value in rewards:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"reward {value!r} is not a number or null")
        if value is not None and math.isinf(value):
            raise ValueError(f"reward {value!r} is infinite")
    return [None if value is None or math.isnan(value) else float(value) for value in rewards]
