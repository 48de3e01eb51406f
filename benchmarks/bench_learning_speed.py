"""Learning speed at equal CPU time: Flow-GRPO vs DiffusionNFT on one toy-world prompt.

    python benchmarks/bench_learning_speed.py --methods flow_grpo diffusion_nft --seeds 0 1 2 \\
        --cpu-minutes 5 --output benchmarks/results/learning_speed

Each run post-trains the shipped toy SD3 pipeline on a single prompt with the verifier reward, starting
from the method's toy demo config (``examples/configs/toy_flow_grpo.yaml`` /
``toy_diffusion_nft.yaml``; ``--config flow_grpo=toy_solace.yaml`` picks another), until its training has
used ``--cpu-minutes`` of process CPU time
(``time.process_time``: all threads, robust to other load on the machine; evaluation time excluded).
Every ``--eval-every`` optimizer steps it measures accuracy on the same ``--eval-samples`` samples:
the deterministic sampler of the toy model (10 steps, CFG 4.5) from fixed evaluation seeds
(100_000 + i, which no training stream uses), so successive points and the two methods are compared on
identical noise (paired). Writes ``<output>.json`` (every curve) and ``<output>.md`` (accuracy at equal
CPU time per method: mean over seeds, the paired change against the base model with its SE, and the
between-seed SD).

``--reward solace_reward`` trains on another reward (any name of :mod:`trl_intrinsic.rewards`). Accuracy is
still measured as above, and the trained reward too: at every measurement the trainer's own ``evaluate()``
samples ``--reward-samples`` images of the prompt (its deterministic evaluation sampler, from the same noise
at every call) and the reward scores them with its probes fixed (SOLACE's are drawn as at step 0), so the
trained reward is paired across measurements and methods like accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
EVAL_SEED_OFFSET = 100_000
VERIFIER = "verifier_reward_partial"
METHODS = {"flow_grpo": "toy_flow_grpo.yaml", "diffusion_nft": "toy_diffusion_nft.yaml"}
# Keys of the demo YAML that are script options, not trainer fields.
SCRIPT_KEYS = {"dataset_name", "num_train_prompts", "reward_funcs", "toy_eval_prompts_per_tag", "use_peft",
               "lora_r", "lora_alpha", "lora_dropout", "toy_eval_steps", "toy_eval_reward_prompts",
               "solace_num_probes"}  # fmt: skip


@torch.no_grad()
def correctness(pipeline, prompt: str, metadata: dict, num_samples: int, batch: int = 32) -> np.ndarray:
    """(num_samples,) 0/1: whether each fixed-seed deterministic sample satisfies the prompt."""
    from trl_intrinsic.toyworld import FLOW_SAMPLING, verify

    was_training = pipeline.transformer.training
    pipeline.transformer.eval()
    results = []
    for start in range(0, num_samples, batch):
        seeds = range(EVAL_SEED_OFFSET + start, EVAL_SEED_OFFSET + min(start + batch, num_samples))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipeline([prompt] * len(generators), generator=generators, **FLOW_SAMPLING).images
        results += [bool(verify(image, metadata).correct) for image in images]
    pipeline.transformer.train(was_training)
    return np.asarray(results, dtype=np.float64)


class Measure(TrainerCallback):
    """Stops training at the CPU budget and measures accuracy every ``every`` steps (its CPU time excluded)."""

    def __init__(self, trainer, prompt, metadata, num_samples, every, budget_s, recorder=None):
        self.trainer, self.prompt, self.metadata, self.recorder = trainer, prompt, metadata, recorder
        self.num_samples, self.every, self.budget_s = num_samples, every, budget_s
        self.eval_cpu = 0.0
        self.start = time.process_time()
        self.curve: list[dict] = []

    def training_cpu(self) -> float:
        return time.process_time() - self.start - self.eval_cpu

    def measure(self, step: int) -> None:
        started = time.process_time()
        with self.trainer._ema_weights():  # with `ema`, the weights evaluate() and save_model() use
            correct = correctness(self.trainer.pipeline, self.prompt, self.metadata, self.num_samples)
        point = {"step": step, "accuracy": float(correct.mean()), "correct": correct.astype(int).tolist()}
        if self.recorder is not None:
            point["reward"] = self.recorder.measure(self.trainer)
        self.eval_cpu += time.process_time() - started
        self.curve.append({"cpu_s": self.training_cpu(), **point})
        shown = f"  trained reward {np.nanmean(point['reward']):.4f}" if "reward" in point else ""
        print(
            f"  step {step:3d}  cpu {self.curve[-1]['cpu_s']:7.1f} s  accuracy {correct.mean():.3f}{shown}",
            flush=True,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.process_time()
        self.measure(0)

    def on_step_end(self, args, state, control, **kwargs):
        out_of_budget = self.training_cpu() >= self.budget_s
        if state.global_step % self.every == 0 or out_of_budget:
            self.measure(state.global_step)
        if out_of_budget:
            control.should_training_stop = True


class EvalRecorder:
    """The trained reward as the trainer calls it; during :meth:`measure` it also records the values of the
    evaluation samples, with the reward's random draws fixed (``trainer_state`` of step 0) and, for rewards
    that read them (SOLACE), the same noise levels for every method: every other level of the evaluation
    schedule (``sigmas[1:-1:2]``, 5 of 10), not the method's own trained steps."""

    def __init__(self, reward):
        self.reward, self.values = reward, None
        self.__name__ = getattr(reward, "__name__", "reward")
        self.requires_images = getattr(reward, "requires_images", True)

    def __call__(self, *args, **kwargs):
        if self.values is None:
            return self.reward(*args, **kwargs)
        fixed = {"trainer_state": {"global_step": 0}}
        if kwargs.get("sigmas") is not None:
            fixed["train_sigmas"] = kwargs["sigmas"][1:-1:2]
        values = self.reward(*args, **{**kwargs, **fixed})
        self.values += [float("nan") if v is None else float(v) for v in values]
        return values

    def measure(self, trainer) -> list[float]:
        """(N,) the reward of each evaluation sample of ``trainer.evaluate()``."""
        self.values = []
        try:
            trainer.evaluate()
            return self.values
        finally:
            self.values = None


