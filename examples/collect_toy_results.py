"""Mean ± std over seeds of the toy-world reports written by the example scripts.

Lay out runs as ``<root>/<method>/<seed dir>/toy_accuracy.json`` (the ``--output_dir`` of each run), then

    python examples/collect_toy_results.py outputs/results --output docs/toy_results.md

prints one table: the base model (every run's "before"; one row per group of methods measured the same
way, e.g. with and without a chain-of-thought) and each method's "after", per tag and overall, as mean ±
sample std over its seeds, with the number of seeds. Reports written under the evaluation protocol also carry
the paired change of each run (after − before on the same samples, with its paired SE): a second table lists
it per run, and a third the trained rewards' change on the fixed prompts.
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
    """Markdown: one row per method after training, preceded by the base model ("before") rows, one column per
    tag plus overall. Methods whose before-measurements differ (e.g. sampled with and without a
    chain-of-thought) get a base row each; a tag a method does not report is shown as "—"."""
    results = [r for reports in runs.values() for r in reports]
    tags = list(
        dict.fromkeys(k for r in results for k, v in r["before"].items() if _is_number(v) and k != "overall")
    )
    tags.append("overall")
    groups: dict[str, list[str]] = {}  # methods whose before-accuracies are identical share a base row
    for method, reports in runs.items():
        key = json.dumps(sorted({json.dumps(_accuracies(r["before"]), sort_keys=True) for r in reports}))
        groups.setdefault(key, []).append(method)
    rows = {
        ("base" if len(groups) == 1 else f"base ({', '.join(methods)})"): [
            r["before"] for method in methods for r in runs[method]
        ]
        for methods in groups.values()
    }
    rows.update({method: [r["after"] for r in reports] for method, reports in runs.items()})
    lines = ["| model | runs | " + " | ".join(tags) + " |", "|---|---:|" + "---:|" * len(tags)]
    for name, measured in rows.items():
        cells = [
            mean_std([r[tag] for r in measured]) if all(tag in r for r in measured) else "—" for tag in tags
        ]
        lines.append(f"| {name} | {len(measured)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reward_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: the trained rewards on the fixed prompts (the reports' ``"rewards"``), before and after, and
    their change per seed, one row per method and reward; empty when no report has them."""
    lines = []
    for method, reports in runs.items():
        names = dict.fromkeys(k for r in reports for k in r["before"].get("rewards", {}))
        for name in names:
            pairs = [
                (r["before"]["rewards"][name], r["after"]["rewards"][name])
                for r in reports
                if name in r["before"].get("rewards", {}) and name in r["after"].get("rewards", {})
            ]
            if pairs:
                before, after = zip(*pairs, strict=True)
                change = [a - b for b, a in pairs]
                cells = [mean_std(list(v)) for v in (before, after, change)]
                lines.append(f"| {method} | {name} | {len(pairs)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    header = ["| model | reward | runs | before | after | change |", "|---|---|---:|---:|---:|---:|"]
    return "\n".join(header + lines)


def change_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: per method, the paired change of the overall accuracy of each run (``"difference"`` of its
    report: after − before on the same samples, ± its paired SE; "no measurable change" below 2 SE) and their
    mean ± std over runs; empty when no report has one."""
    lines = []
    for method, reports in runs.items():
        changes = [r["difference"]["overall"] for r in reports if "overall" in r.get("difference", {})]
        if not changes:
            continue
        cells = []
        for c in changes:
            se = c.get("paired_se")
            measurable = se is not None and c["value"] != 0 and abs(c["value"]) >= 2 * se
            cells.append(
                f"{c['value']:+.3f} ± {'—' if se is None else f'{se:.3f}'}"
                + ("" if measurable else " (no measurable change)")
            )
        lines.append(
            f"| {method} | {len(changes)} | "
            + ", ".join(cells)
            + f" | {mean_std([c['value'] for c in changes])} |"
        )
    if not lines:
        return ""
    header = ["| model | runs | change per run (± paired SE) | mean change |", "|---|---:|---|---:|"]
    return "\n".join(header + lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accuracies(result: dict) -> dict:
    """A report entry without its trained rewards (which depend on the run's seed)."""
    return {k: v for k, v in result.items() if k != "rewards"}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="directory holding <method>/<seed>/toy_accuracy.json")
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    runs = load_runs(args.root)
    markdown = table(runs)
    changes = change_table(runs)
    if changes:
        markdown += (
            "\n\nPaired change of the overall accuracy, after − before on the same samples:\n\n" + changes
        )
    rewards = reward_table(runs)
    if rewards:
        markdown += "\n\nTrained rewards on the fixed prompts, mean ± std over seeds:\n\n" + rewards
    if args.output:
        args.output.write_text(markdown + "\n")
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
