"""Mean ± std over seeds of the toy-world reports written by the example scripts.

Lay out runs as ``<root>/<method>/<seed dir>/toy_accuracy.json`` (the ``--output_dir`` of each run), then

    python examples/collect_toy_results.py outputs/results --output docs/toy_results.md

prints one table: the base model (every run's "before", which should agree across methods) and each
method's "after", per tag and overall, as mean ± sample std over its seeds, with the number of seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_runs(root: Path) -> dict[str, list[dict]]:
    """``{method: [toy_accuracy.json of each seed]}`` for ``root/<method>/<seed>/toy_accuracy.json``."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*/*/toy_accuracy.json")):
        runs.setdefault(path.parent.parent.name, []).append(json.loads(path.read_text()))
    if not runs:
        raise ValueError(
            f"No <method>/<seed>/toy_accuracy.json under {root}; pass the parent of the method dirs."
        )
    return runs


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: one row per method (base first), one column per tag plus overall."""
    first = next(iter(runs.values()))[0]["before"]
    tags = [k for k in first if k not in ("overall", "counts")] + ["overall"]
    rows = {"base": [r["before"] for reports in runs.values() for r in reports]}
    rows.update({method: [r["after"] for r in reports] for method, reports in runs.items()})
    seeds = {"base": len(rows["base"]), **{m: len(r) for m, r in runs.items()}}
    lines = ["| model | runs | " + " | ".join(tags) + " |", "|---|---:|" + "---:|" * len(tags)]
    for name, results in rows.items():
        cells = [mean_std([r[tag] for r in results]) for tag in tags]
        lines.append(f"| {name} | {seeds[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory holding <method>/<seed>/toy_accuracy.json")
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    markdown = table(load_runs(args.root))
    if args.output:
        args.output.write_text(markdown + "\n")
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
