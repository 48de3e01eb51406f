"""MkDocs hook: include the benchmark result tables written by ``benchmarks/`` into the Benchmarks page.

A page line ``<!-- benchmark-result NAME -->`` is replaced by ``benchmarks/results/NAME.md`` with its headings
moved two levels down (for a file discussed in its own section). ``<!-- benchmark-results -->`` is replaced by
every other ``benchmarks/results/*.md`` file, headings moved one level down. So the page always shows the
tables of the last committed run and never numbers typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "<!-- benchmark-results -->"
SINGLE_MARKER = re.compile(r"<!-- benchmark-result ([\w.-]+) -->")
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _demoted(path: Path, levels: int) -> str:
    """The markdown of ``path`` with every heading ``levels`` levels deeper, and a line naming the file."""
    text = path.read_text(encoding="utf-8").strip()
    text = re.sub(
        r"^(#{1,5}) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", text, flags=re.MULTILINE
    )
    return f"{text}\n\n*Source: `benchmarks/results/{path.name}`.*\n"


def benchmark_result_markdown(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """The result table ``results_dir/name.md``, headings demoted by two levels; a note when it is missing."""
    path = results_dir / f"{name}.md"
    if not path.is_file():
        return f"*No `benchmarks/results/{name}.md` is committed yet.*\n"
    return _demoted(path, 2)


def benchmark_results_markdown(results_dir: Path = RESULTS_DIR, exclude: set[str] = frozenset()) -> str:
    """The concatenated result tables but ``exclude`` (names without ``.md``), headings demoted by one level;
    a note when there are none."""
    files = sorted(results_dir.glob("*.md")) if results_dir.is_dir() else []
    files = [path for path in files if path.stem not in exclude]
    if not files:
        return "*No benchmark results are committed yet.*\n"
    return "\n".join(_demoted(path, 1) for path in files)


def on_page_markdown(markdown: str, page, config, files) -> str:
    inlined = set(SINGLE_MARKER.findall(markdown))
    markdown = SINGLE_MARKER.sub(lambda match: benchmark_result_markdown(match.group(1)), markdown)
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, benchmark_results_markdown(exclude=inlined))
    return markdown
