"""Self-certainty cost: time of an IRIS/Intuitor training step, and peak memory of the statistic.

    python benchmarks/bench_self_certainty.py            # a few minutes on 2 CPU cores
    python benchmarks/bench_self_certainty.py --quick    # seconds; a smoke test (do not commit its results)

1. Step time, measured side by side in one run on the same random Llama (``tiny_causal_lm`` widened to
   hidden 256, 4 layers, vocabulary 32,000, so that the model's forwards dominate), the same config and
   seed, learning rate 0 (every variant sees the same rollouts):

   * ``trl_constant``: TRL's ``GRPOTrainer`` with a constant reward — the floor;
   * ``intrinsic_nsc``: ``IntrinsicGRPOTrainer`` with ``nsc_reward`` (statistic caught from the
     generation logits, no extra forward);
   * ``trl_extra_forward``: TRL's ``GRPOTrainer`` with a reward that runs the policy again over
     prompt + completion and computes the same statistic from those logits, as earlier
     implementations do.

   Rounds of a few steps alternate between the variants (the order rotates each round) so that load
   from other processes on the machine hits all of them alike; the first step of every round is a
   warm-up and is not timed. Reported: median step time and its ratio to ``trl_constant``, and a
   paired ratio (per round, then the median over rounds), less sensitive to load that drifts. The mean
   self-certainty of the two self-certainty variants is compared as a check that both compute the
   same statistic.

2. Peak memory of ``self_certainty`` (chunked, fp32 ``chunk_size × V`` at a time) vs materialising the
   full fp32 logits (``logsumexp`` over the whole ``(B, T, V)``), at Janus-Pro's vocabulary sizes
   (102,400 text, 16,384 image), on bf16 logits as a bf16 model produces them. Measured as the rise of
   the resident set size over the call: in a fresh worker process, with glibc's mmap threshold pinned
   at 128 KiB (``MALLOC_MMAP_THRESHOLD_``) so every large tensor is its own mapping and is returned to
   the OS when freed, and the kernel's high-water mark (``VmHWM``) reset through
   ``/proc/self/clear_refs`` before each call. The logits themselves are allocated before the
   measurement and filled in place, so they are not counted.

Writes ``benchmarks/results/self_certainty.json`` and ``self_certainty.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import base_parser, markdown_table, write_results

from trl_intrinsic.autoregressive.self_certainty import DEFAULT_CHUNK_SIZE, self_certainty, sequence_mean

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square", "three circles"]
TEXT_VOCAB, IMAGE_VOCAB = 102_400, 16_384
VARIANTS = ("trl_constant", "intrinsic_nsc", "trl_extra_forward")

FULL_SETTINGS = dict(
    hidden_size=256, layers=4, vocab_size=32_000, batch=16, group=8, completion_length=32,
    rounds=8, steps_per_round=3,
    memory_cases=[
        (TEXT_VOCAB, 1, 256), (TEXT_VOCAB, 8, 256), (TEXT_VOCAB, 8, 512),
        (IMAGE_VOCAB, 1, 576), (IMAGE_VOCAB, 8, 576), (IMAGE_VOCAB, 16, 576),
    ],
)  # fmt: skip
QUICK_SETTINGS = dict(
    hidden_size=32, layers=2, vocab_size=None, batch=4, group=2, completion_length=8,
    rounds=1, steps_per_round=2,
    memory_cases=[(TEXT_VOCAB, 2, 32), (IMAGE_VOCAB, 2, 64)],
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# 1. Training-step time
# ----------------------------------------------------------------------------------------------------


def constant_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """The same reward for every completion: GRPO's work without any reward compute."""
    return [0.0] * len(prompts)