def parse_value(raw: str):
    """A ``--set`` value as YAML, with ``1e-3``-style numbers read as floats (YAML 1.1 reads them as text)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def run(method: str, seed: int, prompt: str, metadata: dict, args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig

    from trl_intrinsic import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer
    from trl_intrinsic.rewards import reward_by_name
    from trl_intrinsic.toyworld import load_toy_pipeline

    configs = dict(METHODS, **dict(item.split("=", 1) for item in args.config))
    values = yaml.safe_load((CONFIGS / configs[method]).read_text())
    if args.reward not in values.get("reward_funcs", [args.reward]):
        print(
            f"  note: {configs[method]} trains {values['reward_funcs']}; this run trains {args.reward} (--reward)"
        )
    lora = LoraConfig(r=values["lora_r"], lora_alpha=values["lora_alpha"], lora_dropout=0.0)
    values = {k: v for k, v in values.items() if k not in SCRIPT_KEYS}
    values.update(
        output_dir=str(Path(args.output).parent / f"run-{method}-{seed}"), seed=seed, max_steps=10_000,
        disable_tqdm=True, logging_steps=10_000, save_strategy="no", report_to="none",
    )  # fmt: skip
    for override in args.set:
        key, _, raw = override.partition("=")
        if key.startswith(f"{method}."):
            values[key.split(".", 1)[1]] = parse_value(raw)
    config_class, trainer_class = (
        (FlowGRPOConfig, FlowGRPOTrainer)
        if method == "flow_grpo"
        else (DiffusionNFTConfig, DiffusionNFTTrainer)
    )
    dataset = Dataset.from_dict({"prompt": [prompt] * 4096, "metadata": [json.dumps(metadata)] * 4096})
    recorder, eval_dataset = None, None
    if args.reward != VERIFIER:
        recorder = EvalRecorder(reward_by_name(args.reward))
        n = math.ceil(args.reward_samples / values["num_generations"])  # evaluate() samples each row G times
        eval_dataset = Dataset.from_dict({"prompt": [prompt] * n, "metadata": [json.dumps(metadata)] * n})
        values.update(per_device_eval_batch_size=values["per_device_train_batch_size"])
    trainer = trainer_class(
        load_toy_pipeline(), [recorder or args.reward], args=config_class(**values), train_dataset=dataset,
        eval_dataset=eval_dataset, peft_config=lora,
    )  # fmt: skip
    measure = Measure(
        trainer, prompt, metadata, args.eval_samples, args.eval_every, args.cpu_minutes * 60, recorder
    )
    trainer.add_callback(measure)
    trainer.train()
    return {"method": method, "seed": seed, "reward": args.reward,
            "config": {k: v for k, v in values.items() if k != "output_dir"}, "curve": measure.curve}  # fmt: skip


def at_cpu(curve: list[dict], cpu_s: float | None) -> dict:
    """The last measurement at or before ``cpu_s`` of training CPU time (``None``: the final one)."""
    if cpu_s is None:
        return curve[-1]
    return [point for point in curve if point["cpu_s"] <= cpu_s + 1e-9][-1]


def summarise(runs: list[dict], budget_s: float, key: str = "correct") -> str:
    """Accuracy (``key="correct"``) or the trained reward (``key="reward"``) at a quarter, half and all of the
    CPU budget, per method.

    Each run's change is paired with its own first measurement (the trainer's evaluation noise follows the
    training seed), per evaluation sample, then averaged over the runs. The SE treats the accuracy samples
    (independent seeds) as independent, and the trained-reward samples in their prompt groups of
    ``num_generations`` (they share noise probes) as clusters.
    """
    name = "accuracy" if key == "correct" else "trained reward"
    lines = [
        f"| method | seeds | training CPU min (mean) | {name} (mean over seeds) | change vs base ± paired SE | SD over seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        cluster = mine[0].get("config", {}).get("num_generations", 1) if key == "reward" else 1
        for cpu_s in (0.25 * budget_s, 0.5 * budget_s, None):
            points = [at_cpu(r["curve"], cpu_s) for r in mine]
            values = np.asarray([np.nanmean(p[key]) for p in points])
            diffs = np.mean(
                [
                    np.asarray(p[key], dtype=float) - np.asarray(r["curve"][0][key], dtype=float)
                    for p, r in zip(points, mine)
                ],
                axis=0,
            )
            units = diffs.reshape(-1, cluster).mean(axis=1) if len(diffs) % cluster == 0 else diffs
            se = np.nanstd(units, ddof=1) / math.sqrt(len(units))
            spread = values.std(ddof=1) if len(mine) > 1 else float("nan")
            cpu = np.mean([p["cpu_s"] for p in points]) / 60
            lines.append(
                f"| {method} | {len(mine)} | {cpu:.2f} | {values.mean():.3f} | {np.nanmean(diffs):+.3f} ± {se:.3f} | "
                f"{spread:.3f} |"
            )
    return "\n".join(lines)


def time_to_reach(runs: list[dict], thresholds: list[float]) -> str:
    """Training CPU minutes until each run's accuracy is first measured at or above each threshold, per method.

    A first passage on a noisy curve comes early (one lucky measurement suffices), equally for every method
    measured at the same spacing; a run that never reaches a threshold counts as its whole budget and is marked
    with ">". The ratio divides the first method's mean by each other method's (above 1: the other is faster); it
    is a bound (">" or "<") when one of the two means is, and unknown ("–") when both are.
    """
    methods = list(dict.fromkeys(r["method"] for r in runs))
    first = methods[0]
    lines = [
        "| threshold | method | seeds | CPU min to reach, per seed | mean | ratio to " + first + " |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for threshold in thresholds:
        means, bounded = {}, {}
        for method in methods:
            times = []  # (CPU minutes, reached?)
            for r in (r for r in runs if r["method"] == method):
                hit = next((p for p in r["curve"] if np.mean(p["correct"]) >= threshold - 1e-12), None)
                times.append(((hit or r["curve"][-1])["cpu_s"] / 60, hit is not None))
            means[method] = float(np.mean([minutes for minutes, _ in times]))
            per_seed = ", ".join(f"{'' if reached else '>'}{minutes:.1f}" for minutes, reached in times)
            bounded[method] = not all(reached for _, reached in times)
            if method == first:
                ratio = "1.00"
            elif bounded[first] and bounded[method]:
                ratio = "–"
            else:
                sign = ">" if bounded[first] else "<" if bounded[method] else ""
                ratio = f"{sign}{means[first] / means[method]:.2f}"
            lines.append(
                f"| {threshold:.2f} | {method} | {len(times)} | {per_seed} | {'>' if bounded[method] else ''}"
                f"{means[method]:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--prompt", default="a photo of a square")
    parser.add_argument("--cpu-minutes", type=float, default=5.0)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--config",
        nargs="*",
        default=[],
        help="method=file: start that method from another YAML of examples/configs, e.g. flow_grpo=toy_solace.yaml",
    )
    parser.add_argument(
        "--reward", default=VERIFIER, help="the trained reward (a name in trl_intrinsic.rewards)"
    )
    parser.add_argument(
        "--reward-samples",
        type=int,
        default=64,
        help="evaluation samples scored by a trained reward other than the verifier",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="method.field=value overrides, e.g. diffusion_nft.learning_rate=1e-3",
    )
    parser.add_argument(
        "--reach",
        nargs="*",
        type=float,
        default=[],
        help="accuracy thresholds, e.g. 0.7 0.8: also report the training CPU minutes each run needs to first "
        "reach them",
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "learning_speed"))
    parser.add_argument("--merge", nargs="+", help="only summarise these result JSON files into --output")
    args = parser.parse_args(argv)
    for item in args.config:
        method, sep, _ = item.partition("=")
        if not sep or method not in METHODS:
            parser.error(f"--config {item!r}: expected method=file with a method from {list(METHODS)}")
    if args.merge:
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        commands = [
            c
            for part in parts
            for c in (part["command"] if isinstance(part["command"], list) else [part["command"]])
        ]
        result = {**parts[0], "command": commands,
                  "runs": [run for part in parts for run in part["runs"]]}  # fmt: skip
        return write(result, args.output, args.cpu_minutes, args.reach)
    torch.set_num_threads(args.threads)
    from trl_intrinsic.toyworld import TAGS, prompt_space

    metadata = next(
        m
        for tag in TAGS
        for split in ("train", "test")
        for m in prompt_space(tag, split)
        if m["prompt"] == args.prompt
    )
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            print(f"{method}, seed {seed}:", flush=True)
            runs.append(run(method, seed, args.prompt, metadata, args))
    result = {"prompt": args.prompt, "reward": args.reward, "cpu_minutes": args.cpu_minutes, "eval_samples": args.eval_samples,
              "eval_seeds": f"{EVAL_SEED_OFFSET}..{EVAL_SEED_OFFSET + args.eval_samples - 1}",
              "command": "python benchmarks/bench_learning_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": runs}  # fmt: skip
    return write(result, args.output, args.cpu_minutes, args.reach)


def write(result: dict, output: str, cpu_minutes: float, reach: list[float] | None = None) -> dict:
    table = summarise(result["runs"], cpu_minutes * 60)
    if reach:
        table += (
            "\n\nTraining CPU time until the accuracy is first measured at or above a threshold (each measurement "
            f"has a binomial SE of about {0.5 / math.sqrt(len(result['runs'][0]['curve'][0]['correct'])):.2f}):\n\n"
            + time_to_reach(result["runs"], reach)
        )
    if "reward" in result["runs"][0]["curve"][0]:
        samples = len(result["runs"][0]["curve"][0]["reward"])
        table += (
            f"\n\nThe trained reward ({result.get('reward')}) on {samples} evaluation samples of the trainer's "
            "deterministic sampler:\n\n" + summarise(result["runs"], cpu_minutes * 60, key="reward")
        )
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{output}.json").write_text(json.dumps(result, indent=1))
    commands = result["command"] if isinstance(result["command"], list) else [result["command"]]
    note = (
        f"Prompt {result['prompt']!r}; {result['eval_samples']} fixed evaluation samples (seeds "
        f"{result['eval_seeds']}, deterministic sampler, 10 steps, CFG 4.5); training CPU budget "
        f"{cpu_minutes:g} min per run. Commands: " + "; ".join(f"`{c}`" for c in commands)
    )
    trained = result.get("reward", VERIFIER)
    title = "# Learning speed at equal CPU time: Flow-GRPO and DiffusionNFT on one toy prompt" + (
        "" if trained == VERIFIER else f", trained on {trained}"
    )
    Path(f"{output}.md").write_text(f"{title}\n\n{table}\n\n{note}\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
