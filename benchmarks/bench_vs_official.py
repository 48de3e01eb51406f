"""Our FlowGRPOTrainer against the official research scripts on the same work, and against the floor.

    python benchmarks/bench_vs_official.py --work both --threads 1 2 --pairs 3   # about 1 h on 2 CPU cores
    python benchmarks/bench_vs_official.py --quick                               # minutes; a smoke test
    python benchmarks/bench_vs_official.py --profile --work both                 # py-spy profile of our epochs
    python benchmarks/bench_vs_official.py --from-raw A.json B.json   # re-summarise (and merge) results
    python benchmarks/bench_vs_official.py --from-raw A.json --threads 2   # keep the 2-thread runs of A

The official side is the **unmodified** ``scripts/train_sd3.py`` of ``yifan123/flow_grpo`` (``--work
flowgrpo``) and ``scripts/train_sd3_self.py`` of ``wookiekim/SOLACE`` (``--work solace``), run on CPU by the
harness in ``../shared/perf_vs_official/flowgrpo_baseline`` (beside the repository; ``--harness``) from
fetched snapshots of those repositories (``--mirror-root``, or ``MIRROR_ROOT``: the folder holding
``yifan123+flow_grpo/repo`` and ``wookiekim+SOLACE/repo``). Neither is part of this repository; without them
the script stops and says what is missing.

Per work and thread count, each *pair* runs, in a fresh process each and in an order that rotates from
pair to pair: our trainer (``_vs_official_worker.py ours``, through the public API), the official script at
its shipped batch settings (8 images per sampling and training batch), at every other batch setting of
``--official-batches`` (16: the same images, forwards of twice the rows, the same optimizer steps), and the
floor (``_vs_official_worker.py floor``: the bare transformer forwards and backwards of one epoch at the
batch sizes used). Each training run does ``--epochs`` epochs; epoch 0 (warm-up) is not counted. Reported:
medians over the counted epochs of every pair, per phase (sampling, reward, training, other) and per epoch,
with CPU seconds, peak RSS and transformer forwards; ratios ours / official from the same pairs (the median
over all epochs, and the range of the per-pair ratios); our epoch as a multiple of the floor. Writes
``benchmarks/results/vs_official.{json,md}`` (``vs_official_profile.*`` with ``--profile``).

``--ours-variants`` adds sides of ours with other settings for the same work, measured in the same pairs
against the same targets: ``b16`` (micro-batches of 16 images), ``compiled`` (``torch_compile=True``) and
``b16_compiled``. ``--env KEY=VALUE …`` sets environment variables of every measured process, ours and
official alike (allocator settings, for instance), and ``--name`` names the results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, write_results

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_vs_official_worker.py"
DEFAULT_HARNESS = ROOT.parent / "shared" / "perf_vs_official"
OFFICIAL = {  # work -> (snapshot folder under the mirror root, script, repository)
    "flowgrpo": ("yifan123+flow_grpo", "scripts/train_sd3.py", "yifan123/flow_grpo"),
    "solace": ("wookiekim+SOLACE", "scripts/train_sd3_self.py", "wookiekim/SOLACE"),
}
SHIPPED_BATCH = 8
IMAGES_PER_EPOCH = 32
PHASES = ("sampling", "reward", "training", "other")
FORWARD_PHASES = ("sample", "reward", "train_grad", "train_nograd")
TARGET_SPEEDUP = 1.5
TARGET_FLOOR_MULTIPLE = 1.3
OURS_VARIANTS = {  # extra sides of ours (``--ours-variants``), same work: (images per micro-batch, compiled, what)
    "b16": (16, False, "micro-batches of 16 images (`per_device_train_batch_size=16`, `steps_per_generation=2`, "
            "`gradient_accumulation_steps=1`)"),
    "compiled": (SHIPPED_BATCH, True, "`torch_compile=True` (the transformer compiled in place, inductor)"),
    "b16_compiled": (16, True, "both"),
}  # fmt: skip
KNOWN_DIFFERENCES = {
    "flowgrpo": [
        "CFG in training: both detach the unconditional half (ours: `cfg_uncond_gradient=False`, the default). "
        "Ours runs that half in its own no-grad forward, and until the epoch's first optimizer step reuses the "
        "unconditional velocity recorded while sampling, so its backward covers the 8 conditional rows of a "
        "trained step where the official script's covers the 16 rows of its batched forward (the grad and "
        "no-grad row counts above). Same numbers.",
        "EMA of the LoRA weights: the official script keeps one (decay 0.9, every 8 steps); ours has the same "
        "option (`ema=True`), off by default and here (254k parameters, a negligible cost).",
        "No-grad policy forwards (sampling, SOLACE's probes): ours fuses the LoRA into temporary copies of the "
        "weights (`fuse_lora_for_sampling=True`, the default); the official script runs the adapters. Same "
        "numbers up to float rounding.",
        "Text encoding: ours encodes each unique prompt once per epoch; the official script encodes every image's "
        "prompt (not transformer work).",
    ],
    "solace": [
        "VAE decoding: the official script decodes all 32 images (its pipeline always does), which no reward "
        "uses; ours skips decoding (`SolaceReward.requires_images = False`).",
        "SOLACE normalisation set: the authors standardise the per-step scores over one sampling batch (8 "
        "images); ours over the reward call (the 32 images of the epoch). At official batch 16 the authors' set "
        "is 16 images. Same forwards; different reward values.",
        "SOLACE probes: ours shares the K probes within a prompt group (the paper); the authors draw them per "
        "image. Same forwards.",
        "CFG in training, EMA and fused LoRA: as for Flow-GRPO.",
    ],
}


# ---------------------------------------------------------------------------------------------- running
def subprocess_env(repo: Path) -> dict[str, str]:
    """Environment of every measured process: offline, no telemetry, this checkout's package first."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
        PYTHONPATH=os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p),
    )  # fmt: skip
    return env


