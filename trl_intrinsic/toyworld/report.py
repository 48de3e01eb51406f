"""What a toy-world training run reports: accuracy before and after, the paired change, the reward curve,
image grids.

Used by the example scripts and ``examples/evaluate.py``; everything is written as JSON, markdown
and PNG (curves with matplotlib, image grids with PIL). The statistics come from
:mod:`trl_intrinsic.toyworld.evaluation` (:func:`~trl_intrinsic.toyworld.evaluation.paired_difference`,
:func:`~trl_intrinsic.toyworld.evaluation.noise_floor`); this module formats them. A change smaller than
:data:`MEASURABLE_SE` paired standard errors is reported as "no measurable change".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "MEASURABLE_SE",
    "accuracy_table",
    "before_after_grid",
    "change_verdict",
    "difference_table",
    "format_change",
    "format_noise_floor",
    "plot_curves",
    "reward_table",
    "write_accuracy_report",
]

MEASURABLE_SE = 2.0
"""A change is claimed only when it is at least this many paired standard errors away from zero."""

SAMPLES_FILE = "toy_accuracy_samples.jsonl"
_RECORD_FIELDS = ("prompt", "tag", "eval_seed", "sample_index", "correct")  # evaluation.SampleResult


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


def reward_table(
    results: dict[str, dict[str, Any]],
    delta: dict[str, float] | None = None,
    delta_se: dict[str, float] | None = None,
) -> str:
    """Markdown table of the ``"rewards"`` entries of ``results`` (``{reward name: mean}`` per result), one
    row per reward; empty when no result has one. With ``delta`` (and ``delta_se``): a column with the paired
    change of each reward and its SE."""
    names = [n for n in results if results[n].get("rewards")]
    if not names:
        return ""
    keys = list(dict.fromkeys(k for n in names for k in results[n]["rewards"]))
    extra = " change (paired SE) |" if delta else ""
    lines = ["| reward | " + " | ".join(names) + " |" + extra, "|---|" + "---:|" * (len(names) + bool(delta))]
    for key in keys:
        cells = (results[n]["rewards"].get(key) for n in names)
        line = f"| {key} | " + " | ".join("—" if v is None else f"{v:.4g}" for v in cells) + " |"
        if delta:
            value, se = delta.get(key), (delta_se or {}).get(key)
            line += (
                " — |" if value is None else f" {_signed(value)} ± {_num(se)} ({change_verdict(value, se)}) |"
            )
        lines.append(line)
    return "\n".join(lines)


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}"


def change_verdict(value: float, se: float | None) -> str:
    """``"rise"`` or ``"drop"`` when ``|value| ≥`` :data:`MEASURABLE_SE` ``× se``, else ``"no measurable
    change"`` (also when the SE is unknown)."""
    if se is None or not math.isfinite(se) or abs(value) < MEASURABLE_SE * se or value == 0:
        return "no measurable change"
    return "rise" if value > 0 else "drop"


def format_change(entry: dict[str, Any]) -> str:
    """One line for an entry of :func:`~trl_intrinsic.toyworld.evaluation.paired_difference`, e.g.
    ``0.185 → 0.201: +0.016 ± 0.011 paired SE (1.4 SE), flips 14 wrong→right / 7 right→wrong (p = 0.19):
    no measurable change``."""
    value, se = entry["value"], entry["paired_se"]
    z = f" ({abs(value) / se:.1f} SE)" if se and math.isfinite(se) else ""
    return (
        f"{entry['before']:.3f} → {entry['after']:.3f}: {_signed(value)} ± {_num(se)} paired SE{z}, flips "
        f"{entry['wrong_to_right']} wrong→right / {entry['right_to_wrong']} right→wrong "
        f"(p = {entry['flip_p_value']:.2g}): {change_verdict(value, se)}"
    )


