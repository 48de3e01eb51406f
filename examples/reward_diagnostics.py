"""Does an intrinsic reward track quality? Within-group AUROC of rewards against a reference, on real rollouts.

    python examples/reward_diagnostics.py --model toy-sd3 --rewards solace_reward --output outputs/diag-sd3
    python examples/reward_diagnostics.py --model toy-janus --rewards nsc_reward --output outputs/diag-janus
    python examples/reward_diagnostics.py --model path/to/pipeline --config my_training.yaml \\
        --dataset prompts.txt --rewards solace_reward --reference clip_score --groups 64

Samples ``--groups`` prompt groups of ``--num_generations`` images **as a training rollout does**: it builds
the real trainer (``FlowGRPOTrainer`` for a flow pipeline, ``IntrinsicGRPOTrainer`` for a Janus model) with
the rollout settings of ``--config`` (a training YAML; default ``examples/configs/toy_flow_grpo.yaml`` or
``toy_iris.yaml``) and drives its own generation and scoring step (same sampler, SDE window and noise,
guidance, seed scheme, reward-call contract), once per generation batch, at the seeds of training steps
0, 1, 2, ...; nothing is trained. Every studied reward, the reference and the calibration baselines
(``random``, ``brightness``, ``ink_share``, ``latent_std`` for flow; for Janus also the two parts of NSC,
``nsc_text`` and ``nsc_image``) are passed to the trainer as reward functions that record their values.

For each score it reports, against the reference (see :mod:`trl_intrinsic.rewards.diagnostics`): the
within-group AUROC (binary reference; the pairwise concordance for a continuous one; 0.5 = no signal, below
0.5 = anti-aligned), the mean within-group Spearman, bootstrap standard errors over groups, the informative
groups (reference not constant) and pairs, per tag when the prompts have tags. Writes
``OUTPUT/diagnostics.json`` (``{score: {auroc, auroc_se, spearman, spearman_se, n_groups, n_pairs,
n_groups_total, kind, by_tag: {tag: {...}}}}``), ``OUTPUT/run.json`` (settings, reference mean, wall time)
and ``OUTPUT/diagnostics.png``, and prints a table. Single process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIGS = {"flow": CONFIGS / "toy_flow_grpo.yaml", "janus": CONFIGS / "toy_iris.yaml"}
TOY_MODELS = {"toy-sd3": "flow", "toy-flow": "flow", "toy-janus": "janus"}
REFERENCE_ALIASES = {"toy_verifier": "verifier_reward"}
BASELINES = ("random", "brightness", "ink_share", "latent_std")
# Rollout settings recorded in run.json.
SETTINGS = {
    "flow": (
        "resolution", "num_inference_steps", "guidance_scale", "noise_level", "sde_type", "same_latent",
        "sde_window_size", "sde_window_range", "timestep_fraction", "timestep_selection", "max_sequence_length",
        "per_device_train_batch_size", "steps_per_generation",
    ),
    "janus": (
        "use_cot", "max_completion_length", "temperature", "cfg_weight", "image_temperature",
        "per_device_train_batch_size", "steps_per_generation",
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="toy-sd3",
        help="toy-sd3, toy-janus, a local diffusers flow pipeline (model_index.json) or Janus model "
        "(config.json), or a hub id with --family.",
    )
    parser.add_argument("--family", choices=("auto", "flow", "janus"), default="auto")
    parser.add_argument(
        "--config", default=None, help="Training YAML whose rollout settings are used (default: the toy one)."
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Override settings of the config, e.g. num_inference_steps=3 (values parsed as YAML).",
    )
    parser.add_argument("--dataset", default="toyworld", help="Prompt source of load_prompt_dataset.")
    parser.add_argument("--split", default="test", help="Split of the prompt source (toyworld: held-out).")
    parser.add_argument("--rewards", nargs="+", default=["solace_reward"], help="Reward names to study.")
    parser.add_argument(
        "--reference",
        default="toy_verifier",
        help="Reference metric: toy_verifier (the toy verifier, 0/1), a reward name of trl_intrinsic.rewards "
        "(e.g. clip_score, verifier_reward_partial), a baseline name, or module:function.",
    )
    parser.add_argument("--groups", type=int, default=24, help="Prompt groups (rounded up to whole batches).")
    parser.add_argument("--num_generations", type=int, default=None, help="Images per group (config's).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the prompts, rollouts and bootstrap.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the SEs.")
    parser.add_argument("--output", default="outputs/reward-diagnostics", help="Output directory.")
    args = parser.parse_args(argv)
    if args.groups < 1:
        parser.error(f"--groups must be ≥ 1, got {args.groups}")
    return args


# ---------------------------------------------------------------------------------------------- model
def load_model(name: str, family: str) -> tuple[str, Any, Any, bool]:
    """``(family, model or path, processor or None, is_toy)``."""
    if name in TOY_MODELS:
        from trl_intrinsic.toyworld import load_toy_janus, load_toy_pipeline

        if TOY_MODELS[name] == "flow":
            return "flow", load_toy_pipeline(), None, True
        model, processor = load_toy_janus()
        return "janus", model, processor, True
    path = Path(name)
    if family == "auto":
        if (path / "model_index.json").is_file():
            family = "flow"
        elif (path / "config.json").is_file():
            family = "janus"
        else:
            raise ValueError(
                f"--model {name}: not toy-sd3 / toy-janus nor a directory with model_index.json (flow pipeline) "
                "or config.json (Janus); for a hub id pass --family flow or --family janus."
            )
    if family == "janus" and (path / "processor_config.json").is_file():
        from trl_intrinsic.toyworld import load_toy_janus

        model, processor = load_toy_janus(path)
        return "janus", model, processor, False
    return family, name, None, False


def build_config(family: str, args: argparse.Namespace, output_dir: str) -> tuple[Any, dict[str, Any], Path]:
    """The trainer config from ``--config`` (only its fields; ``--set`` overrides) and the YAML's extra
    entries. Nothing is trained: ``beta`` = 0 (no reference pass; it does not change the rollouts)."""
    from trl_intrinsic import FlowGRPOConfig, IntrinsicGRPOConfig

    config_class = FlowGRPOConfig if family == "flow" else IntrinsicGRPOConfig
    path = Path(args.config) if args.config else DEFAULT_CONFIGS[family]
    values = yaml.safe_load(path.read_text()) or {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key] = yaml.safe_load(value)
    names = {f.name for f in dataclasses.fields(config_class)}
    extra = {k: v for k, v in values.items() if k not in names}
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(
        output_dir=output_dir,  # the trainer writes nothing: a scratch directory
        report_to="none",
        beta=0.0,
        reward_weights=None,
        save_strategy="no",
        seed=args.seed,
        log_completions=False,
    )
    if args.num_generations is not None:
        kwargs["num_generations"] = args.num_generations
        batch = kwargs.get("per_device_train_batch_size", 8)
        kwargs["per_device_train_batch_size"] = args.num_generations * max(
            1, round(batch / args.num_generations)
        )
    return config_class(**kwargs), extra, path


def reward(name: str, extra: dict[str, Any], seed: int):
    """A reward function from a name: a registered reward, a baseline, or ``module:function``."""
    from trl_intrinsic.rewards import SolaceReward, diagnostics, reward_by_name

    name = REFERENCE_ALIASES.get(name, name)
    if name == "random":
        return diagnostics.RandomScore(seed)
    if name in BASELINES:
        return getattr(diagnostics, name)
    if ":" in name:
        module, _, attribute = name.partition(":")
        return getattr(importlib.import_module(module), attribute)
    if name == "solace_reward":  # with the YAML's solace_* options, as examples/train_solace.py reads them
        options = {k.removeprefix("solace_"): v for k, v in extra.items() if k.startswith("solace_")}
        return SolaceReward(**options)
    return reward_by_name(name)


def nsc_text(prompts=None, self_certainty_text=None, **kwargs):
    """The CoT part of NSC: −(mean self-certainty of the chain-of-thought tokens); None without a CoT."""
    return [None if s is None or math.isnan(s) else -float(s) for s in self_certainty_text]


def nsc_image(prompts=None, self_certainty_image=None, **kwargs):
    """The image part of NSC: −(mean self-certainty of the image tokens)."""
    return [-float(s) for s in self_certainty_image]


# ---------------------------------------------------------------------------------------------- sampling
def prompt_rows(args: argparse.Namespace, n_groups: int) -> list[dict]:
    """One dataset row per group: ``n_groups`` toy-world prompts, or the source's rows shuffled and cycled."""
    from trl_intrinsic.data import load_prompt_dataset

    if args.dataset == "toyworld":
        dataset = load_prompt_dataset("toyworld", split=args.split, num_prompts=n_groups, seed=args.seed)
    else:
        dataset = load_prompt_dataset(args.dataset, split=args.split).shuffle(seed=args.seed)
    return [dict(dataset[i % len(dataset)]) for i in range(n_groups)]


