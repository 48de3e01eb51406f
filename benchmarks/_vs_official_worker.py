"""The measured processes of ``bench_vs_official.py``; each runs in a fresh process at a fixed thread count.

    python benchmarks/_vs_official_worker.py save-pipe DIR
    python benchmarks/_vs_official_worker.py ours --work flowgrpo --pipe DIR --prompts P --threads 1 --out F
    python benchmarks/_vs_official_worker.py floor --work solace --pipe DIR --threads 1 --batches 8 16 --out F
    python benchmarks/_vs_official_worker.py sweep --work flowgrpo --pipe DIR --threads 2 --rows 16 64 --out F

``ours`` trains ``FlowGRPOTrainer`` on the per-epoch work of the official Flow-GRPO / SOLACE scripts
(:data:`WORKS`) through the public API only, and times every epoch by phase. ``floor`` times the bare
transformer forwards and backwards that one epoch of that work needs, at given micro-batch sizes, with
nothing else around them. ``sweep`` measures the per-row cost of those calls at several rows per call.
Each writes one JSON file (``F``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PROCESS_START = time.perf_counter()
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# ---------------------------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class Work:
    """The per-epoch work of an official script on the toy SD3 pipeline (32 px, fp32).

    Attributes:
        name: ``"flowgrpo"`` (``scripts/train_sd3.py``) or ``"solace"`` (``scripts/train_sd3_self.py``).
        train_steps: sampler step indices trained per micro-batch.
        optimizer_steps: optimizer steps per epoch.
        probes: SOLACE's ``K`` noise probes per image and trained step (0: no probe forwards).
        prompts, group: prompts per epoch and images per prompt (``G``).
        steps: sampler steps (every step but the last is stochastic), ``guidance``: CFG weight,
            ``noise_level``: SDE noise level ``a``, ``beta``: KL weight, ``lora_rank``: LoRA ``r`` (α = 2r).
        resolution: image side in pixels; ``t5_tokens``: zero T5 tokens appended to the 24 CLIP tokens.
    """

    name: str
    train_steps: tuple[int, ...]
    optimizer_steps: int
    probes: int = 0
    prompts: int = 4
    group: int = 8
    steps: int = 10
    guidance: float = 4.5
    noise_level: float = 0.7
    beta: float = 0.04
    lora_rank: int = 32
    resolution: int = 32
    t5_tokens: int = 1
    seed: int = 42

    @property
    def images(self) -> int:
        """Images sampled per epoch."""
        return self.prompts * self.group

    @property
    def probe_rows(self) -> int:
        """Rows of SOLACE probe forwards per epoch: K probes × trained steps × images."""
        return self.probes * len(self.train_steps) * self.images

    def forwards(self, batch: int, probe_chunk: int) -> dict[str, tuple[int, int]]:
        """``{phase: (calls, rows per call)}`` of transformer forwards per epoch at micro-batch ``batch``.

        CFG doubles every sampling and training batch (unconditional rows first); probes are conditional
        only, ``probe_chunk`` rows per forward.
        """
        if self.images % batch:
            raise ValueError(f"micro-batch {batch} does not divide the {self.images} images of an epoch")
        micro = self.images // batch
        out = {
            "sample": (micro * self.steps, 2 * batch),
            "train_grad": (micro * len(self.train_steps), 2 * batch),
            "train_nograd": (micro * len(self.train_steps), 2 * batch),
        }
        if self.probes:
            out["reward"] = (math.ceil(self.probe_rows / probe_chunk), probe_chunk)
        return out


WORKS = {
    "flowgrpo": Work("flowgrpo", train_steps=tuple(range(9)), optimizer_steps=2),
    "solace": Work("solace", train_steps=(4, 5, 6, 7, 8), optimizer_steps=1, probes=8),
}
"""Flow-GRPO trains the 9 stochastic steps (timestep_fraction 0.99) and steps the optimizer twice per epoch.
SOLACE trains the later half (indices 4–8) and, with its gradient accumulation of 2 × 9 micro-steps over
4 × 5 micro-steps per epoch, steps the optimizer about once per epoch; its K = 8 probes per image and step
run at those same 5 steps."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- ours
class _StopRun(BaseException):
    """Raised when the epoch after the last measured one would start."""