def difference_table(
    difference: dict[str, dict[str, Any]], names: tuple[str, str] = ("before", "after")
) -> str:
    """Markdown table of :func:`~trl_intrinsic.toyworld.evaluation.paired_difference`: one row per tag and
    overall with n, distinct prompts, the two accuracies, the change, its paired SE, the flips and the verdict."""
    first, second = names
    lines = [
        f"| tag | n | prompts | {first} | {second} | change | paired SE | wrong→right | right→wrong | p (flips) | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for tag, e in difference.items():
        lines.append(
            f"| {tag} | {e['n']} | {e['prompts']} | {e['before']:.3f} | {e['after']:.3f} | {_signed(e['value'])} | "
            f"{_num(e['paired_se'])} | {e['wrong_to_right']} | {e['right_to_wrong']} | {e['flip_p_value']:.2g} | "
            f"{change_verdict(e['value'], e['paired_se'])} |"
        )
    return "\n".join(lines)


def format_noise_floor(noise_floor: dict[str, Any] | None, hint: str = "") -> str:
    """One line on the evaluation noise floor of :func:`~trl_intrinsic.toyworld.evaluation.noise_floor`, or
    that it was not measured (``hint`` says how to measure it)."""
    if not noise_floor:
        return "evaluation noise floor: not measured" + (f" ({hint})" if hint else "")
    seeds = noise_floor["seeds"]
    return (
        f"evaluation noise floor: SD {noise_floor['sd']:.3f} of the overall accuracy of {noise_floor.get('model', 'one model')} "
        f"over {noise_floor['n_seeds']} evaluation seeds ({seeds[0]}–{seeds[-1]}), "
        f"{noise_floor['n_samples']} samples over {noise_floor['prompts']} distinct prompts each"
    )


def _json_safe(value: Any) -> Any:
    """NaN and infinities become ``null`` (strict JSON); tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_accuracy_report(
    output_dir: str | Path,
    results: dict[str, dict[str, Any]],
    *,
    split: str = "test",
    difference: dict[str, dict[str, Any]] | None = None,
    noise_floor: dict[str, Any] | None = None,
    sampler: str | None = None,
    protocol: dict[str, Any] | None = None,
    rewards_delta: dict[str, float] | None = None,
    rewards_delta_se: dict[str, float] | None = None,
    noise_floor_hint: str = "",
    **extra: Any,
) -> Path:
    """Write ``toy_accuracy.json`` and ``toy_accuracy.md`` into ``output_dir``; returns the markdown path.

    Args:
        results: ``{name: scores}`` of the evaluators (e.g. ``"before"`` and ``"after"``); their per-sample
            ``"records"`` go to ``toy_accuracy_samples.jsonl`` (one line per sample, with the name), not to the JSON.
        split: the prompts the accuracies were measured on (``"test"``: held-out compositions).
        difference: :func:`~trl_intrinsic.toyworld.evaluation.paired_difference` of the last result against the
            first.
        noise_floor: :func:`~trl_intrinsic.toyworld.evaluation.noise_floor` (``None``: not measured;
            ``noise_floor_hint`` says how to measure it).
        sampler: ``"deterministic"`` or ``"rollout"``.
        protocol: :meth:`EvalProtocol.to_dict() <trl_intrinsic.toyworld.evaluation.EvalProtocol.to_dict>`.
        rewards_delta, rewards_delta_se: per reward, the paired change of its mean on the fixed prompts and its SE.
        **extra: more top-level JSON entries.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = {name: r.get("records") for name, r in results.items() if r.get("records") is not None}
    results = {name: {k: v for k, v in r.items() if k != "records"} for name, r in results.items()}
    report: dict[str, Any] = {**results, "split": split}
    if difference is not None:
        names = list(results)
        report["difference_of"] = f"{names[-1]} - {names[0]}"
        report["difference"] = difference
    report["noise_floor"] = noise_floor
    if sampler is not None:
        report["sampler"] = sampler
    if protocol is not None:
        report["protocol"] = protocol
    if rewards_delta is not None:
        report["rewards_delta"] = rewards_delta
        report["rewards_delta_se"] = rewards_delta_se or {}
    report.update(extra)
    (output_dir / "toy_accuracy.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    if records:
        with open(output_dir / SAMPLES_FILE, "w") as f:
            for name, rows in records.items():
                for row in rows:
                    f.write(json.dumps({"model": name, **dict(zip(_RECORD_FIELDS, row, strict=True))}) + "\n")
    title = "held-out test split" if split == "test" else f"{split} split"
    markdown = f"# Toy-world accuracy ({title})\n\n" + accuracy_table(results) + "\n"
    if difference is not None:
        names = list(results)
        markdown += (
            f"\n## Paired change ({names[-1]} − {names[0]}, same prompts and seeds)\n\n"
            + difference_table(difference, (names[0], names[-1]))
            + f'\n\nChanges below {MEASURABLE_SE:g} paired SE are reported as "no measurable change"; the SE '
            "comes from the per-prompt mean differences (samples of one prompt are correlated), the flip p-value "
            "is McNemar's exact test.\n"
        )
    markdown += "\n" + format_noise_floor(noise_floor, noise_floor_hint) + ".\n"
    if sampler is not None:
        markdown += f"Sampler: {sampler}.\n"
    if protocol is not None:
        markdown += (
            f"Protocol: {protocol['n_samples']} samples over {protocol['n_prompts']} distinct prompts, evaluation "
            f"seed {protocol['seed']}.\n"
        )
    rewards = reward_table(results, rewards_delta, rewards_delta_se)
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
    smooth: Sequence[str] = (),
) -> Path:
    """Draw ``{name: [(step, value), ...]}`` as line plots on one PNG of ``size`` pixels, with a legend.

    A curve named ``overall`` is drawn thicker and in black; non-finite values are skipped. Curves named in
    ``smooth`` (noisy per-step values) are drawn as faint points under their running mean over a window of
    about a tenth of the points (at least 3).
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
            if name in smooth and len(ys) >= 3:
                axes.plot(xs, ys, "o", markersize=2.5, alpha=0.3, color=style["color"])
                axes.plot(xs, running_mean(ys, max(3, len(ys) // 10)), label=f"{name} (running mean)", **style)
            else:
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


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window − 1`` before it (fewer at the start): a causal moving average."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _wrap(text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` characters (longer words stay whole)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line]


def before_after_grid(
    prompts: Sequence[str], before: Sequence[Image.Image], after: Sequence[Image.Image], path: str | Path
) -> Path:
    """Save a two-row grid (top: before training, bottom: after) of images of the same prompts and seeds,
    with the prompt under each column."""
    if not (len(prompts) == len(before) == len(after)) or not prompts:
        raise ValueError("`prompts`, `before` and `after` must be non-empty and of equal length.")
    tile = max(before[0].size[0], 96)
    labels = [_wrap(prompt, tile // 6) for prompt in prompts]  # about 6 px per character
    grid = Image.new("RGB", (tile * len(prompts), 2 * tile + 24 + 10 * max(map(len, labels))), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 0), "before", fill="black")
    draw.text((2, tile + 8), "after", fill="black")
    for i, lines in enumerate(labels):
        grid.paste(before[i].resize((tile - 4, tile - 4), Image.NEAREST), (i * tile + 2, 12))
        grid.paste(after[i].resize((tile - 4, tile - 4), Image.NEAREST), (i * tile + 2, tile + 20))
        for j, text in enumerate(lines):  # the whole prompt, however many lines it takes
            draw.text((i * tile + 2, 2 * tile + 20 + 10 * j), text, fill="black")
    grid.save(path)
    return Path(path)
