"""FlowGRPOTrainer under two CPU processes (torchrun, gloo) equals the same run in one process: prompt
groups span the processes, rewards are gathered before the per-group normalisation, the noise of a sample
depends on its global position only, and only the main process writes files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from flow_two_process import make_trainer, record_rollouts

SCRIPT = Path(__file__).parent / "scripts" / "flow_two_process.py"


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
@pytest.mark.parametrize("compile_backend", [None, "eager"], ids=["eager", "torch_compile"])
def test_two_processes_match_one_process(tmp_path, compile_backend):
    # With `torch_compile`, each process compiles its transformer in place inside the DDP wrapper: the
    # gradients are still averaged over the processes.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        "torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        str(tmp_path / "two"), str(tmp_path / "results"), *([compile_backend] if compile_backend else []),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / "results" / f"rank{r}.safetensors") for r in (0, 1)]
    logs = [json.loads((tmp_path / "results" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(int(r["world_size"]) == 2 for r in ranks)

    # One group of G = 4 images spans both processes (2 per process).
    assert logs[0]["prompts"] == logs[1]["prompts"] and len(set(logs[0]["prompts"])) == 1
    two_advantages = torch.cat([r["advantages"] for r in ranks])
    two_latents = torch.cat([r["latents"] for r in ranks])

    single = make_trainer(str(tmp_path / "one"), per_device_train_batch_size=4)
    records = record_rollouts(single)
    single.train()
    (record,) = records
    assert record["prompts"] == logs[0]["prompts"] + logs[1]["prompts"]
    torch.testing.assert_close(two_latents, record["latents"][:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two_advantages, record["advantages"], rtol=1e-4, atol=1e-4)
    # normalised over the whole group, not per process: the advantages of each process alone do not sum to 0
    assert abs(float(two_advantages.sum())) < 1e-4
    assert all(abs(float(r["advantages"].sum())) > 1e-3 for r in ranks)

    # Only the main process writes the weights, trainer state, model card and samples; the other process
    # only creates the checkpoint folder for its own RNG state (Trainer saves one per process).
    assert set(logs[1]["written"]) <= {"checkpoint-1", "checkpoint-1/rng_state_1.pth"}
    written = set(logs[0]["written"])
    assert "checkpoint-1/trainer_state.json" in written
    assert any(path.startswith("samples/") for path in written)
    # The update: the trained adapter of the two processes is that of the single process (gradients averaged).
    two, one = (
        load_file(tmp_path / run / "checkpoint-1" / "pytorch_lora_weights.safetensors")
        for run in ("two", "one")
    )
    assert two.keys() == one.keys()
    start = make_trainer(str(tmp_path / "start"), per_device_train_batch_size=4)
    initial = {n: p for n, p in start.model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(w, torch.zeros_like(w)) for k, w in one.items() if "lora_B" in k)  # it moved
    assert all(torch.equal(w, torch.zeros_like(w)) for w in initial.values())  # from zero
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-7)


def _args(tmp_path, **overrides):
    from trl_intrinsic import FlowGRPOConfig

    values = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", resolution=32,
        num_inference_steps=3, per_device_train_batch_size=2, num_generations=2,
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOConfig(**values)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # 2 per device x 3 micro-steps = 6 images per generation: not whole groups of 4
        ({"steps_per_generation": 3, "num_generations": 4}, "num_generations"),
        # an explicit generation batch must be a multiple of the global batch
        ({"per_device_train_batch_size": 4, "generation_batch_size": 6}, "global batch"),
    ],
    ids=["groups-across-micro-steps", "generation-batch"],
)
def test_generation_batch_must_hold_whole_groups(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **overrides)


def test_eval_batch_must_hold_whole_groups(tmp_path):
    from datasets import Dataset

    from trl_intrinsic import FlowGRPOTrainer
    from trl_intrinsic.testing import tiny_sd3_pipeline

    dataset = Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]})
    args = _args(tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=3, num_generations=2)
    with pytest.raises(ValueError, match="per_device_eval_batch_size"):
        FlowGRPOTrainer(
            tiny_sd3_pipeline(), [lambda prompts, images, **k: [0.0] * len(prompts)], args=args,
            train_dataset=dataset, eval_dataset=dataset,
        )  # fmt: skip