def jpeg_compressibility(prompts: list[str], images: list, **kwargs: Any) -> list[float]:
    """Flow-GRPO's ``jpeg_compressibility`` reward: −(JPEG size at quality 95, in kB) / 500 per image."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return [-size / 500 for size in sizes]


class EpochRecorder:
    """Phase marks of every epoch, from the outside of the trainer: a callback marks epoch starts, a wrapped
    reward marks the reward call, a forward hook on the transformer counts forwards and marks the first
    training forward. Each mark holds (wall seconds, process CPU seconds)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.phase = "startup"
        self.rewards: list[float] = []

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def mark(self, name: str) -> None:
        if self.epochs:
            self.epochs[-1]["marks"][name] = self.now()

    def begin_epoch(self) -> None:
        self.mark("end")
        self.epochs.append(
            {"marks": {"start": self.now()}, "forwards": {}, "vae_rows": 0, "optimizer_steps": 0}
        )
        self.phase = "sample"

    def count_forward(self, rows: int) -> None:
        if not self.epochs:
            return
        if self.phase == "other":  # the first forward after the reward starts the training phase
            self.mark("train_start")
            self.phase = "train"
        phase = self.phase
        if phase == "train":
            phase = "train_grad" if torch.is_grad_enabled() else "train_nograd"
        calls = self.epochs[-1]["forwards"].setdefault(phase, {"calls": 0, "rows": 0})
        calls["calls"] += 1
        calls["rows"] += rows

    def timed_reward(self, reward: Callable) -> Callable:
        """``reward`` with its calls marked as the reward phase (same result, same attributes)."""

        def wrapped(*args: Any, **kwargs: Any) -> list:
            self.mark("reward_start")
            self.phase = "reward"
            values = reward(*args, **kwargs)
            self.mark("reward_end")
            self.phase = "other"
            self.rewards.extend(float(v) for v in values if v is not None)
            return values

        wrapped.__name__ = getattr(reward, "__name__", type(reward).__name__)
        wrapped.requires_images = getattr(reward, "requires_images", True)
        return wrapped

    def records(self) -> list[dict[str, Any]]:
        """Complete epochs: ``{wall_s, sampling_s, reward_s, other_s, training_s, *_cpu_s, forwards, ...}``
        (seconds; wall and process CPU)."""
        out = []
        for epoch in self.epochs:
            marks = epoch["marks"]
            if not {"start", "reward_start", "reward_end", "train_start", "end"} <= set(marks):
                continue
            spans = {
                "wall": ("start", "end"),
                "sampling": ("start", "reward_start"),
                "reward": ("reward_start", "reward_end"),
                "other": ("reward_end", "train_start"),
                "training": ("train_start", "end"),
            }
            record = {}
            for name, (a, b) in spans.items():
                record[f"{name}_s"] = round(marks[b][0] - marks[a][0], 4)
                record[f"{name}_cpu_s"] = round(marks[b][1] - marks[a][1], 4)
            record.update(
                forwards=epoch["forwards"],
                vae_rows=epoch["vae_rows"],
                optimizer_steps=epoch["optimizer_steps"],
            )
            out.append(record)
        return out


