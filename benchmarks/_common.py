"""Shared helpers of the benchmark scripts: machine description, timing, result files.

Every benchmark compares two or more ways of doing the same work *in the same run* and reports
their ratio, so that the numbers transfer across machines better than absolute times do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = ("numpy", "scipy", "PIL", "torch", "transformers", "diffusers", "trl", "peft", "accelerate")


def machine_info() -> dict[str, object]:
    """Platform, CPU count, thread setting and the versions of the libraries that matter."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    for name in _PACKAGES:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
        info[name if name != "PIL" else "pillow"] = getattr(module, "__version__", "?")
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark accepts: ``--quick`` (a smoke test in seconds) and ``--output-dir``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats (do not commit results)"
    )
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go")
    return parser


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (floats with 4 significant digits)."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def write_results(name: str, result: dict, markdown: str, output_dir: Path = RESULTS_DIR) -> None:
    """Write ``{name}.json`` (``result`` plus machine info) and ``{name}.md`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), **result}
    (output_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    info = result["machine"]
    footer = ", ".join(f"{k} {v}" for k, v in info.items())
    (output_dir / f"{name}.md").write_text(markdown.rstrip() + f"\n\nMachine: {footer}.\n")


def interleaved_times(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each function once per round, alternating them, so that load drifting during the run affects all
    variants alike. Returns ``{name: [seconds per round]}`` after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios ``numerator[i] / denominator[i]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))