def find_snapshot(work: str, mirror_root: Path | None) -> tuple[Path, str]:
    """The git directory of the fetched official repository for ``work`` and its commit; exits if absent."""
    folder, script, repository = OFFICIAL[work]
    candidates = [mirror_root / folder / "repo", mirror_root / folder] if mirror_root else []
    for candidate in candidates:
        ok = subprocess.run(
            ["git", "--git-dir", str(candidate), "cat-file", "-e", f"HEAD:{script}"], capture_output=True
        )
        if candidate.is_dir() and ok.returncode == 0:
            commit = subprocess.run(
                ["git", "--git-dir", str(candidate), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            return candidate, commit
    sys.exit(
        f"bench_vs_official: no snapshot of {repository} with {script} under --mirror-root="
        f"{mirror_root or '<unset>'}. Fetch github:{repository} (a snapshot lands in a folder such as "
        f"<mirror root>/{folder}/repo) and pass the mirror root as --mirror-root or MIRROR_ROOT."
    )


def check_harness(harness: Path) -> None:
    """Exit with a clear message if the harness that runs the official scripts is not there."""
    needed = [harness / "flowgrpo_baseline" / name for name in ("run.sh", "make_prompts.py", "cpu_config.py")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        sys.exit(
            "bench_vs_official: the harness that runs the official scripts is missing "
            f"({', '.join(missing)}). It lives in ../shared/perf_vs_official beside the repository; pass its "
            "location as --harness."
        )


def official_flags(batch: int) -> list[str]:
    """absl flags that set the official script's batch knobs to ``batch`` images per sampling and training batch,
    keeping the work: 32 images per epoch (``num_batches_per_epoch``), the script's training batches (it
    re-batches its samples into ``num_batches_per_epoch`` batches) and the optimizer steps per epoch
    (``gradient_accumulation_steps`` = batches / 2)."""
    if batch == SHIPPED_BATCH:
        return []
    batches = IMAGES_PER_EPOCH // batch
    if IMAGES_PER_EPOCH % batch or batches % 2:
        raise ValueError(f"official batch {batch}: 32 / batch must be an even number of batches (4, 8 or 16)")
    return [
        f"--config.sample.train_batch_size={batch}", f"--config.sample.num_batches_per_epoch={batches}",
        f"--config.train.batch_size={batch}", f"--config.train.gradient_accumulation_steps={batches // 2}",
    ]  # fmt: skip


def official_epochs(timing: dict[str, Any], first_epoch: int = 1) -> list[dict[str, Any]]:
    """Per-epoch records of the harness's ``timing.json`` in the workers' format (epochs ≥ ``first_epoch``).

    Sampling excludes a reward computed inside the sampling loop (SOLACE's probes); reward = that inline
    reward + the time spent waiting for the reward thread pool (Flow-GRPO's jpeg reward runs beside
    sampling); other = what lies between the phases (advantages, statistics).
    """
    records = []
    for key, e in sorted(timing.get("epochs", {}).items(), key=lambda kv: int(kv[0])):
        if int(key) < first_epoch:
            continue
        inline, inline_cpu = e.get("reward_inline_s") or 0.0, e.get("reward_inline_cpu_s") or 0.0
        records.append(
            {
                "wall_s": e["epoch_wall_s"], "wall_cpu_s": e.get("epoch_cpu_s"),
                "sampling_s": round(e["sampling_phase_s"] - inline, 4),
                "sampling_cpu_s": round(e.get("sampling_phase_cpu_s", 0.0) - inline_cpu, 4),
                "reward_s": round(inline + (e.get("reward_wait_s") or 0.0), 4), "reward_cpu_s": inline_cpu,
                "training_s": e["training_s"], "training_cpu_s": e.get("training_cpu_s"),
                "other_s": e["other_s"], "other_cpu_s": None,
                "forwards": e["transformer_forwards"], "vae_rows": e["images"],
                "optimizer_steps": e["optimizer_steps"],
            }
        )  # fmt: skip
    return records


class Runner:
    """Runs the measured processes of one benchmark invocation and keeps their logs in ``scratch``."""

    def __init__(self, args: argparse.Namespace, scratch: Path):
        self.args, self.scratch = args, scratch
        self.env = subprocess_env(ROOT)
        self.env.update(dict(item.split("=", 1) for item in args.env))  # --env: every side, the same
        self.pipe = scratch / "toy_pipe"
        self.dataset = scratch / "dataset"
        self.snapshots: dict[str, tuple[Path, str]] = {}

    def _worker(self, argv: list[str], out: Path, tag: str) -> dict[str, Any] | None:
        """Run a worker writing ``out``, or with ``--reuse`` take the ``out`` an earlier invocation left;
        ``None`` if it failed."""
        if not (self.args.reuse and out.is_file()):
            rc = self._run(argv, self.scratch / f"{tag}.log")
            if rc or not out.is_file():
                return None
        return json.loads(out.read_text())

    def _run(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        with open(log, "w") as f:
            try:
                done = subprocess.run(
                    argv, stdout=f, stderr=subprocess.STDOUT, env=env or self.env, timeout=3600
                )
            except subprocess.TimeoutExpired:
                return -1
        return done.returncode

    def prepare(self, works: list[str]) -> None:
        """Check the harness and the snapshots, save the toy pipeline and write the prompt set."""
        check_harness(self.args.harness)
        for work in works:
            self.snapshots[work] = find_snapshot(work, self.args.mirror_root)
        if self._run([sys.executable, str(WORKER), "save-pipe", str(self.pipe)], self.scratch / "pipe.log"):
            sys.exit(f"bench_vs_official: could not save the toy pipeline (see {self.scratch / 'pipe.log'})")
        make_prompts = self.args.harness / "flowgrpo_baseline" / "make_prompts.py"
        if self._run([sys.executable, str(make_prompts), str(self.dataset)], self.scratch / "prompts.log"):
            sys.exit(f"bench_vs_official: make_prompts.py failed (see {self.scratch / 'prompts.log'})")

    def ours(
        self, work: str, threads: int, tag: str, pyspy: Path | None = None, variant: str = ""
    ) -> dict[str, Any]:
        """Our trainer; ``variant`` (see ``OURS_VARIANTS``) changes its batch or compiles the transformer."""
        out = self.scratch / f"{tag}.json"
        batch, compiled, _ = OURS_VARIANTS.get(variant, (SHIPPED_BATCH, False, ""))
        argv = [
            sys.executable, str(WORKER), "ours", "--work", work, "--pipe", str(self.pipe),
            "--prompts", str(self.dataset / "train.txt"), "--threads", str(threads),
            "--epochs", str(self.args.epochs), "--batch", str(batch), "--out", str(out),
        ]  # fmt: skip
        if compiled:
            argv.append("--compile")
        if pyspy is not None:
            argv += ["--pyspy", str(pyspy)]
        result = self._worker(argv, out, tag)
        if result is None:
            return {"side": "ours", "status": f"failed (log {self.scratch / f'{tag}.log'})"}
        result["warmup_s"] = result["epochs"][0]["wall_s"] if result["epochs"] else None
        result["epochs"] = result["epochs"][1:]
        return result

    def official(self, work: str, threads: int, batch: int, tag: str) -> dict[str, Any]:
        git_dir, commit = self.snapshots[work]
        run_dir = self.scratch / tag
        env = dict(self.env)
        env.update(
            MODE=work, EPOCHS=str(self.args.epochs), REPORT_EPOCH="1", THREADS=str(threads), PY=sys.executable,
            FGB_PIPE=str(self.pipe), FGB_OUT=str(run_dir), FGB_SRC=str(self.scratch / f"src_{work}"),
            FGB_GIT_DIR=str(git_dir), TMPDIR=str(self.scratch),
        )  # fmt: skip
        flags = official_flags(batch)
        argv = [
            "bash",
            str(self.args.harness / "flowgrpo_baseline" / "run.sh"),
            *(["--", *flags] if flags else []),
        ]
        timing_file = run_dir / "timing.json"
        rc = (
            0
            if self.args.reuse and timing_file.is_file()
            else self._run(argv, self.scratch / f"{tag}.log", env)
        )
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        if timing.get("status") != "ok":
            return {"side": "official", "status": f"failed (exit {rc}, log {run_dir / 'train.log'})"}
        return {
            "side": "official", "status": "ok", "batch": batch, "flags": flags, "commit": commit,
            "script": OFFICIAL[work][1], "torch_threads": timing.get("torch_threads"),
            "startup_s": timing.get("startup_s"), "max_rss_mb": timing.get("max_rss_mb"),
            "loadavg_start": [round(x, 2) for x in timing.get("loadavg_start", [])],
            "loadavg_end": [round(x, 2) for x in timing.get("loadavg_end", [])],
            "warmup_s": timing.get("epochs", {}).get("0", {}).get("epoch_wall_s"),
            "epochs": official_epochs(timing),
        }  # fmt: skip

    def floor(self, work: str, threads: int, tag: str) -> dict[str, Any]:
        out = self.scratch / f"{tag}.json"
        argv = [
            sys.executable, str(WORKER), "floor", "--work", work, "--pipe", str(self.pipe),
            "--threads", str(threads), "--out", str(out),
            "--batches", *(str(b) for b in self.args.official_batches),
        ]  # fmt: skip
        if self.args.quick:
            argv += ["--max-calls", "3"]
        result = self._worker(argv, out, tag)
        return result or {"side": "floor", "status": f"failed (log {self.scratch / f'{tag}.log'})"}

    def sweep(self, work: str, threads: int, tag: str) -> dict[str, Any]:
        out = self.scratch / f"{tag}.json"
        argv = [
            sys.executable, str(WORKER), "sweep", "--work", work, "--pipe", str(self.pipe),
            "--threads", str(threads), "--out", str(out), "--rows", "8", "16", "32", "64", "128",
            "--rounds", "1" if self.args.quick else "5",
        ]  # fmt: skip
        result = self._worker(argv, out, tag)
        return result or {"side": "sweep", "status": f"failed (log {self.scratch / f'{tag}.log'})"}


def uptime() -> str:
    """``uptime``'s line (the load averages over 1, 5 and 15 minutes)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def side_names(official_batches: list[int], ours_variants: Sequence[str] = ()) -> list[str]:
    return [
        "ours",
        *(f"ours_{v}" for v in ours_variants),
        *(f"official_b{b}" for b in official_batches),
        "floor",
    ]


def is_ours(name: str) -> bool:
    return name == "ours" or name.startswith("ours_")


def run_pairs(runner: Runner, works: list[str], threads_list: list[int], pairs: int) -> list[dict[str, Any]]:
    """Every pair of every (work, threads) configuration; the order of the sides rotates from pair to pair."""
    runs = []
    names = side_names(runner.args.official_batches, runner.args.ours_variants)
    for threads in threads_list:
        for work in works:
            for pair in range(pairs):
                order = names[pair % len(names) :] + names[: pair % len(names)]
                for name in order:
                    tag = f"{work}_t{threads}_p{pair}_{name}"
                    load = uptime()
                    if is_ours(name):
                        result = runner.ours(work, threads, tag, variant=name.removeprefix("ours").strip("_"))
                    elif name == "floor":
                        result = runner.floor(work, threads, tag)
                    else:
                        result = runner.official(work, threads, int(name.removeprefix("official_b")), tag)
                    result.update(name=name, work=work, threads=threads, pair=pair, uptime_before=load)
                    runs.append(result)
                    print(
                        f"[bench_vs_official] {tag}: {result['status']}  ({load})",
                        file=sys.stderr,
                        flush=True,
                    )
                    (runner.scratch / "runs.json").write_text(json.dumps(runs, indent=1))
    return runs


# ---------------------------------------------------------------------------------------------- summary
def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _forward_signature(epochs: list[dict[str, Any]]) -> dict[str, str]:
    """``{phase: "calls×rows per call"}`` of the transformer forwards per epoch (all distinct values)."""
    out = {}
    for phase in FORWARD_PHASES:
        seen = Counter()
        for e in epochs:
            f = e["forwards"].get(phase) or {"calls": 0, "rows": 0}
            seen[f"{f['calls']}×{f['rows'] // f['calls']}" if f["calls"] else "–"] += 1
        out[phase] = " / ".join(sorted(seen))
    return out


def _total_rows(epochs: list[dict[str, Any]], phase: str) -> set[int]:
    return {(e["forwards"].get(phase) or {"rows": 0})["rows"] for e in epochs}


def summarize_side(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians over every counted epoch of the ``ok`` runs of one side, plus per-run medians."""
    runs = [r for r in runs if r.get("status") == "ok" and r.get("epochs")]
    if not runs:
        return None
    epochs = [e for r in runs for e in r["epochs"]]
    out: dict[str, Any] = {"runs": len(runs), "epochs": len(epochs)}
    for phase in ("wall", *PHASES):
        out[f"{phase}_s"] = _median([e[f"{phase}_s"] for e in epochs])
        out[f"{phase}_cpu_s"] = _median([e.get(f"{phase}_cpu_s") for e in epochs])
    out["wall_min_s"] = min(e["wall_s"] for e in epochs)
    out["wall_max_s"] = max(e["wall_s"] for e in epochs)
    out["warmup_s"] = _median([r.get("warmup_s") for r in runs])
    out["rss_mb"] = _median([r.get("max_rss_mb") for r in runs])
    out["rss_max_mb"] = max(r.get("max_rss_mb") or 0 for r in runs)
    out["forwards"] = _forward_signature(epochs)
    out["rows"] = {phase: sorted(_total_rows(epochs, phase)) for phase in FORWARD_PHASES}
    out["optimizer_steps"] = sorted({e["optimizer_steps"] for e in epochs})
    out["vae_rows"] = sorted({e["vae_rows"] for e in epochs})
    out["per_pair_wall_s"] = {r["pair"]: _median([e["wall_s"] for e in r["epochs"]]) for r in runs}
    out["per_pair_cpu_s"] = {r["pair"]: _median([e.get("wall_cpu_s") for e in r["epochs"]]) for r in runs}
    for phase in PHASES:
        out[f"per_pair_{phase}_s"] = {
            r["pair"]: _median([e[f"{phase}_s"] for e in r["epochs"]]) for r in runs
        }
    return out


def mismatches(ours: dict[str, Any], official: dict[str, Any]) -> list[str]:
    """Differences of measured work between two sides: transformer rows per phase, batching, optimizer steps,
    decoded images."""
    out = []
    for phase in FORWARD_PHASES:
        if ours["rows"][phase] != official["rows"][phase]:
            out.append(
                f"{phase} rows/epoch: ours {ours['rows'][phase]} vs official {official['rows'][phase]}"
            )
        elif ours["forwards"][phase] != official["forwards"][phase]:
            out.append(
                f"{phase} batching (same rows): ours {ours['forwards'][phase]} vs official "
                f"{official['forwards'][phase]}"
            )
    if ours["optimizer_steps"] != official["optimizer_steps"]:
        out.append(
            f"optimizer steps/epoch: ours {ours['optimizer_steps']} vs official {official['optimizer_steps']}"
        )
    if ours["vae_rows"] != official["vae_rows"]:
        out.append(f"VAE-decoded images/epoch: ours {ours['vae_rows']} vs official {official['vae_rows']}")
    return out


def verdict(pair_values: list[float], limit: float) -> str:
    """``met`` when every pair is at or below ``limit``, ``not met`` when none is, else how many are."""
    if not pair_values:
        return "no data"
    n, ok = len(pair_values), sum(v <= limit for v in pair_values)
    if ok == n:
        return f"met ({n}/{n} pairs)"
    if ok == 0:
        return f"not met (0/{n} pairs)"
    return f"unclear ({ok}/{n} pairs meet it)"


def pair_ratios(ours: dict[Any, float | None], other: dict[Any, float | None]) -> list[float]:
    """``ours[p] / other[p]`` for every pair ``p`` both sides completed."""
    ratios = [_ratio(ours[p], other[p]) for p in sorted(set(ours) & set(other), key=str)]
    return [r for r in ratios if r is not None]


def faster(pairs: list[float]) -> str:
    """``yes`` when ours is faster in every pair, ``no`` when in none, else in how many."""
    n, ok = len(pairs), sum(v < 1.0 for v in pairs)
    return "yes" if ok == n else "no" if ok == 0 else f"{ok} of {n} pairs"


def compare(ours: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / ``other``, each the median over the pairs of the per-pair ratio of median epoch times:
    epoch wall and CPU time (with every pair's ratio), phases, peak RSS; and the ratio of the pooled medians."""
    pairs = pair_ratios(ours["per_pair_wall_s"], other["per_pair_wall_s"])
    cpu_pairs = pair_ratios(ours["per_pair_cpu_s"], other["per_pair_cpu_s"])
    out = {
        "epoch": _median(pairs),
        "pairs": pairs,
        "epoch_pooled": _ratio(ours["wall_s"], other["wall_s"]),
        "cpu": _median(cpu_pairs),
        "cpu_pairs": cpu_pairs,
        "rss": _ratio(ours["rss_mb"], other["rss_mb"]),
        "faster": faster(pairs),
        "faster_cpu": faster(cpu_pairs),
    }
    for phase in ("sampling", "reward", "training"):
        phase_pairs = pair_ratios(ours[f"per_pair_{phase}_s"], other[f"per_pair_{phase}_s"])
        out[phase] = _median(phase_pairs) if other[f"{phase}_s"] else None
    return out


def summarize_floor(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Median floor per batch size and phase over the pairs, plus each pair's floor at the shipped batch."""
    runs = [r for r in runs if r.get("status") == "ok"]
    if not runs:
        return None
    out: dict[str, Any] = {"runs": len(runs), "by_batch": {}, "per_pair_s_by_batch": {}}
    batches = sorted({f["batch"] for r in runs for f in r["floors"]})
    for batch in batches:
        floors = [f for r in runs for f in r["floors"] if f["batch"] == batch]
        phases = {
            phase: {
                "calls": floors[0]["phases"][phase]["calls"],
                "rows": floors[0]["phases"][phase]["rows"],
                "total_s": _median([f["phases"][phase]["total_s"] for f in floors]),
                "total_cpu_s": _median([f["phases"][phase].get("total_cpu_s") for f in floors]),
                "median_call_s": _median([f["phases"][phase]["median_call_s"] for f in floors]),
            }
            for phase in floors[0]["phases"]
        }
        out["per_pair_s_by_batch"][str(batch)] = {
            r["pair"]: f["total_s"] for r in runs for f in r["floors"] if f["batch"] == batch
        }
        out["by_batch"][str(batch)] = {
            "total_s": _median([f["total_s"] for f in floors]),
            "total_cpu_s": _median([f.get("total_cpu_s") for f in floors]),
            "phases": phases,
        }
    shipped = [(r["pair"], f) for r in runs for f in r["floors"] if f["batch"] == SHIPPED_BATCH]
    out["per_pair_s"] = {pair: f["total_s"] for pair, f in shipped}
    out["per_pair_cpu_s"] = {pair: f.get("total_cpu_s") for pair, f in shipped}
    return out


def summarize(
    runs: list[dict[str, Any]], official_batches: list[int], ours_variants: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One summary per (work, threads): sides, ratios of each of our sides / each official side (keyed
    ``[ours side][official side]``), floor multiples and target verdicts."""
    configs = []
    for work, threads in dict.fromkeys((r["work"], r["threads"]) for r in runs):
        mine = [r for r in runs if r["work"] == work and r["threads"] == threads]
        sides = {
            name: summarize_side([r for r in mine if r["name"] == name])
            for name in side_names(official_batches, ours_variants)
            if name != "floor"
        }
        floor = summarize_floor([r for r in mine if r["name"] == "floor"])
        config: dict[str, Any] = {
            "work": work, "threads": threads, "pairs": len({r["pair"] for r in mine}), "sides": sides, "floor": floor,
            "ratios": {}, "mismatches": {},
            "uptime": [r["uptime_before"] for r in mine],
            "failed": [f"{r['name']} pair {r['pair']}: {r['status']}" for r in mine if r.get("status") != "ok"],
        }  # fmt: skip
        ours_sides = {n: s for n, s in sides.items() if is_ours(n) and s is not None}
        officials = {n: s for n, s in sides.items() if not is_ours(n) and s is not None}
        config["official_fastest"] = min(officials, key=lambda n: officials[n]["wall_s"], default=None)
        for ours_name, ours in ours_sides.items():
            config["ratios"][ours_name] = {name: compare(ours, side) for name, side in officials.items()}
            config["mismatches"][ours_name] = {
                name: mismatches(ours, side) for name, side in officials.items()
            }
        if floor is not None:
            config["floor_multiple"] = {"sides": {}, "official": {}}
            for ours_name, ours in ours_sides.items():
                wall_pairs = pair_ratios(ours["per_pair_wall_s"], floor["per_pair_s"])
                cpu_pairs = pair_ratios(ours["per_pair_cpu_s"], floor["per_pair_cpu_s"])
                config["floor_multiple"]["sides"][ours_name] = {
                    "wall": _median(wall_pairs), "pairs": wall_pairs,
                    "cpu": _median(cpu_pairs), "cpu_pairs": cpu_pairs,
                }  # fmt: skip
            for name, side in officials.items():
                at_batch = floor["per_pair_s_by_batch"].get(name.removeprefix("official_b"), {})
                config["floor_multiple"]["official"][name] = _median(
                    pair_ratios(side["per_pair_wall_s"], at_batch)
                )
        config["targets"] = targets(config)
        configs.append(config)
    return configs


def _target(side: str, name: str, limit: float, wall: float | None, pairs: list[float], cpu: float | None,
            cpu_pairs: list[float]) -> dict[str, Any]:  # fmt: skip
    return {
        "side": side, "target": name, "limit": limit,
        "measured": wall, "pairs": pairs, "verdict": verdict(pairs, limit),
        "measured_cpu": cpu, "cpu_pairs": cpu_pairs, "verdict_cpu": verdict(cpu_pairs, limit),
    }  # fmt: skip


def targets(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's speed and memory targets for each of our sides in this configuration: what was measured,
    in wall time and in process CPU time, and whether every pair meets the target (``met``), none does
    (``not met``) or some do."""
    shipped, fastest = f"official_b{SHIPPED_BATCH}", config.get("official_fastest")
    out = []
    for side, ratios in config["ratios"].items():
        if shipped in ratios:
            r = ratios[shipped]
            out.append(_target(side, f"≥ {TARGET_SPEEDUP}× faster per epoch than the official script at its "
                               "shipped batch", 1 / TARGET_SPEEDUP, r["epoch"], r["pairs"], r["cpu"],
                               r["cpu_pairs"]))  # fmt: skip
        if config["work"] == "flowgrpo" and fastest in ratios:
            r = ratios[fastest]
            out.append(_target(side, f"faster per epoch than the official script at its fastest batch ({fastest})",
                               1.0, r["epoch"], r["pairs"], r["cpu"], r["cpu_pairs"]))  # fmt: skip
        m = config.get("floor_multiple", {}).get("sides", {}).get(side)
        if m is not None:
            out.append(_target(side, f"our epoch ≤ {TARGET_FLOOR_MULTIPLE}× the floor", TARGET_FLOOR_MULTIPLE,
                               m["wall"], m["pairs"], m["cpu"], m["cpu_pairs"]))  # fmt: skip
        ours, official = config["sides"].get(side), config["sides"].get(shipped)
        if ours and official:
            met = ours["rss_max_mb"] <= official["rss_mb"]
            out.append({"side": side, "target": "peak RSS no higher than the official script's (shipped batch)",
                        "limit": 1.0, "measured": _ratio(ours["rss_mb"], official["rss_mb"]), "pairs": [],
                        "verdict": "met" if met else "not met", "measured_cpu": None, "cpu_pairs": [],
                        "verdict_cpu": "–"})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _range(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if values else "–"


def _pair_counts(configs: list[dict[str, Any]]) -> str:
    counts = sorted({c.get("pairs", 0) for c in configs})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def variants_text(variants: list[str]) -> str:
    """`` (and ours_x: …)`` naming the extra sides of ours, or nothing."""
    if not variants:
        return ""
    return " (and " + "; ".join(f"ours_{v}: {OURS_VARIANTS[v][2]}" for v in variants) + ")"


def markdown(result: dict[str, Any]) -> str:
    """The results page: settings, per-side medians, ratios, floor, targets and work differences."""
    s = result["settings"]
    lines = [
        "# Our trainer against the official scripts, same work" + (" (quick run)" if s.get("quick") else ""),
        "",
        f"Run {result['date']} on {result['nproc']} cores with `{result['command']}`"
        + (f" ({s['invocations']} invocations, pairs merged)" if s.get("invocations", 1) > 1 else "")
        + ". Official code: "
        + ", ".join(
            f"`{OFFICIAL[w][2]}` `{OFFICIAL[w][1]}` at `{c[:7]}`" for w, c in result["commits"].items()
        )
        + ", run unmodified by `../shared/perf_vs_official/flowgrpo_baseline`."
        + (
            f" Every measured process, ours and official, ran with `{' '.join(s['env'])}`."
            if s.get("env")
            else ""
        ),
        "",
        f"Work per epoch (the toy SD3 pipeline, 32 px, fp32, LoRA r 32): 4 prompts × 8 images, 10 SDE steps, "
        f"CFG 4.5, β 0.04; Flow-GRPO trains 9 steps, SOLACE 5 steps with K = 8 antithetic probes. "
        f"{_pair_counts(result['configs'])} pairs per work and thread count; each pair runs "
        f"ours{variants_text(s.get('ours_variants', []))}, the official script at batch {' and '.join(str(b) for b in s['official_batches'])} "
        f"(b{SHIPPED_BATCH} = shipped) and the floor, in a rotating order; {s['epochs']} epochs per run, epoch 0 "
        f"not counted (*epoch 0 s*: its median time, which includes compiling). Times are medians over the counted "
        f"epochs of all pairs, in seconds per epoch; ranges are min–max over epochs (epoch) or over pairs (ratios).",
        "",
        "The official script's batch knobs that change speed but not the work: `sample.train_batch_size` (images "
        "per sampling batch), with `sample.num_batches_per_epoch` keeping 32 images per epoch; the script "
        "re-batches its samples into `num_batches_per_epoch` training batches, so the training batch follows, "
        "and `train.gradient_accumulation_steps` = batches / 2 keeps the optimizer steps per epoch. "
        + "; ".join(
            f"b{b}: `{' '.join(official_flags(b)) or 'shipped config'}`" for b in s["official_batches"]
        )
        + ". Batch 32 would leave one training batch per epoch, hence one optimizer step instead of two: "
        "other work.",
        "",
        "| work | threads | side | epochs | epoch s (range) | sampling | reward | training | other | CPU s | "
        "peak RSS MB | epoch 0 s | forwards: sample / reward / train grad / train ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        for name, side in c["sides"].items():
            if side is None:
                continue
            fw = side["forwards"]
            lines.append(
                f"| {c['work']} | {c['threads']} | {name} | {side['epochs']} | {_f(side['wall_s'])} "
                f"({_f(side['wall_min_s'])}–{_f(side['wall_max_s'])}) | {_f(side['sampling_s'])} | "
                f"{_f(side['reward_s'])} | {_f(side['training_s'])} | {_f(side['other_s'])} | "
                f"{_f(side['wall_cpu_s'], 1)} | {side['rss_mb']:.0f} | {_f(side.get('warmup_s'), 1)} | "
                + " / ".join(fw[p] for p in FORWARD_PHASES)
                + " |"
            )
    lines += [
        "",
        "Ratios ours / official (below 1: ours is faster): in each pair, the ratio of the two sides' median epoch "
        "(or phase) times; *epoch* and the phases are the median of these ratios over the pairs, *pairs* their "
        "range, *faster?* in how many pairs ours was faster. *CPU* is the same for process CPU seconds, which "
        "other jobs on the machine disturb less than wall time (at 1 thread it is the time the epoch actually "
        "ran). Peak RSS: ratio of the medians over the runs.",
        "",
        "| work | threads | side | against | epoch | pairs | faster? | sampling | reward | training | CPU | "
        "CPU pairs | faster by CPU? | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        for side, name, r in ((side, n, r) for side, rs in c["ratios"].items() for n, r in rs.items()):
            lines.append(
                f"| {c['work']} | {c['threads']} | {side} | {name} | **{_f(r['epoch'])}** | {_range(r['pairs'])} | "
                f"{r['faster']} | {_f(r['sampling'])} | {_f(r['reward'])} | {_f(r['training'])} | {_f(r['cpu'])} | "
                f"{_range(r['cpu_pairs'])} | {r['faster_cpu']} | {_f(r['rss'])} |"
            )
    lines += [
        "",
        "The floor: the bare transformer forwards and backwards one epoch needs at the batch sizes used (median "
        "call time × calls), timed in the same pairs with the same LoRA transformer (seconds: medians over the "
        "pairs). *÷ floor*: the median over the pairs of the epoch time over that pair's floor (at the shipped "
        "batch for our sides), with their range.",
        "",
        "| work | threads | batch | floor s | sampling fwd | train fwd+bwd | reference fwd | probe fwd | "
        "official ÷ floor | floor CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        floor = c.get("floor")
        if not floor:
            continue
        for batch, fb in floor["by_batch"].items():
            ph = fb["phases"]

            def cell(phase: str, ph: dict = ph) -> str:
                if phase not in ph:
                    return "–"
                return f"{ph[phase]['total_s']:.2f} ({ph[phase]['calls']}×{ph[phase]['rows']})"

            official = c.get("floor_multiple", {}).get("official", {})
            lines.append(
                f"| {c['work']} | {c['threads']} | {batch} | {_f(fb['total_s'])} | {cell('sample')} | "
                f"{cell('train_grad')} | {cell('train_nograd')} | {cell('reward')} | "
                f"{_f(official.get(f'official_b{batch}'))} | {_f(fb.get('total_cpu_s'))} |"
            )
    lines += [
        "",
        "| work | threads | side | ÷ floor (pairs) | CPU ÷ floor CPU (pairs) |",
        "|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        for side, m in c.get("floor_multiple", {}).get("sides", {}).items():
            lines.append(
                f"| {c['work']} | {c['threads']} | {side} | **{_f(m['wall'])}** ({_range(m['pairs'])}) | "
                f"{_f(m['cpu'])} ({_range(m['cpu_pairs'])}) |"
            )
    lines += [
        "",
        "Targets (ratios as above; *met* when every pair meets the target, *not met* when none does):",
        "",
        "| work | threads | side | target | wall time (pairs) | verdict | CPU time (pairs) | verdict by CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        for t in c.get("targets", []):
            wall = _f(t["measured"]) + (f" ({_range(t['pairs'])})" if t["pairs"] else "")
            cpu = _f(t["measured_cpu"]) + (f" ({_range(t['cpu_pairs'])})" if t["cpu_pairs"] else "")
            lines.append(
                f"| {c['work']} | {c['threads']} | {t['side']} | {t['target']} | {wall} | {t['verdict']} | {cpu} | "
                f"{t['verdict_cpu']} |"
            )
    lines += ["", "Machine load: the 1-minute load average (`uptime`) before each run, 2 cores:", ""]
    for c in result["configs"]:
        loads = sorted(float(u.split("load average:")[-1].split(",")[0]) for u in c["uptime"])
        lines.append(
            f"- {c['work']}, {c['threads']} thread(s): {loads[0]:.2f}–{loads[-1]:.2f}, median "
            f"{statistics.median(loads):.2f} ({len(loads)} runs)"
        )
    lines += ["", "Measured work differences (forwards, optimizer steps, decoded images):", ""]
    any_mismatch = False
    for c in result["configs"]:
        for side, by_official in c["mismatches"].items():
            for name, items in by_official.items():
                for item in items:
                    any_mismatch = True
                    lines.append(f"- {c['work']}, {c['threads']} thread(s), {side} vs {name}: {item}")
        for item in c.get("failed", []):
            lines.append(f"- {c['work']}, {c['threads']} thread(s): run failed: {item}")
    if not any_mismatch:
        lines.append("- none")
    lines += ["", "Known differences that the counts above do not show:", ""]
    for work in dict.fromkeys(c["work"] for c in result["configs"]):
        lines += [f"- {work}: {item}" for item in KNOWN_DIFFERENCES[work]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- profile
PROFILE_CATEGORIES = (
    # (name, frame substrings that must all be in the stack), first match wins
    ("training: backward", ("_engine_run_backward",)),
    ("training: policy forward (transformer)", ("_timestep_loss@policy", "_transformer_forward")),
    ("training: reference forward (transformer)", ("_timestep_loss@reference", "_transformer_forward")),
    ("training: LoRA disable/enable for the reference", ("_timestep_loss", "able_adapters")),
    ("training: SDE log-prob, loss, KL, metrics", ("_timestep_loss",)),
    ("sampling: transformer forwards", ("_sample_rollouts", "_transformer_forward")),
    ("sampling: SDE steps and other rollout work", ("_sample_rollouts",)),
    ("reward: SOLACE probe forwards (transformer)", ("_calculate_rewards", "_transformer_forward")),
    ("reward: other", ("_calculate_rewards",)),
    ("sampling: VAE decode", ("_decode_if_needed",)),
    ("sampling: prompt encoding", ("._encode",)),
    ("collapse statistics", ("_log_collapse_statistics",)),
    ("advantages and rollout metrics", ("_generate_and_score",)),
    ("gradient clipping", ("_clip_grad_norm",)),
    ("optimizer step", ("AcceleratedOptimizer.step",)),
    ("logging", ("_maybe_log_save_evaluate",)),
    ("rest of training_step / accelerate", ("training_step",)),
    ("rest of the Trainer loop", ("_inner_training_loop",)),
)


def _frame_names(stack: str, policy_line: int | None) -> list[str]:
    """Qualified function names of a collapsed stack; ``_timestep_loss`` frames also get ``@policy`` or
    ``@reference`` after the line that called the transformer."""
    names = []
    for frame in stack.split(";"):
        name = frame.split(" (")[0]
        names.append(name)
        if name.endswith("._timestep_loss") and policy_line is not None:
            line = frame.rsplit(":", 1)[-1].rstrip(")")
            names.append("_timestep_loss@" + ("policy" if line == str(policy_line) else "reference"))
    return names


def categorize_profile(lines: list[str]) -> dict[str, int]:
    """py-spy ``raw`` (collapsed) stacks → samples per category of :data:`PROFILE_CATEGORIES`.

    A category matches a stack when each of its substrings occurs in some frame's qualified name. The policy
    and the reference forward of a training step are told apart by the line of ``_timestep_loss`` that calls
    the transformer: the first such line is the policy's.
    """
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack, int(count)))
    replay_lines = sorted(
        {
            int(frame.rsplit(":", 1)[-1].rstrip(")"))
            for stack, _ in stacks
            if "_transformer_forward" in stack
            for frame in stack.split(";")
            if frame.split(" (")[0].endswith("._timestep_loss")
        }
    )
    policy_line = replay_lines[0] if replay_lines else None
    counts: Counter = Counter()
    for stack, count in stacks:
        names = _frame_names(stack, policy_line)
        for category, needles in PROFILE_CATEGORIES:
            if all(any(needle in name for name in names) for needle in needles):
                counts[category] += count
                break
        else:
            counts["outside the training loop"] += count
    return dict(counts)


def _load_text(result: dict[str, Any]) -> str | None:
    """The load averages a worker recorded when it started, in ``uptime``'s words."""
    load = result.get("loadavg_start")
    return "load average: " + ", ".join(f"{x:.2f}" for x in load) if load else None


def run_profile(runner: Runner, works: list[str]) -> dict[str, Any]:
    """One of our runs per work under py-spy (1 thread), then the floor in the same conditions."""
    profiles = {}
    for work in works:
        tag = f"{work}_profile"
        raw = runner.scratch / f"{tag}.pyspy.txt"
        load = uptime()
        ours = runner.ours(work, 1, tag, pyspy=raw)
        floor = runner.floor(work, 1, f"{tag}_floor")
        if ours.get("status") != "ok" or floor.get("status") != "ok" or not raw.is_file():
            profiles[work] = {"status": "failed", "ours": ours.get("status"), "floor": floor.get("status")}
            continue
        counts = categorize_profile(raw.read_text().splitlines())
        total = sum(counts.values())
        epochs = ours["epochs"]
        # At 1 thread the process CPU time is the time the epoch ran; wall time adds waiting for a core.
        mean_cpu = statistics.fmean(e["wall_cpu_s"] for e in epochs)
        floor8 = next(f for f in floor["floors"] if f["batch"] == SHIPPED_BATCH)
        by_count = sorted(counts.items(), key=lambda kv: -kv[1])
        profiles[work] = {
            "status": "ok", "uptime_before": _load_text(ours) or load, "samples": total, "epochs": len(epochs),
            "mean_epoch_s": statistics.fmean(e["wall_s"] for e in epochs), "mean_epoch_cpu_s": mean_cpu,
            "cpu_seconds_per_epoch": {k: v / total * mean_cpu for k, v in by_count},
            "floor_cpu": {phase: p["total_cpu_s"] for phase, p in floor8["phases"].items()},
            "floor_total_cpu_s": floor8["total_cpu_s"], "floor_total_s": floor8["total_s"],
        }  # fmt: skip
    sweeps = {}
    for threads in runner.args.threads:
        load = uptime()
        sweep = runner.sweep(works[0], threads, f"sweep_t{threads}")
        sweeps[str(threads)] = {**sweep, "uptime_before": _load_text(sweep) or load}
    return {"profiles": profiles, "sweeps": sweeps}


FLOOR_OF_CATEGORY = {
    "sampling: transformer forwards": "sample",
    "training: backward": "train_grad",
    "training: policy forward (transformer)": "train_grad",
    "training: reference forward (transformer)": "train_nograd",
    "reward: SOLACE probe forwards (transformer)": "reward",
}


def savings_estimates(per_row_ms: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Seconds per epoch that exact changes of how the transformer is called would save, per work, estimated
    from the measured per-row costs (ms) of ``_vs_official_worker.run_sweep`` and the forward counts of the
    work at the shipped batch (16 rows per CFG call, 64 per probe call). Negative: the change costs time.

    Each change is measured against the trainer's default path: no-grad policy forwards with the LoRA folded
    into the weights (sampling, SOLACE's probes); a training forward and backward over the 8 conditional rows
    of a trained step; its unconditional half taken from the rollout until the epoch's first optimizer step,
    and a no-grad call of its own after it; the reference over both halves (16 rows). ``status`` says whether
    the change is ``"default"`` (its saving is then against the path without it), a ``"setting"`` a user
    chooses, or ``"not built"``.
    """
    from _vs_official_worker import WORKS

    policy, folded = per_row_ms["policy forward, no grad"], per_row_ms["policy forward, no grad, LoRA folded"]
    reference, fwd_bwd = (
        per_row_ms["reference forward (LoRA disabled)"],
        per_row_ms["policy forward + backward"],
    )

    def ms(table: dict[str, float], rows: int) -> float:
        """Per-row cost at the nearest measured number of rows."""
        return table[min(table, key=lambda r: abs(int(r) - rows))]

    out = []
    for name, work in WORKS.items():
        counts = work.forwards(SHIPPED_BATCH, 64)
        sample_calls, rows = counts["sample"]
        train_calls, half = counts["train_grad"][0], rows // 2
        probe_calls, probe_rows = counts.get("reward", (0, 64))
        # Trained-step calls before the epoch's first optimizer step, and after it.
        early = work.images // SHIPPED_BATCH // work.optimizer_steps * len(work.train_steps)
        late = train_calls - early
        ref_rows = rows * len(work.train_steps)
        changes = [
            (
                "default",
                "the unconditional CFG half out of the backward (`cfg_uncond_gradient=False`): the training "
                "forward and backward cover the 8 conditional rows, the unconditional half is the rollout's "
                "velocity before the first optimizer step and a no-grad call after it",
                train_calls * (rows * ms(fwd_bwd, rows) - half * ms(fwd_bwd, half))
                - late * half * ms(policy, half),
            ),
            (
                "default",
                "the LoRA folded into the weights for the no-grad policy forwards (sampling, SOLACE probes)",
                sample_calls * rows * (ms(policy, rows) - ms(folded, rows))
                + probe_calls * probe_rows * (ms(policy, probe_rows) - ms(folded, probe_rows)),
            ),
            (
                "setting",
                "micro-batches of 16 images (`per_device_train_batch_size=16`, `steps_per_generation=2`, "
                "`gradient_accumulation_steps=1`): twice the rows per call",
                sample_calls * rows * (ms(folded, rows) - ms(folded, 2 * rows))
                + train_calls * half * (ms(fwd_bwd, half) - ms(fwd_bwd, rows))
                + late * half * (ms(policy, half) - ms(policy, rows))
                + train_calls * rows * (ms(reference, rows) - ms(reference, 2 * rows)),
            ),
            (
                "not built",
                "reuse the sampling forwards before the epoch's first optimizer step: the conditional rows of "
                "a trained step's sampling call run with grad and keep their graph for the backward, so "
                "training does not run them again (their graphs stay alive until their backward)",
                early * (rows * ms(folded, rows) - half * ms(folded, half)),
            ),
            (
                "not built",
                "sample the 32 images of an epoch in one rollout (64 rows per forward instead of 16)",
                sample_calls * rows * (ms(folded, rows) - ms(folded, 4 * rows)),
            ),
            (
                "not built",
                "the reference forwards of a micro-batch's trained steps in one call, adapters disabled once",
                train_calls * rows * (ms(reference, rows) - ms(reference, ref_rows)),
            ),
        ]
        if probe_calls:
            best = min((r for r in folded if int(r) >= 128), key=lambda r: folded[r], default=str(probe_rows))
            changes.append(
                (
                    "setting",
                    f"SOLACE probes in chunks of {best} rows instead of {probe_rows} (`max_batch_size`)",
                    probe_calls * probe_rows * (ms(folded, probe_rows) - folded[best]),
                )
            )
        out += [
            {"work": name, "status": status, "change": change, "saving_s": value / 1000}
            for status, change, value in changes
        ]
    return out


def profile_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Where one of our epochs goes (py-spy, 1 thread)",
        "",
        f"Run {result['date']} with `{result['command']}`: py-spy (100 Hz, non-blocking) over epochs 1–"
        f"{result['settings']['epochs'] - 1} of one of our runs, its samples turned into seconds per epoch with "
        "the run's mean epoch CPU time; the floor was timed right after. All in process CPU seconds, which at 1 "
        "thread are the time the work ran (other jobs on the machine add waiting to the wall time, not to "
        "these). *Beyond the floor*: the row minus the floor of the same transformer calls (the policy forward "
        "and its backward together against the floor's forward + backward).",
        "",
    ]
    for work, p in result["profile"]["profiles"].items():
        if p.get("status") != "ok":
            lines += [f"{work}: profile failed ({p})", ""]
            continue
        lines += [
            f"**{work}**: epoch {p['mean_epoch_cpu_s']:.2f} CPU s ({p['mean_epoch_s']:.2f} s wall), floor "
            f"{p['floor_total_cpu_s']:.2f} CPU s ({p['epochs']} epochs, {p['samples']} samples; load before: "
            f"{p['uptime_before'].split('load average:')[-1].strip()}).",
            "",
            "| where | CPU s / epoch | floor CPU s | beyond the floor |",
            "|---|---|---|---|",
        ]
        seconds = p["cpu_seconds_per_epoch"]
        train_grad = seconds.get("training: backward", 0.0) + seconds.get(
            "training: policy forward (transformer)", 0.0
        )
        rows = []
        for category, value in seconds.items():
            phase = FLOOR_OF_CATEGORY.get(category)
            floor = p["floor_cpu"].get(phase) if phase else None
            if category == "training: policy forward (transformer)":
                continue
            if category == "training: backward":
                category, value = "training: policy forward + backward (transformer)", train_grad
            beyond = value - floor if floor is not None else value
            rows.append((beyond, category, value, floor))
        for beyond, category, value, floor in sorted(rows, key=lambda r: -r[0]):
            lines.append(f"| {category} | {value:.2f} | {_f(floor)} | {beyond:+.2f} |")
        lines.append("")
    for threads, sweep in result["profile"]["sweeps"].items():
        if sweep.get("status") != "ok":
            lines += [f"Sweep at {threads} thread(s) failed: {sweep.get('status')}", ""]
            continue
        per_row = sweep["per_row_ms"]
        rows = list(next(iter(per_row.values())))
        lines += [
            f"Per-row cost of the transformer calls (ms per row, best of {sweep['rounds']} interleaved rounds) "
            f"by rows per call, {threads} thread(s); load before: "
            f"{sweep['uptime_before'].split('load average:')[-1].strip()}. Folding a trained LoRA into the weights "
            f"changed the policy output by at most {sweep['folded_max_abs_diff']:.1e} "
            f"(outputs up to {sweep['output_max_abs']:.1f}).",
            "",
            "| call | " + " | ".join(f"{r} rows" for r in rows) + " |",
            "|---|" + "---|" * len(rows),
        ]
        lines += [
            f"| {kind} | " + " | ".join(f"{v[r]:.2f}" for r in rows) + " |" for kind, v in per_row.items()
        ]
        lines.append("")
        estimates = savings_estimates(per_row)
        works = list(dict.fromkeys(e["work"] for e in estimates))
        lines += [
            f"Estimated saving per epoch of exact changes at {threads} thread(s), from these per-row costs and the "
            "work's forward counts (seconds; negative: slower). *default*: in the trainer's defaults, its saving "
            "against the path without it; *setting*: a choice of the user; *not built*: against the defaults.",
            "",
            "| change | status | " + " | ".join(works) + " |",
            "|---|---|" + "---|" * len(works),
        ]
        for change in dict.fromkeys(e["change"] for e in estimates):
            status = next(e["status"] for e in estimates if e["change"] == change)
            cells = {e["work"]: f"{e['saving_s']:+.2f}" for e in estimates if e["change"] == change}
            lines.append(f"| {change} | {status} | " + " | ".join(cells.get(w, "–") for w in works) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", choices=("flowgrpo", "solace", "both"), default="both")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch threads, one setting each (default: 1 2); with --from-raw, keep the runs at these",
    )
    parser.add_argument("--pairs", type=int, default=3, help="interleaved pairs per work and thread setting")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; epoch 0 is warm-up")
    parser.add_argument(
        "--official-batches", type=int, nargs="+", default=[SHIPPED_BATCH, 16],
        help="the official script's batch settings (images per batch); 8 is the shipped one",
    )  # fmt: skip
    parser.add_argument(
        "--ours-variants", nargs="*", choices=sorted(OURS_VARIANTS), default=[],
        help="extra sides of ours in every pair, same work: b16 (micro-batches of 16), compiled (torch_compile)",
    )  # fmt: skip
    parser.add_argument(
        "--env", nargs="+", default=[], metavar="KEY=VALUE",
        help="environment variables of every measured process, ours and official alike (e.g. allocator settings)",
    )  # fmt: skip
    parser.add_argument(
        "--name", default="vs_official", help="results file name (benchmarks/results/NAME.{json,md})"
    )
    parser.add_argument("--harness", type=Path, default=DEFAULT_HARNESS, help="../shared/perf_vs_official")
    parser.add_argument(
        "--mirror-root", type=Path, default=Path(os.environ["MIRROR_ROOT"]) if os.environ.get("MIRROR_ROOT") else None,
        help="folder of the fetched snapshots (yifan123+flow_grpo/, wookiekim+SOLACE/); default $MIRROR_ROOT",
    )  # fmt: skip
    parser.add_argument(
        "--scratch", type=Path, default=None, help="folder for the runs (default: a new temp dir)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy profile of our epochs at 1 thread instead"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="take the runs an interrupted invocation left in --scratch"
    )
    parser.add_argument(
        "--from-raw",
        type=Path,
        nargs="+",
        default=None,
        help="re-summarise the runs of result JSONs (merged)",
    )
    parser.add_argument("--quick", action="store_true", help="1 pair, 2 epochs, 1 thread: a smoke test")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go")
    args = parser.parse_args(argv)
    args.threads_given = args.threads is not None
    args.threads = args.threads or [1, 2]
    if args.quick:
        args.pairs, args.epochs, args.threads = 1, 2, args.threads[:1]
    if any("=" not in item or not item.split("=", 1)[0] for item in args.env):
        parser.error(f"--env takes KEY=VALUE items, got {args.env}")
    if SHIPPED_BATCH not in args.official_batches:
        parser.error(f"--official-batches must include the shipped batch {SHIPPED_BATCH}")
    return args


def build_result(args: argparse.Namespace, runs: list[dict[str, Any]], commits: dict[str, str], command: str,
                 date: str, nproc: int) -> dict[str, Any]:  # fmt: skip
    return {
        "date": date, "command": command, "nproc": nproc, "commits": commits,
        "settings": {"quick": args.quick, "pairs": args.pairs, "epochs": args.epochs, "threads": args.threads,
                     "official_batches": args.official_batches, "ours_variants": args.ours_variants,
                     "env": args.env},
        "configs": summarize(runs, args.official_batches, args.ours_variants),
        "runs": runs,
    }  # fmt: skip


def _without_paths(argv: list[str]) -> list[str]:
    """``argv`` without the options that only say where files go or resume a run (they do not change what is
    measured)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--scratch", "--output-dir"):
            skip = True
        elif arg != "--reuse" and not arg.startswith(("--scratch=", "--output-dir=")):
            out.append(arg)
    return out


def _measured(command: str, work: str | None, threads: list[int] | None) -> bool:
    """Whether the invocation ``command`` could have run a run of ``work`` at one of ``threads``."""
    ran_threads = re.search(r"--threads((?: \d+)+)", command)
    ran_work = re.search(r"--work (\S+)", command)
    threads_ok = (
        threads is None or not ran_threads or bool(set(map(int, ran_threads[1].split())) & set(threads))
    )
    work_ok = work is None or not ran_work or ran_work[1] in ("both", work)
    return threads_ok and work_ok


def keep_runs(
    raw: dict[str, Any], work: str | None = None, threads: list[int] | None = None
) -> dict[str, Any]:
    """A result file's runs of ``work`` and of the thread counts in ``threads`` only (``None``: all); its
    command keeps the invocations that ran such runs, and says what was kept."""
    kept = [
        run
        for run in raw["runs"]
        if (work is None or run["work"] == work) and (threads is None or run["threads"] in threads)
    ]
    notes = ([f"{work} runs"] if work is not None else []) + (
        [f"{'/'.join(map(str, threads))}-thread runs"] if threads is not None else []
    )
    note = f" [{', '.join(notes)} kept]" if notes else ""
    commands = [c for c in raw["command"].split(" ; ") if _measured(c, work, threads)]
    return {
        **raw,
        "runs": kept,
        "commits": {w: c for w, c in raw["commits"].items() if work is None or w == work},
        "settings": {
            **raw["settings"],
            "threads": [t for t in raw["settings"]["threads"] if threads is None or t in threads],
            "invocations": len(commands),
        },
        "command": " ; ".join(f"{c}{note}" for c in commands),
    }


def merge_results(raws: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One result from the runs of several result files with the same settings (their pairs numbered on)."""
    first = raws[0]
    runs, offset, commits = [], 0, {}
    for raw in raws:
        for work, commit in raw["commits"].items():
            if commits.setdefault(work, commit) != commit:
                raise SystemExit(f"bench_vs_official: --from-raw files ran different official {work} commits")
        if raw["settings"]["epochs"] != first["settings"]["epochs"]:
            raise SystemExit("bench_vs_official: --from-raw files must share their epochs per run")
        if raw["settings"].get("env", []) != first["settings"].get("env", []):
            raise SystemExit("bench_vs_official: --from-raw files must share their --env settings")
        runs += [{**run, "pair": run["pair"] + offset} for run in raw["runs"]]
        offset += raw["settings"]["pairs"]
    args.pairs, args.epochs = offset, first["settings"]["epochs"]
    args.threads = sorted({t for raw in raws for t in raw["settings"]["threads"]})
    args.official_batches = first["settings"]["official_batches"]
    args.quick, args.env = first["settings"]["quick"], first["settings"].get("env", [])
    args.ours_variants = list(
        dict.fromkeys(v for raw in raws for v in raw["settings"].get("ours_variants", []))
    )
    dates = sorted({raw["date"] for raw in raws})
    commands = list(
        dict.fromkeys(
            re.sub(r" --(scratch|output-dir)[= ]\S+", "", c)
            for raw in raws
            for c in raw["command"].split(" ; ")
        )
    )
    result = build_result(args, runs, commits, " ; ".join(commands), " and ".join(dates), first["nproc"])
    result["settings"]["invocations"] = sum(raw["settings"].get("invocations", 1) for raw in raws)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    works = ["flowgrpo", "solace"] if args.work == "both" else [args.work]
    command = "python benchmarks/bench_vs_official.py " + " ".join(
        shlex.quote(a) for a in _without_paths(sys.argv[1:] if argv is None else argv)
    )
    if os.environ.get("MIRROR_ROOT") and "--mirror-root" not in command:
        command = "MIRROR_ROOT=<fetched snapshots> " + command
    date = datetime.date.today().isoformat()
    if args.from_raw is not None:
        raws = [json.loads(path.read_text()) for path in args.from_raw]
        if args.work != "both" or args.threads_given:  # keep one work's or some threads' runs of every file
            work = None if args.work == "both" else args.work
            raws = [keep_runs(raw, work, args.threads if args.threads_given else None) for raw in raws]
            raws = [raw for raw in raws if raw["runs"]]
        result = merge_results(raws, args)
        name = args.name + ("_quick" if args.quick else "")
        write_results(name, result, markdown(result), args.output_dir)
        print(markdown(result))
        return result
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_vs_official_"))
    scratch.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, scratch)
    runner.prepare(works)
    commits = {work: runner.snapshots[work][1] for work in works}
    print(f"[bench_vs_official] runs and logs in {scratch}", file=sys.stderr, flush=True)
    if args.profile:
        result = {"date": date, "command": command, "nproc": os.cpu_count(), "commits": commits,
                  "settings": {"epochs": args.epochs, "threads": args.threads},
                  "profile": run_profile(runner, works)}  # fmt: skip
        write_results("vs_official_profile", result, profile_markdown(result), args.output_dir)
        print(profile_markdown(result))
        return result
    runs = run_pairs(runner, works, args.threads, args.pairs)
    result = build_result(args, runs, commits, command, date, os.cpu_count() or 0)
    name = args.name + ("_quick" if args.quick else "")
    write_results(name, result, markdown(result), args.output_dir)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
