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


def test_learning_speed_summary_pairs_every_point_with_the_base(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import bench_learning_speed as bench

    base = [1, 0, 0, 0]

    def run(method, seed, points):
        curve = [
            {"step": 5 * i, "cpu_s": cpu, "accuracy": sum(c) / 4, "correct": c}
            for i, (cpu, c) in enumerate(points)
        ]
        return {"method": method, "seed": seed, "curve": curve}

    runs = [
        run("a", 0, [(0.0, base), (50.0, [1, 1, 0, 0]), (130.0, [1, 1, 1, 0])]),
        run("a", 1, [(0.0, base), (60.0, [1, 0, 1, 0]), (125.0, [1, 1, 1, 1])]),
    ]
    assert (
        bench.at_cpu(runs[0]["curve"], 55.0)["cpu_s"] == 50.0
        and bench.at_cpu(runs[0]["curve"], None)["cpu_s"] == 130.0
    )
    table = bench.summarise(runs, budget_s=120.0).splitlines()
    # At the end: accuracies 0.75 and 1.0; per-sample changes averaged over seeds: [0, 1, 1, 0.5], mean 0.625,
    # SE = sd([0, 1, 1, 0.5]) / 2 = 0.239.
    assert table[-1] == "| a | 2 | 2.12 | 0.875 | +0.625 ± 0.239 | 0.177 |"
    parts = []
    for i, r in enumerate(runs):
        path = tmp_path / f"{i}.json"
        path.write_text(
            json.dumps({"prompt": "p", "eval_samples": 4, "eval_seeds": "s", "command": f"c{i}", "runs": [r]})
        )
        parts.append(str(path))
    merged = bench.main(["--merge", *parts, "--cpu-minutes", "2", "--output", str(tmp_path / "merged")])
    assert len(merged["runs"]) == 2 and merged["command"] == ["c0", "c1"]
    assert "| a | 2 |" in (tmp_path / "merged.md").read_text()