class ExtraForwardNSC:
    """Negative self-certainty computed by running the policy again over prompt + completion.

    This is how a plain ``GRPOTrainer`` reward has to get the statistic: one extra no-grad forward over
    the right-padded ``(B, prompt + completion)`` batch, then the per-token statistic on the positions
    that predict the completion tokens (the same positions the rollout sampled from), averaged per
    completion. ``model`` is set once the trainer exists.
    """

    __name__ = "extra_forward_nsc"

    def __init__(self, tokenizer, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.model: torch.nn.Module | None = None

    def __call__(self, prompts: list[str], completions: list, completion_ids: list[list[int]], **kwargs):
        if self.model is None:
            raise ValueError("Set `ExtraForwardNSC.model` to the policy before training.")
        prompt_ids = self.tokenizer(text=prompts)["input_ids"]  # as GRPOTrainer tokenizes plain-text prompts
        rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        width = max(len(r) for r in rows)
        device = next(self.model.parameters()).device
        input_ids = torch.full(
            (len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long, device=device
        )
        attention_mask = torch.zeros_like(input_ids)
        target = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, (p, r) in enumerate(zip(prompt_ids, rows)):
            input_ids[i, : len(r)] = torch.tensor(r, device=device)
            attention_mask[i, : len(r)] = 1
            target[i, len(p) - 1 : len(r) - 1] = True  # logits at t predict token t + 1
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_token = self_certainty(logits, target, chunk_size=self.chunk_size)
        return (-sequence_mean(per_token, target)).tolist()


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: rollout, rewards, loss, backward and the optimizer update."""

        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def _build_trainer(variant: str, settings: dict, output_dir: str):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
    from trl_intrinsic.rewards import nsc_reward
    from trl_intrinsic.testing import tiny_causal_lm

    overrides = dict(hidden_size=settings["hidden_size"], num_hidden_layers=settings["layers"])
    if settings["vocab_size"] is not None:
        overrides["vocab_size"] = settings["vocab_size"]
    model, tokenizer = tiny_causal_lm(seed=0, **overrides)
    config = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=0,
        per_device_train_batch_size=settings["batch"], num_generations=settings["group"],
        max_completion_length=settings["completion_length"], max_steps=settings["steps_per_round"],
        learning_rate=0.0, beta=0.0, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": PROMPTS * 8})
    timer = _step_timer()
    common = dict(train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    if variant == "intrinsic_nsc":
        trainer = IntrinsicGRPOTrainer(model, [nsc_reward], args=IntrinsicGRPOConfig(**config), **common)
    elif variant == "trl_constant":
        trainer = GRPOTrainer(model, [constant_reward], args=GRPOConfig(**config), **common)
    elif variant == "trl_extra_forward":
        reward = ExtraForwardNSC(tokenizer)
        trainer = GRPOTrainer(model, [reward], args=GRPOConfig(**config), **common)
        reward.model = trainer.accelerator.unwrap_model(trainer.model)
    else:
        raise ValueError(f"Unknown variant {variant!r}; expected one of {VARIANTS}.")
    trainer.remove_callback(PrinterCallback)  # keep the log history, do not print every step
    return trainer, timer, sum(p.numel() for p in model.parameters())


def _last_self_certainty(trainer, variant: str) -> float | None:
    """Mean self-certainty of the last logged step (the extra-forward reward logs its negative)."""
    key, sign = {"intrinsic_nsc": ("self_certainty/mean", 1.0), "trl_extra_forward": ("rewards/extra_forward_nsc/mean", -1.0)}.get(variant, (None, 0.0))  # fmt: skip
    if key is None:
        return None
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return sign * values[-1] if values else None


def bench_training_step(settings: dict) -> dict:
    """Median step time of each variant over interleaved rounds, and ratios to ``trl_constant``."""
    from transformers import set_seed

    with tempfile.TemporaryDirectory() as output_dir:
        built = {v: _build_trainer(v, settings, f"{output_dir}/{v}") for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        round_medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_index in range(settings["rounds"]):
            order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
            for variant in order:
                trainer, timer, _ = built[variant]
                timer.times.clear()
                set_seed(0)  # the same rollouts for every variant and round (TRL samples from the global RNG)
                trainer.train()
                times[variant] += timer.times[1:]  # the first step of a round warms up
                round_medians[variant].append(_median(timer.times[1:]))
        self_certainty_means = {v: _last_self_certainty(built[v][0], v) for v in VARIANTS}
        num_parameters = built["trl_constant"][2]
    medians = {v: _median(times[v]) for v in VARIANTS}
    base = medians["trl_constant"]
    rows = [
        {
            "variant": v,
            "median_step_s": medians[v],
            "min_step_s": min(times[v]),
            "steps_timed": len(times[v]),
            "ratio_to_trl_constant": medians[v] / base,
            # Paired: the ratio within each round (same load), then the median over rounds.
            "paired_ratio_to_trl_constant": _median(
                [a / b for a, b in zip(round_medians[v], round_medians["trl_constant"])]
            ),
        }
        for v in VARIANTS
    ]
    sc_nsc, sc_extra = self_certainty_means["intrinsic_nsc"], self_certainty_means["trl_extra_forward"]
    paired = {row["variant"]: row["paired_ratio_to_trl_constant"] for row in rows}
    return {
        "num_parameters": num_parameters,
        "rows": rows,
        "step_times_s": times,
        "ratio_intrinsic_to_trl_constant": medians["intrinsic_nsc"] / base,
        "ratio_extra_forward_to_trl_constant": medians["trl_extra_forward"] / base,
        "speedup_vs_extra_forward": medians["trl_extra_forward"] / medians["intrinsic_nsc"],
        "paired_ratio_intrinsic_to_trl_constant": paired["intrinsic_nsc"],
        "paired_ratio_extra_forward_to_trl_constant": paired["trl_extra_forward"],
        "self_certainty_mean_intrinsic": sc_nsc,
        "self_certainty_mean_extra_forward": sc_extra,
        "self_certainty_abs_diff": abs(sc_nsc - sc_extra),
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# ----------------------------------------------------------------------------------------------------
# 2. Peak memory
# ----------------------------------------------------------------------------------------------------


def full_fp32_self_certainty(logits: torch.Tensor) -> torch.Tensor:
    """The unchunked statistic: the whole ``(B, T, V)`` logits converted to fp32 at once."""
    with torch.no_grad():
        z = logits.float()
        return torch.logsumexp(z, dim=-1) - z.mean(dim=-1) - math.log(logits.shape[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; the memory benchmark needs Linux.")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn, logits: torch.Tensor) -> tuple[torch.Tensor, float, float, bool]:
    """``fn(logits)``, its peak resident-memory rise in MiB, its wall time in s, and whether the mark was reset."""
    reset = _reset_high_water_mark()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn(logits)
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return out, (peak - before) / 1024, elapsed, reset


def memory_worker(cases: list[list[int]]) -> list[dict]:
    """Run in a fresh process: both variants on bf16 logits of each ``(V, B, T)``, chunked first."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    for vocab in sorted({case[0] for case in cases}):  # one-time kernel and dispatch setup, not measured
        warm = torch.randn((1, 2, vocab), generator=generator).bfloat16()
        self_certainty(warm), full_fp32_self_certainty(warm)
    rows = []
    for vocab, batch, length in cases:
        logits = torch.empty((batch, length, vocab), dtype=torch.bfloat16)
        logits.normal_(0.0, 3.0, generator=generator)  # in place: no fp32 temporary
        chunked, chunked_mib, chunked_s, reset = _measure(self_certainty, logits)
        full, full_mib, full_s, reset_full = _measure(full_fp32_self_certainty, logits)
        rows.append(
            {
                "vocab": vocab,
                "batch": batch,
                "length": length,
                "logits_bf16_mib": logits.numel() * 2 / 2**20,
                "fp32_logits_mib": logits.numel() * 4 / 2**20,
                "chunked_peak_mib": chunked_mib,
                "full_peak_mib": full_mib,
                "memory_ratio_full_to_chunked": full_mib / max(chunked_mib, 1e-9),
                "chunked_s": chunked_s,
                "full_s": full_s,
                "max_abs_diff": float((chunked - full).abs().max()),
                "high_water_mark_reset": reset and reset_full,
            }
        )
        del logits, chunked, full
    return rows


def start_memory_benchmark(cases: list[tuple[int, int, int]]) -> list[subprocess.Popen]:
    """Start :func:`memory_worker` in fresh processes: one for all cases, or one per case if the kernel's
    high-water mark cannot be reset (then a later case would see an earlier case's peak).

    The workers run one after another unless the caller collects them only later (``--quick`` overlaps
    them with the step-time benchmark; full runs do not, so neither disturbs the other's timings).
    """
    groups = [list(cases)] if _reset_high_water_mark() else [[c] for c in cases]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker"]
    return [
        subprocess.Popen(
            [*command, json.dumps(g)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for g in groups
    ]


def collect_memory_benchmark(workers: list[subprocess.Popen]) -> dict:
    """Wait for the workers of :func:`start_memory_benchmark` and merge their rows."""
    rows = []
    for worker in workers:
        stdout, stderr = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"memory worker failed:\n{stderr[-4000:]}")
        rows += json.loads(stdout.strip().splitlines()[-1])
    return {"chunk_size": DEFAULT_CHUNK_SIZE, "logits_dtype": "bfloat16", "rows": rows}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def to_markdown(result: dict) -> str:
    s, step, mem = result["settings"], result["training_step"], result["memory"]
    quick = " (quick run: not representative)" if result["quick"] else ""
    vocab = s["vocab_size"] or "tokenizer's"
    lines = [
        f"# Self-certainty cost{quick}",
        "",
        "## Training step",
        "",
        f"Random Llama, hidden {s['hidden_size']}, {s['layers']} layers, vocabulary {vocab} "
        f"({step['num_parameters'] / 1e6:.1f} M parameters); batch {s['batch']} completions "
        f"(groups of {s['group']}) of {s['completion_length']} tokens; learning rate 0, seed 0; "
        f"{s['rounds']} interleaved rounds of {s['steps_per_round']} steps, the first of each untimed. "
        "Goal for `intrinsic_nsc`: ≤ 1.05× `trl_constant`.",
        "",
        *markdown_table(
            step["rows"],
            [
                "variant",
                "median_step_s",
                "min_step_s",
                "steps_timed",
                "ratio_to_trl_constant",
                "paired_ratio_to_trl_constant",
            ],
        ),
        "",
        f"`intrinsic_nsc` / `trl_constant`: {step['ratio_intrinsic_to_trl_constant']:.3f}× (medians), "
        f"{step['paired_ratio_intrinsic_to_trl_constant']:.3f}× (paired). `trl_extra_forward` / "
        f"`trl_constant`: {step['ratio_extra_forward_to_trl_constant']:.3f}× (medians), "
        f"{step['paired_ratio_extra_forward_to_trl_constant']:.3f}× (paired). Speed-up of catching the "
        f"statistic from generation over an extra forward: {step['speedup_vs_extra_forward']:.3f}× (medians). Mean self-certainty of the last step: "
        f"{step['self_certainty_mean_intrinsic']:.6f} (generation logits) vs "
        f"{step['self_certainty_mean_extra_forward']:.6f} (extra forward).",
        "",
        "## Peak memory",
        "",
        f"bf16 logits `(B, T, V)`; peak rise of resident memory (MiB) during `self_certainty` (chunks of "
        f"{mem['chunk_size']} positions) vs `logsumexp` over the full fp32 logits, each in a fresh worker "
        "process with the kernel's high-water mark reset before the call.",
        "",
        *markdown_table(
            mem["rows"],
            [
                "vocab",
                "batch",
                "length",
                "fp32_logits_mib",
                "chunked_peak_mib",
                "full_peak_mib",
                "memory_ratio_full_to_chunked",
                "chunked_s",
                "full_s",
                "max_abs_diff",
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: see bench_memory
    args = parser.parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return {}
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = dict(QUICK_SETTINGS if args.quick else FULL_SETTINGS)
    result: dict[str, Any] = {"quick": args.quick, "settings": settings}
    if args.quick:
        workers = start_memory_benchmark(settings["memory_cases"])
        result["training_step"] = bench_training_step(settings)
        result["memory"] = collect_memory_benchmark(workers)
    else:
        result["memory"] = collect_memory_benchmark(start_memory_benchmark(settings["memory_cases"]))
        result["training_step"] = bench_training_step(settings)
    markdown = to_markdown(result)
    write_results("self_certainty", result, markdown, args.output_dir)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