def build_trainer(
    work: Work,
    pipe: str,
    prompts: list[str],
    batch: int,
    output_dir: str,
    recorder: EpochRecorder,
    torch_compile: bool = False,
):
    """``FlowGRPOTrainer`` on ``work`` at ``batch`` images per micro-batch, observed by ``recorder``; with
    ``torch_compile``, the transformer compiled (inductor)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
    from trl_intrinsic.rewards import SolaceReward

    micro_batches = work.images // batch
    accumulation = micro_batches // work.optimizer_steps
    window = work.steps - 1
    solace = work.probes > 0
    config = FlowGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=work.seed,
        per_device_train_batch_size=batch, num_generations=work.group, steps_per_generation=micro_batches,
        gradient_accumulation_steps=accumulation, num_iterations=1, max_steps=10**6,
        resolution=work.resolution, num_inference_steps=work.steps, max_sequence_length=work.t5_tokens,
        guidance_scale=work.guidance, noise_level=work.noise_level, sde_type="flow_sde", sde_window_size=0,
        timestep_fraction=len(work.train_steps) / window,
        timestep_selection="suffix" if solace else "prefix",
        beta=work.beta, epsilon=1e-4, adv_clip_max=5.0, scale_rewards="batch",
        learning_rate=3e-4, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=1e-4,
        max_grad_norm=1.0, save_strategy="no", logging_steps=1, log_completions=False,
        dataloader_num_workers=0, torch_compile=torch_compile,
    )  # fmt: skip
    if solace:
        # the authors' reward: K antithetic probes, t(1-t) weights, per-step standardisation; our chunking
        reward = SolaceReward(
            num_probes=work.probes, timestep_weighting="t(1-t)", normalize="per_timestep", seed=work.seed
        )
    else:
        reward = jpeg_compressibility
    lora = LoraConfig(
        r=work.lora_rank, lora_alpha=2 * work.lora_rank, init_lora_weights="gaussian",
        target_modules=list(LORA_TARGETS), lora_dropout=0.0,
    )  # fmt: skip
    steps_per_epoch = micro_batches // accumulation

    class EpochClock(TrainerCallback):
        """An epoch of work (one generation batch) starts at every ``steps_per_epoch``-th optimizer step."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % steps_per_epoch == 0:
                recorder.begin_epoch()
                if len(recorder.epochs) > clock_limit["epochs"]:
                    raise _StopRun

        def on_optimizer_step(self, args, state, control, **kwargs):
            recorder.epochs[-1]["optimizer_steps"] += 1

    clock_limit = {"epochs": 0}
    trainer = FlowGRPOTrainer(
        model=pipe,
        reward_funcs=[recorder.timed_reward(reward)],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=lora,
        callbacks=[EpochClock()],
    )

    def forward_hook(module, args, kwargs, output):
        states = kwargs.get("hidden_states", args[0] if args else None)
        recorder.count_forward(int(states.shape[0]))

    def decoder_hook(module, args, output):
        if recorder.epochs:
            recorder.epochs[-1]["vae_rows"] += int(args[0].shape[0])

    trainer.pipeline.transformer.register_forward_hook(forward_hook, with_kwargs=True)
    trainer.pipeline.vae.decoder.register_forward_hook(decoder_hook)
    return trainer, config, clock_limit


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.epochs`` epochs (the first is warm-up) and return the per-epoch timings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    work = WORKS[args.work]
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    recorder = EpochRecorder()
    load_start = os.getloadavg()
    profiler = None
    with tempfile.TemporaryDirectory(prefix="ours_") as output_dir:
        trainer, config, clock_limit = build_trainer(
            work, args.pipe, prompts, args.batch, output_dir, recorder, args.compile
        )
        clock_limit["epochs"] = args.epochs
        if args.pyspy:
            original_begin = recorder.begin_epoch

            def begin_epoch() -> None:
                nonlocal profiler
                original_begin()
                if len(recorder.epochs) == 2 and profiler is None:  # from the start of epoch 1
                    profiler = subprocess.Popen(
                        ["py-spy", "record", "--pid", str(os.getpid()), "--rate", "100", "--nonblocking",
                         "--format", "raw", "-o", args.pyspy],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip

            recorder.begin_epoch = begin_epoch
        startup_s = time.perf_counter() - PROCESS_START
        status = "incomplete"
        try:
            trainer.train()
        except _StopRun:
            status = "ok"
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
    return {
        "side": "ours",
        "status": status,
        "work": args.work,
        "batch": args.batch,
        "compile": args.compile,
        "torch_threads": torch.get_num_threads(),
        "startup_s": round(startup_s, 3),
        "max_rss_mb": round(peak_rss_mb(), 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "reward_mean": statistics.fmean(recorder.rewards) if recorder.rewards else None,
        "settings": {
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "steps_per_generation": config.steps_per_generation,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "timestep_fraction": config.timestep_fraction,
            "timestep_selection": config.timestep_selection,
            "cfg_uncond_gradient": config.cfg_uncond_gradient,
            "reward": repr(trainer.reward_funcs[0].__name__),
        },
        "epochs": recorder.records(),
    }


# ---------------------------------------------------------------------------------------------- floor
def prepare_floor_model(pipeline: Any, rank: int = 32) -> None:
    """Freeze ``pipeline`` and add the LoRA both trainers train (rank ``rank``, α = 2·rank, gaussian init)."""
    from peft import LoraConfig

    from trl_intrinsic.flow.weights import prepare_transformer

    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )
    prepare_transformer(pipeline, lora, LORA_TARGETS)


def _call_times(fn: Callable[[], None], calls: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds of each of ``calls`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(calls):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def measure_floor(
    pipeline: Any, work: Work, batch: int, probe_chunk: int, max_calls: int | None = None, warmup: int = 2
) -> dict[str, Any]:
    """Time the bare transformer calls of one epoch of ``work`` at micro-batch ``batch`` (seconds).

    The pipeline's transformer must carry the LoRA (:func:`prepare_floor_model`). Each phase of
    :meth:`Work.forwards` is called with inputs of its exact shapes: sampling forwards (eval, no grad, LoRA
    on), training forwards with grad followed by a backward of the whole output (train mode, gradients
    accumulate), reference forwards (no grad, LoRA disabled once for all of them) and SOLACE's probe forwards
    (conditional only, no grad). ``max_calls`` caps the timed calls per phase (the total is extrapolated).
    A phase's time is the median call time × the number of calls, so that a few calls slowed by other load
    do not count, in wall seconds (``total_s``) and process CPU seconds (``total_cpu_s``).
    """
    from trl_intrinsic.flow.pipelines import get_flow_adapter

    adapter = get_flow_adapter(pipeline)
    transformer = pipeline.transformer
    generator = torch.Generator().manual_seed(0)
    embeddings = adapter.encode_prompts(
        ["a photo of a red circle"], negative_prompt="", max_sequence_length=work.t5_tokens
    )
    latent_shape = adapter.latent_shape(work.resolution, work.resolution)

    def inputs(rows: int, cfg: bool) -> dict[str, torch.Tensor]:
        index = torch.zeros(rows // 2 if cfg else rows, dtype=torch.long)
        cond = embeddings.rows(index)
        if cfg:
            uncond = embeddings.rows(index, negative=True)
            cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        return {
            "hidden_states": torch.randn((rows, *latent_shape), generator=generator),
            "timestep": torch.full((rows,), 500.0),
            "encoder_hidden_states": cond["encoder_hidden_states"].contiguous(),
            "pooled_projections": cond["pooled_projections"].contiguous(),
        }

    def forward(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        return transformer(**kwargs, return_dict=False)[0]

    counts = work.forwards(batch, probe_chunk)
    result: dict[str, Any] = {"batch": batch, "probe_chunk": probe_chunk, "phases": {}}

    def record(phase: str, fn: Callable[[], None]) -> None:
        calls, rows = counts[phase]
        timed = calls if max_calls is None else min(calls, max_calls)
        wall, cpu = _call_times(fn, timed, warmup)
        median, median_cpu = statistics.median(wall), statistics.median(cpu)
        result["phases"][phase] = {
            "calls": calls, "rows": rows, "timed_calls": timed, "median_call_s": median,
            "total_s": median * calls, "total_cpu_s": median_cpu * calls, "timed_sum_s": sum(wall),
        }  # fmt: skip

    sample_in = inputs(counts["sample"][1], cfg=True)
    train_in = inputs(counts["train_grad"][1], cfg=True)
    transformer.eval()
    with torch.no_grad():
        record("sample", lambda: forward(sample_in))
    transformer.train()
    out_grad = torch.randn((counts["train_grad"][1], *latent_shape), generator=generator)
    record("train_grad", lambda: forward(train_in).backward(out_grad))
    transformer.zero_grad(set_to_none=True)
    transformer.disable_adapters()
    with torch.no_grad():
        record("train_nograd", lambda: forward(train_in))
    transformer.enable_adapters()
    transformer.eval()
    if "reward" in counts:
        probe_in = inputs(counts["reward"][1], cfg=False)
        with torch.no_grad():
            record("reward", lambda: forward(probe_in))
    result["total_s"] = sum(p["total_s"] for p in result["phases"].values())
    result["total_cpu_s"] = sum(p["total_cpu_s"] for p in result["phases"].values())
    return result


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    from trl_intrinsic.flow.weights import load_flow_pipeline

    work = WORKS[args.work]
    pipeline = load_flow_pipeline(args.pipe)
    prepare_floor_model(pipeline, work.lora_rank)
    load_start = os.getloadavg()
    floors = [
        measure_floor(pipeline, work, batch, work.probes * batch or 64, max_calls=args.max_calls)
        for batch in args.batches
    ]
    return {
        "side": "floor",
        "status": "ok",
        "work": args.work,
        "torch_threads": torch.get_num_threads(),
        "max_rss_mb": round(peak_rss_mb(), 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "work_spec": asdict(work),
        "floors": floors,
    }


@contextlib.contextmanager
def merged_lora(transformer: torch.nn.Module):
    """Fold the LoRA weights into the base weights (``W + s·B·A``) for the duration of the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        for layer in layers:
            layer.unmerge()


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Per-row cost (ms) of the transformer calls of the work at several rows per call, interleaved in rounds:
    the policy forward without grad (LoRA as separate layers, and LoRA folded into the weights), the reference
    forward (LoRA disabled) and the policy forward + backward. Each value is the best over the rounds of the
    median call in a round (other jobs on the machine only ever slow a call down). Also the largest difference
    between the policy outputs with a trained LoRA folded into the weights and not."""
    from trl_intrinsic.flow.pipelines import get_flow_adapter
    from trl_intrinsic.flow.weights import load_flow_pipeline

    work = WORKS[args.work]
    pipeline = load_flow_pipeline(args.pipe)
    prepare_floor_model(pipeline, work.lora_rank)
    transformer, adapter = pipeline.transformer, get_flow_adapter(pipeline)
    generator = torch.Generator().manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:  # a trained adapter (B starts at 0), so that folding it changes the weights
            param.data.normal_(0.0, 0.02, generator=generator)
    embeddings = adapter.encode_prompts(["a photo of a red circle"], max_sequence_length=work.t5_tokens)
    latent_shape = adapter.latent_shape(work.resolution, work.resolution)
    load_start = os.getloadavg()
    inputs, grads = {}, {}
    for rows in args.rows:
        cond = embeddings.rows(torch.zeros(rows, dtype=torch.long))
        inputs[rows] = {
            "hidden_states": torch.randn((rows, *latent_shape), generator=generator),
            "timestep": torch.full((rows,), 500.0),
            "encoder_hidden_states": cond["encoder_hidden_states"].contiguous(),
            "pooled_projections": cond["pooled_projections"].contiguous(),
        }
        grads[rows] = torch.randn((rows, *latent_shape), generator=generator)

    def forward(rows: int) -> torch.Tensor:
        return transformer(**inputs[rows], return_dict=False)[0]

    def policy_fwd_bwd(rows: int) -> None:
        forward(rows).backward(grads[rows])

    kinds: dict[str, Callable[[int], Any]] = {
        "policy forward, no grad": forward,
        "policy forward, no grad, LoRA folded": forward,
        "reference forward (LoRA disabled)": forward,
        "policy forward + backward": policy_fwd_bwd,
    }
    times: dict[str, dict[int, list[float]]] = {kind: {rows: [] for rows in args.rows} for kind in kinds}
    for _ in range(args.rounds):
        for rows in args.rows:
            repeats = max(2, 128 // rows)
            for kind, fn in kinds.items():
                transformer.train(kind == "policy forward + backward")
                context = contextlib.ExitStack()
                if kind != "policy forward + backward":
                    context.enter_context(torch.no_grad())
                if kind.endswith("LoRA folded"):
                    context.enter_context(merged_lora(transformer))
                if kind.startswith("reference"):
                    transformer.disable_adapters()
                with context:
                    call, _ = _call_times(lambda fn=fn, rows=rows: fn(rows), repeats, warmup=1)
                if kind.startswith("reference"):
                    transformer.enable_adapters()
                times[kind][rows].append(statistics.median(call) / rows * 1000)
                transformer.zero_grad(set_to_none=True)
    transformer.eval()
    with torch.no_grad():
        plain = forward(args.rows[0])
        with merged_lora(transformer):
            folded = forward(args.rows[0])
    return {
        "side": "sweep",
        "status": "ok",
        "work": args.work,
        "loadavg_start": [round(x, 2) for x in load_start],
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "per_row_ms": {kind: {str(r): min(v) for r, v in by_rows.items()} for kind, by_rows in times.items()},
        "folded_max_abs_diff": float((plain - folded).abs().max()),
        "output_max_abs": float(plain.abs().max()),
    }


def save_pipe(directory: str) -> None:
    """Save the project's toy SD3 pipeline (the model both sides train) to ``directory``."""
    from trl_intrinsic.toyworld import load_toy_pipeline

    with contextlib.redirect_stdout(sys.stderr):
        load_toy_pipeline().save_pretrained(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save-pipe")
    save.add_argument("directory")
    for name in ("ours", "floor", "sweep"):
        p = sub.add_parser(name)
        p.add_argument("--work", choices=sorted(WORKS), required=True)
        p.add_argument("--pipe", required=True, help="the tiny SD3 pipeline directory both sides load")
        p.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
        p.add_argument("--out", required=True, help="JSON file to write")
        if name == "ours":
            p.add_argument("--prompts", required=True, help="train.txt of the harness's prompt set")
            p.add_argument("--epochs", type=int, default=4, help="epochs to run; epoch 0 is warm-up")
            p.add_argument("--batch", type=int, default=8, help="images per sampling/training micro-batch")
            p.add_argument("--pyspy", default=None, help="record a py-spy profile of epochs ≥ 1 here")
            p.add_argument(
                "--compile", action="store_true", help="torch_compile=True (the transformer, inductor)"
            )
        elif name == "floor":
            p.add_argument("--batches", type=int, nargs="+", default=[8], help="micro-batch sizes (images)")
            p.add_argument("--max-calls", type=int, default=None, help="timed calls per phase (default: all)")
        else:
            p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64, 128], help="rows per call")
            p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    if args.command == "save-pipe":
        save_pipe(args.directory)
        return
    torch.set_num_threads(args.threads)
    result = {"ours": run_ours, "floor": run_floor, "sweep": run_sweep}[args.command](args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # do not wait for helper threads of the libraries
