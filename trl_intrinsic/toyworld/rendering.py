"""Render toy-world metadata to RGB images: hard-edged shapes on a white background.

Layouts are drawn in a 32×32 reference frame and scaled to the requested size, so a seed gives the
same scene at every resolution (``render(m, seed=s, size=128)`` downsampled to 32 px is an
antialiased version of ``render(m, seed=s, size=32)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from trl_intrinsic.toyworld.scenes import PALETTE, SHAPES, normalize_metadata

__all__ = ["BASE_SIZE", "PlacedObject", "layout", "render", "render_layout"]

BASE_SIZE = 32
_GAP = 3.0  # minimum empty space between two objects' boxes, in reference pixels (≥ 2 after snapping)
_BORDER = 1.0  # minimum empty space between an object and the image border
_SIZE_RANGE = {1: (8.0, 12.0), 2: (8.0, 12.0), 3: (7.5, 10.5), 4: (7.5, 9.5)}
_MAX_OBJECTS = 4


@dataclass(frozen=True)
class PlacedObject:
    """One object of a layout, in reference (32 px) units: box centre ``(cx, cy)`` and side ``side``."""

    shape: str
    color: str
    cx: float
    cy: float
    side: float


def _relation_ok(a: PlacedObject, b: PlacedObject, rel: str) -> bool:
    """Whether ``a`` stands clearly in ``rel`` to ``b``: along the axis the boxes are apart by the gap,
    across it the centres differ by at most a quarter of the distance along it."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    if rel in ("left of", "above"):
        along = -along
    return along >= (a.side + b.side) / 2 + _GAP and abs(across) <= 0.25 * along


def _apart(a: PlacedObject, b: PlacedObject) -> bool:
    reach = (a.side + b.side) / 2 + _GAP
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def layout(metadata: Mapping[str, Any] | str, rng: np.random.Generator) -> list[PlacedObject]:
    """Place the objects of ``metadata``'s include clauses (exclude clauses draw nothing).

    Objects without a colour get a random palette colour. Raises ``ValueError`` for metadata that
    asks for more than four objects or for a shape outside :data:`SHAPES`.
    """
    meta = normalize_metadata(metadata)
    specs: list[tuple[int, str, str | None]] = []  # (clause index, shape, colour)
    for i, clause in enumerate(meta["include"]):
        if clause["class"] not in SHAPES:
            raise ValueError(f"metadata: unknown class {clause['class']!r}; expected one of {SHAPES}")
        if "color" in clause and clause["color"] not in PALETTE:
            raise ValueError(f"metadata: unknown color {clause['color']!r}; expected one of {tuple(PALETTE)}")
        specs.extend((i, clause["class"], clause.get("color")) for _ in range(clause["count"]))
    if not 1 <= len(specs) <= _MAX_OBJECTS:
        raise ValueError(
            f"metadata: render draws 1 to {_MAX_OBJECTS} objects, the clauses ask for {len(specs)}"
        )
    relations = [
        (i, clause["position"][1], clause["position"][0])
        for i, clause in enumerate(meta["include"])
        if "position" in clause
    ]
    colors = list(PALETTE)
    low, high = _SIZE_RANGE[len(specs)]
    for _attempt in range(1000):
        placed: list[PlacedObject] = []
        for _, shape, color in specs:
            side = float(rng.uniform(low, high))
            lo, hi = side / 2 + _BORDER, BASE_SIZE - side / 2 - _BORDER
            for _try in range(50):
                obj = PlacedObject(
                    shape=shape,
                    color=color if color is not None else colors[int(rng.integers(len(colors)))],
                    cx=float(rng.uniform(lo, hi)),
                    cy=float(rng.uniform(lo, hi)),
                    side=side,
                )
                if all(_apart(obj, other) for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) != len(specs):
            continue
        owner = [i for i, _, _ in specs]
        if all(
            _relation_ok(a, b, rel)
            for i, j, rel in relations
            for a, ia in zip(placed, owner)
            if ia == i
            for b, ib in zip(placed, owner)
            if ib == j
        ):
            return placed
    raise RuntimeError(f"could not place the objects of {meta['prompt']!r}")  # pragma: no cover


def _shape_mask(obj: PlacedObject, ys: np.ndarray, xs: np.ndarray, scale: float) -> np.ndarray:
    """Pixels whose centres fall inside ``obj`` drawn at ``scale`` (hard edges).

    The box is snapped to whole pixels first, so a shape looks the same wherever it lands.
    """
    side = max(round(obj.side * scale), 3)
    x0, y0 = round(obj.cx * scale - side / 2), round(obj.cy * scale - side / 2)
    cx, cy, half = x0 + side / 2, y0 + side / 2, side / 2
    px, py = xs + 0.5, ys + 0.5
    if obj.shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= half**2
    inside_box = (np.abs(px - cx) <= half) & (np.abs(py - cy) <= half)
    if obj.shape == "square":
        return inside_box
    # Upward isosceles triangle filling the box: apex at the top centre, base along the bottom.
    depth = (py - (cy - half)) / (2 * half)
    return inside_box & (np.abs(px - cx) <= depth * half)


def render_layout(objects: list[PlacedObject], size: int = BASE_SIZE) -> Image.Image:
    """Draw placed objects on a white ``size``×``size`` RGB canvas."""
    scale = size / BASE_SIZE
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for obj in objects:
        canvas[_shape_mask(obj, ys, xs, scale)] = PALETTE[obj.color]
    return Image.fromarray(canvas, mode="RGB")


def render(metadata: Mapping[str, Any] | str, *, seed: int = 0, size: int = BASE_SIZE) -> Image.Image:
    """Render an RGB image that satisfies ``metadata`` (a dict or JSON string).

    Args:
        metadata: GenEval-style metadata (see :mod:`trl_intrinsic.toyworld.scenes`).
        seed: seed of the layout (sizes, positions, free colours); deterministic.
        size: side of the square image in pixels (≥ 24); objects scale with it (7.5–12 px at 32).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 24:
        raise ValueError(f"size: expected an int ≥ 24 (smaller objects cannot be told apart), got {size!r}")
    return render_layout(layout(metadata, np.random.default_rng(seed)), int(size))
