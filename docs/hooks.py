"""MkDocs hook: include the benchmark result tables written by ``benchmarks/`` into the Benchmarks page.

Each ``benchmarks/results/*.md`` file is inserted where the page holds ``<!-- benchmark-results -->``,
with its headings moved one level down, so the page always shows the tables of the last committed run
and never numbers typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- benchmark-results -->"
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def benchmark_results_markdown(results_dir: Path = RESULTS_DIR) -> str:
    """The concatenated result tables, headings demoted by one level; a note when there are none."""
    files = sorted(results_dir.glob("*.md")) if results_dir.is_dir() else []
    if not files:
        return "*No benchmark results are committed yet.*\n"
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8").strip()
        text = re.sub(r"^(#{1,5}) ", r"#\1 ", text, flags=re.MULTILINE)
        parts.append(f"{text}\n\n*Source: `benchmarks/results/{path.name}`.*\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, benchmark_results_markdown())
    return markdown
