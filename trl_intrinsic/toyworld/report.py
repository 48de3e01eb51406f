"""What a toy-world training run reports: accuracy before and after, the reward curve, image grids.

Used by the example scripts and ``examples/evaluate.py``; everything is written as JSON, markdown
and PNG (curves with matplotlib, image grids with PIL).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = ["accuracy_table", "before_after_grid", "plot_curves", "reward_table", "write_accuracy_report"]


def accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table with one column per result (e.g. ``{"before": ..., "after": ...}``) and one row
    per tag plus ``overall``; values are the accuracies of :func:`trl_intrinsic.toyworld.evaluate`."""
    names = list(results)
    first = next(iter(results.values()))
    tags = [k for k, v in first.items() if isinstance(v, (int, float)) and k != "overall"]
    lines = ["| tag | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for tag in [*tags, "overall"]:
        lines.append(f"| {tag} | " + " | ".join(f"{results[n][tag]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def reward_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the ``"rewards"`` entries of ``results`` (``{reward name: mean}`` per result), one
    row per reward; empty when no result has one."""
    names = [n for n in results if results[n].get("rewards")]
    if not names:
        return ""
    keys = list(dict.fromkeys(k for n in names for k in results[n]["rewards"]))
    lines = ["| reward | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in keys:
        cells = (results[n]["rewards"].get(key) for n in names)
        lines.append(f"| {key} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in cells) + " |")
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
    rewards = reward_table(results)
    if rewards:
        markdown += f"\n## Trained rewards on fixed prompts of the same split\n\n{rewards}\n"
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
    """Draw ``{name: [(step, value), ...]}`` as line plots on one PNG of ``size`` pixels, with a legend.

    A curve named ``overall`` is drawn thicker and in black; non-finite values are skipped.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    dpi = 100
    figure, axes = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    try:
        colours = plt.get_cmap("tab10").colors
        drawn = 0
        for k, (name, curve) in enumerate(curves.items()):
            points = [(x, y) for x, y in curve if math.isfinite(y)]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = {"color": "black", "linewidth": 2.5} if name == "overall" else {"color": colours[k % 10]}
            axes.plot(xs, ys, marker="o", markersize=3, label=name, **style)
            drawn += 1
        if drawn:
            axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel("step")
        figure.suptitle(title, fontsize="medium")
        axes.grid(alpha=0.3)
        figure.savefig(path)
    finally:
        plt.close(figure)
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
