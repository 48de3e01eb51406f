"""IntrinsicGRPOTrainer under two CPU processes (torchrun, gloo): a prompt group spans the processes, the rewards
are gathered before the per-group normalisation and give the advantages a single process computes from the same
completions and rewards, only the main process writes files, and a mid-generation checkpoint resumes exactly.
Text LM (tiny causal LM, ``nsc_reward``) and Janus (tiny Janus, IRIS) paths, from one launch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from intrinsic_two_process import make_trainer

SCRIPT = Path(__file__).parent / "scripts" / "intrinsic_two_process.py"
RANK1_MAY_WRITE = ("checkpoint-", "rng_state_1.pth")  # its checkpoint folders and its own RNG state

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run the two-process script once; returns (output dir, results dir)."""
    root = tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        "torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(root / "out"), str(root / "results"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out", root / "results"


def _ranks(results: Path, kind: str) -> list[dict]:
    ranks = [json.loads((results / f"{kind}_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    return ranks


def _check_group_spans_processes(ranks: list[dict]) -> None:
    # one group of G = 4 completions: 2 rows on each process, for the same prompt
    assert ranks[0]["prompts"] == ranks[1]["prompts"] and len(set(ranks[0]["prompts"])) == 1
    # each process samples its own completions (seeded per process), not copies of the other's
    assert ranks[0]["completion_ids"] != ranks[1]["completion_ids"]
    # both processes hold every reward of the group before normalising: NSC of the rows of process 0, then 1
    assert ranks[0]["rewards"] == ranks[1]["rewards"]
    gathered = [row[0] for row in ranks[0]["rewards"]]
    assert gathered == pytest.approx([-s for s in ranks[0]["self_certainty"] + ranks[1]["self_certainty"]])


def _check_advantages(ranks: list[dict], single_process: torch.Tensor) -> None:
    two = torch.tensor(ranks[0]["advantages"] + ranks[1]["advantages"])
    torch.testing.assert_close(two, single_process.float().cpu(), rtol=1e-5, atol=1e-5)
    # normalised over the whole group, not per process: each process's advantages alone do not sum to 0
    assert abs(float(two.sum())) < 1e-4
    assert all(abs(sum(r["advantages"])) > 1e-3 for r in ranks)


def _check_main_process_writes(ranks: list[dict], output_dir: Path) -> None:
    assert ranks[1]["written"] and all(
        part.startswith(RANK1_MAY_WRITE) for path in ranks[1]["written"] for part in path.split(os.sep)
    ), ranks[1]["written"]
    written = set(ranks[0]["written"])
    assert {"checkpoint-1/trainer_state.json", "checkpoint-1/training_args.json", "README.md"} <= written
    assert "completions" in written  # the completions table (log_completions)
    assert not list(output_dir.rglob("training_args.bin"))
    # checkpoint-1 falls between two generations: each process kept its unconsumed rollouts
    for rank in (0, 1):
        with safe_open(str(output_dir / "checkpoint-1" / f"rollout_buffer_{rank}.safetensors"), "pt") as f:
            assert f.metadata()["num_processes"] == "2"


def test_text_lm_two_processes_match_one_process(launch, tmp_path):
    output_dir, results = launch
    ranks = _ranks(results, "text")
    _check_group_spans_processes(ranks)

    # One process, the same generation batch (2 rows per micro-step), replaying the completions the two
    # processes sampled: TRL's scoring path with nsc_reward computes the advantages.
    single = make_trainer("text", str(tmp_path / "one"), per_device_train_batch_size=2)
    outputs = [r["generate"] for r in ranks]
    prompt_ids, completion_ids, _, completions, logprobs, extra, images, tool_images = (
        [*a, *b] if isinstance(a, list) else ({k: a[k] + b[k] for k in a} if isinstance(a, dict) else a)
        for a, b in zip(*outputs, strict=True)
    )
    assert logprobs is None and images is None
    prompts = ranks[0]["prompts"] + ranks[1]["prompts"]

    def replay(called_with):
        assert called_with == prompts
        return prompt_ids, completion_ids, None, completions, None, extra, None, tool_images

    single._generate = replay
    single.model.train()
    out = single._generate_and_score_completions([{"prompt": p} for p in prompts])
    kept = [row[mask.bool()].tolist() for row, mask in zip(out["completion_ids"], out["completion_mask"])]
    assert kept == completion_ids
    _check_advantages(ranks, out["advantages"])

    _check_main_process_writes(ranks, output_dir / "text")

    # A single process cannot take over the two processes' mid-generation rollouts.
    resumed = make_trainer("text", str(tmp_path / "one"), per_device_train_batch_size=2, max_steps=3)
    with pytest.raises(ValueError, match="num_processes=2"):
        resumed.train(resume_from_checkpoint=str(output_dir / "text" / "checkpoint-1"))


def test_two_process_resume_from_mid_generation_is_exact(launch):
    _, results = launch
    ranks = [load_file(results / f"text_rank{r}.safetensors") for r in (0, 1)]
    for tensors in ranks:
        # the rollouts sampled after the resume are those of the uninterrupted run, on each process
        assert torch.equal(tensors["resumed_step2_completion_ids"], tensors["full_step2_completion_ids"])
        full = {k[len("full.") :]: v for k, v in tensors.items() if k.startswith("full.")}
        resumed = {k[len("resumed.") :]: v for k, v in tensors.items() if k.startswith("resumed.")}
        assert full and full.keys() == resumed.keys()
        torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ranks[0]["full_step2_completion_ids"], ranks[1]["full_step2_completion_ids"])
    # data-parallel training keeps one set of weights
    for key, value in ranks[0].items():
        if key.startswith("full."):
            torch.testing.assert_close(ranks[1][key], value)


def test_janus_two_processes_match_one_process(launch, tmp_path):
    output_dir, results = launch
    ranks = _ranks(results, "janus")
    _check_group_spans_processes(ranks)

    # One process, same generation batch, scoring with the rewards the two processes gathered.
    single = make_trainer("janus", str(tmp_path / "one"), per_device_train_batch_size=2)
    gathered = torch.tensor(ranks[0]["rewards"])
    single._calculate_rewards = lambda *args: gathered.clone()
    single.model.train()
    out = single._generate_and_score_completions([{"prompt": p} for p in ranks[0]["prompts"] * 2])
    _check_advantages(ranks, out["advantages"])

    _check_main_process_writes(ranks, output_dir / "janus")