def sample(trainer, family: str, batches: list[list[dict]]) -> None:
    """Run the trainer's own generation and scoring on each generation batch, at the seeds of training step
    k for batch k (the micro-step counter and global step a training run has when it samples that batch)."""
    from tqdm.auto import tqdm

    args = trainer.args
    generate_every = args.steps_per_generation * trainer.num_iterations
    trainer.model.train()  # as in training_step: rollouts of mode "train", rewards with the model in train mode
    for k, batch in enumerate(tqdm(batches, desc="rollouts", unit="batch")):
        trainer._step = k * generate_every
        trainer.state.global_step = trainer._step // args.gradient_accumulation_steps
        inputs = [dict(row) for row in batch]
        if family == "flow":
            trainer._generate_and_score(inputs, mode="train")
        else:
            trainer._generate_and_score_completions(inputs)


def build_trainer(family: str, model: Any, processor: Any, config: Any, funcs: list, dataset: Any):
    from trl_intrinsic import FlowGRPOTrainer, IntrinsicGRPOTrainer

    if family == "flow":
        return FlowGRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset)
    return IntrinsicGRPOTrainer(
        model=model, reward_funcs=funcs, args=config, train_dataset=dataset, processing_class=processor
    )


# ---------------------------------------------------------------------------------------------- outputs
def plot(results: dict[str, dict], kinds: dict[str, str], path: Path, title: str, statistic: str) -> None:
    """One panel for all groups and one per tag; one bar per score with its bootstrap SE."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    tags = sorted({tag for r in results.values() for tag in r["by_tag"]})
    panels = [("all prompts", {n: r for n, r in results.items()})]
    panels += [(tag, {n: r["by_tag"].get(tag) for n, r in results.items()}) for tag in tags]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colors = {"reward": "tab:blue", "part": "tab:cyan", "baseline": "tab:gray"}
    names = list(results)
    for ax, (label, entries) in zip(axes.flat, panels, strict=False):
        values = [(entries[n] or {}).get("auroc") for n in names]
        errors = [(entries[n] or {}).get("auroc_se") for n in names]
        ax.bar(
            range(len(names)),
            [math.nan if v is None else v for v in values],
            yerr=[math.nan if e is None else e for e in errors],  # no bar: fewer than two informative groups
            capsize=3,
            color=[colors[kinds[n]] for n in names],
        )
        ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
        groups = next((e["n_groups"] for e in entries.values() if e), 0)
        ax.set_title(f"{label}: {groups} informative group{'' if groups == 1 else 's'}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"within-group {statistic}", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [Patch(color=colors[k], label=k) for k in colors if k in kinds.values()]
    fig.legend(handles=handles, loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    from trl_intrinsic.rewards import diagnostics

    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    family, model, processor, toy = load_model(args.model, args.family)
    scratch = tempfile.mkdtemp(prefix="reward-diagnostics-")
    config, extra, config_path = build_config(family, args, scratch)
    if not toy and args.config is None:
        print(
            f"note: sampling with the toy settings of {config_path}; pass --config with your training YAML."
        )

    # 1. What is recorded: the reference first (it also records groups and tags), the studied rewards, the
    # parts of NSC (Janus) and the calibration baselines.
    reference_name = REFERENCE_ALIASES.get(args.reference, args.reference)
    kinds = dict.fromkeys(args.rewards, "reward")
    if family == "janus":
        kinds.update(nsc_text="part", nsc_image="part")
    for name in BASELINES:
        if name != reference_name and not (name == "latent_std" and family != "flow"):
            kinds.setdefault(name, "baseline")
    kinds.pop(reference_name, None)
    recorder = diagnostics.ScoreRecorder(config.num_generations)
    funcs = [recorder.wrap(reward(reference_name, extra, args.seed), reference_name)]
    parts = {"nsc_text": nsc_text, "nsc_image": nsc_image}
    for name in kinds:
        funcs.append(recorder.wrap(parts.get(name) or reward(name, extra, args.seed + 1), name))

    # 2. The trainer, and one generation batch after another of whole prompt groups.
    groups_per_batch = (
        config.per_device_train_batch_size * config.steps_per_generation // config.num_generations
    )
    n_batches = math.ceil(args.groups / groups_per_batch)
    rows = prompt_rows(args, n_batches * groups_per_batch)
    from datasets import Dataset

    trainer = build_trainer(family, model, processor, config, funcs, Dataset.from_list(rows))
    if trainer.accelerator.num_processes > 1:
        raise RuntimeError("reward_diagnostics.py runs on one process; launch it with `python`.")
    size = groups_per_batch
    batches = [
        [row for row in rows[b * size : (b + 1) * size] for _ in range(config.num_generations)]
        for b in range(n_batches)
    ]
    sample(trainer, family, batches)
    shutil.rmtree(scratch, ignore_errors=True)

    # 3. The statistics, the files and the table.
    table = recorder.table()
    reference = table["scores"].pop(reference_name)
    results = diagnostics.diagnose(
        {name: table["scores"][name] for name in kinds},
        reference,
        table["groups"],
        table["tags"],
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    for name, result in results.items():
        result["kind"] = kinds[name]
    binary = diagnostics.is_binary(reference)
    statistic = "AUROC" if binary else "concordance"
    by_tag = {}
    if table["tags"] is not None:
        for tag in sorted({t for t in table["tags"] if t is not None}):
            mine = np.asarray([t == tag for t in table["tags"]])
            by_tag[tag] = float(np.nanmean(reference[mine]))
    elapsed = time.perf_counter() - started
    run = {
        "command": " ".join(
            ["python", "examples/reward_diagnostics.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": args.model,
        "family": family,
        "config": str(config_path),
        "settings": {key: getattr(config, key) for key in SETTINGS[family]},
        "overrides": args.set,
        "dataset": args.dataset,
        "split": args.split,
        "reference": reference_name,
        "reference_kind": "binary" if binary else "continuous",
        "statistic": statistic,
        "reference_mean": float(np.nanmean(reference)),
        "reference_mean_by_tag": by_tag,
        "groups": len(set(table["groups"])),
        "num_generations": config.num_generations,
        "samples": len(reference),
        "seed": args.seed,
        "bootstrap": args.bootstrap,
        "wall_time_s": round(elapsed, 1),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    title = (
        f"{args.model}: {run['groups']} groups of {config.num_generations}, reference {reference_name} "
        f"(mean {run['reference_mean']:.3f})"
    )
    plot(results, kinds, out / "diagnostics.png", title, statistic)
    print(f"\n{title}; {statistic} 0.5 = no signal, < 0.5 = anti-aligned; ± bootstrap SE over groups\n")
    print(diagnostics.format_table(results, statistic))
    print(
        f"\nwrote {out / 'diagnostics.json'}, {out / 'run.json'} and {out / 'diagnostics.png'} in {elapsed:.0f} s"
    )
    return results


if __name__ == "__main__":
    main()
