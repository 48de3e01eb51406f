"""FlowGRPOTrainer under DeepSpeed ZeRO-2, in one CPU process (DeepSpeed's CPU accelerator)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).parent / "scripts" / "flow_zero2.py"


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_zero2_trains_the_lora_weights_in_one_cpu_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result_path = tmp_path / "result.json"
    command = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "1",
        str(SCRIPT),
        str(tmp_path / "out"),
        str(result_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result_path.read_text())
    assert outcome["deepspeed"] and outcome["zero_stage"] == 2
    assert outcome["global_step"] == 2
    assert float(outcome["ratio"][0]) == pytest.approx(1.0, abs=1e-6)  # on-policy first step
    assert float(outcome["kl"][0]) == 0.0 < float(outcome["kl"][1])  # the second step sees the update
    assert outcome["lora_b_moved"] and outcome["base_changed"] == []  # only the LoRA weights trained
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
