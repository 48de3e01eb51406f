"""The benchmark scripts run end to end in their ``--quick`` mode (a smoke test: no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_bench_flow_quick_writes_its_tables(tmp_path):
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_flow.py"), "--quick", "--output-dir", str(tmp_path)],
        check=True,
        cwd=BENCHMARKS,
        capture_output=True,
    )
    result = json.loads((tmp_path / "flow.json").read_text())
    assert result["quick"] is True and result["machine"]["cpu_count"] >= 1
    assert {row["benchmark"] for row in result["rows"]} >= {
        "trainer step vs bare compute",
        "SOLACE vs bare batched forwards",
    }
    assert all(row["ratio"] > 0 for row in result["rows"])
    assert "| benchmark |" in (tmp_path / "flow.md").read_text()
