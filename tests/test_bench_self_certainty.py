"""Smoke test of ``benchmarks/bench_self_certainty.py --quick``: it runs and writes its results.

No timing is asserted (the machine is shared); what is checked is that every measurement was made and
that the quantities which do not depend on load are right: the three trainer variants were all timed,
the self-certainty caught from generation equals the one recomputed by an extra forward on the same
rollouts, the chunked and full-logits statistics agree, and the memory rows cover Janus's vocabularies.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_self_certainty.py"


def test_quick_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    result = json.loads((tmp_path / "self_certainty.json").read_text())
    assert result["quick"] is True
    for key in ("platform", "cpu_count", "python", "torch", "transformers", "trl"):
        assert key in result["machine"], key
    assert result["settings"]["rounds"] >= 1

    step = result["training_step"]
    assert [row["variant"] for row in step["rows"]] == ["trl_constant", "intrinsic_nsc", "trl_extra_forward"]
    for row in step["rows"]:
        assert row["steps_timed"] >= 1
        assert 0 < row["min_step_s"] <= row["median_step_s"] < 60
    assert step["rows"][0]["ratio_to_trl_constant"] == step["rows"][0]["paired_ratio_to_trl_constant"] == 1.0
    for key in ("paired_ratio_intrinsic_to_trl_constant", "paired_ratio_extra_forward_to_trl_constant"):
        assert math.isfinite(step[key]) and step[key] > 0, key
    ratio = step["rows"][1]["median_step_s"] / step["rows"][0]["median_step_s"]
    assert math.isclose(step["ratio_intrinsic_to_trl_constant"], ratio, rel_tol=1e-9)
    # Same seed and learning rate 0: both self-certainty variants score the same completions.
    assert step["self_certainty_mean_intrinsic"] > 0
    assert math.isclose(
        step["self_certainty_mean_intrinsic"], step["self_certainty_mean_extra_forward"], rel_tol=1e-3
    )

    memory = result["memory"]
    assert {row["vocab"] for row in memory["rows"]} == {102_400, 16_384}
    for row in memory["rows"]:
        assert row["max_abs_diff"] < 1e-4
        assert row["fp32_logits_mib"] == row["batch"] * row["length"] * row["vocab"] * 4 / 2**20
        # Converting the logits to fp32 alone takes fp32_logits_mib: the full variant cannot peak lower.
        assert row["full_peak_mib"] >= 0.9 * row["fp32_logits_mib"]
        assert row["chunked_peak_mib"] > 0

    markdown = (tmp_path / "self_certainty.md").read_text()
    assert "| variant | median_step_s" in markdown
    assert "| vocab | batch | length" in markdown
    assert "Machine:" in markdown
