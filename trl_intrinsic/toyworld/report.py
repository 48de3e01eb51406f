"""What a toy-world training run reports: accuracy before and after, the reward curve, image grids.

Used by the example scripts and ``examples/evaluate.py``; everything is written as JSON, markdown
and PNG (no plotting library needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = ["accuracy_table", "before_after_grid", "plot_curves", "write_accuracy_report"]

_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table with one column per result (e.g. ``{"before": ..., "after": ...}``) and one row
    per tag plus ``overall``; values are the accuracies of :func:`trl_intrinsic.toyworld.evaluate`."""
    names = list(results)
    tags = [k for k in next(iter(results.values())) if k not in ("overall", "counts")]
    lines = ["| tag | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for tag in [*tags, "overall"]:
        lines.append(f"| {tag} | " + " | ".join(f"{results[n][tag]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def write_accuracy_report(
    output_dir: str | Path, results: dict[str, dict[str, Any]], *, split: str = "test", **extra: Any
) -> Path:
    """Write ``toy_accuracy.json`` and ``toy_accuracy.md`` into ``output_dir``; returns the markdown path.

    ``split`` names the prompts the accuracies were measured on (``"test"``: held-out compositions).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "toy_accuracy.json").write_text(
        json.dumps({**results, "split": split, **extra}, indent=2) + "\n"
    )
    title = "held-out test split" if split == "test" else f"{split} split"
    markdown = f"# Toy-world accuracy ({title})\n\n" + accuracy_table(results) + "\n"
    path = output_dir / "toy_accuracy.md"
    path.write_text(markdown)
    return path


def plot_curves(
    curves: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draw ``{name: [(step, value), ...]}`` as line plots on one PNG with axes and a legend."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for curve in curves.values() for p in curve if math.isfinite(p[1])]
    if not points:
        draw.text((left, top), "no data", fill="black")
        image.save(path)
        return Path(path)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):  # y ticks
        y = y0 + i * (y1 - y0) / 4
        _, py = to_pixel(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black")
    for i in range(5):  # x ticks
        x = x0 + i * (x1 - x0) / 4
        px, _ = to_pixel(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{x:.0f}", fill="black")
    draw.text((width // 2 - 15, height - 18), "step", fill="black")
    draw.text((left, 10), title, fill="black")
    for k, (name, curve) in enumerate(curves.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in curve if math.isfinite(y)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((width - right - 200, top + 6 + 14 * k), name, fill=colour)
    image.save(path)
    return Path(path)


def before_after_grid(
    prompts: Sequence[str], before: Sequence[Image.Image], after: Sequence[Image.Image], path: str | Path
) -> Path:
    """Save a two-row grid (top: before training, bottom: after) of images of the same prompts and seeds,
    with the prompt under each column."""
    if not (len(prompts) == len(before) == len(after)) or not prompts:
        raise ValueError("`prompts`, `before` and `after` must be non-empty and of equal length.")
    tile = max(before[0].size[0], 96)
    label = 28
    grid = Image.new("RGB", (tile * len(prompts), 2 * tile + label + 16), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 0), "before", fill="black")
    draw.text((2, tile + 8), "after", fill="black")
    for i, prompt in enumerate(prompts):
        grid.paste(before[i].resize((tile - 4, tile - 4), Image.NEAREST), (i * tile + 2, 12))
        grid.paste(after[i].resize((tile - 4, tile - 4), Image.NEAREST), (i * tile + 2, tile + 20))
        words, line = prompt.split(), ""
        lines = []
        for word in words:  # wrap to the tile width (about 6 px per character)
            if len(line) + len(word) + 1 > tile // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:2]):
            draw.text((i * tile + 2, 2 * tile + 20 + 10 * j), text, fill="black")
    grid.save(path)
    return Path(path)
