"""What the example scripts share: their data arguments, the toy-world default config, and what every
toy-world run reports: held-out accuracy before/after (and along the way) under the toy world's evaluation
protocol with the paired change and its SE, the reward and accuracy curves as PNG plots, and a before/after
image grid.

A model family plugs in by subclassing :class:`ToyReport` and implementing ``sample``: the toy
accuracy of the model as it is now under a protocol, plus images of the grid prompts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

GRID_SIZE = 8
CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class ScriptArguments:
    """Data, rewards and toy-world report of an example run (the training knobs are in the trainer config)."""

    dataset_name: str = field(
        default="toyworld",
        metadata={
            "help": "Prompt source: 'toyworld', a hub dataset, a local dataset directory, .txt or GenEval .jsonl."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the prompt source."})
    num_train_prompts: int | None = field(
        default=None, metadata={"help": "Sample this many prompts (all if None)."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["verifier_reward"],
        metadata={
            "help": "Reward names from trl_intrinsic.rewards, e.g. verifier_reward clip_score solace_reward."
        },
    )
    toy_eval_prompts_per_tag: int | None = field(
        default=None,
        metadata={
            "help": "Toy world only: at most this many distinct prompts per tag in the before/after evaluation "
            "(default: the evaluation protocol's, 80: every held-out prompt of today's world)."
        },
    )
    toy_eval_samples_per_tag: int | None = field(
        default=None,
        metadata={
            "help": "Toy world only: at least this many samples per tag (each prompt sampled "
            "ceil(this / its tag's prompts) times; default: the protocol's, 80)."
        },
    )
    toy_eval_seed: int = field(
        default=10_000,
        metadata={
            "help": "Toy world only: the evaluation seed (≥ 10000: evaluation seeds never coincide with training "
            "seeds, which stay below). Before and after use it, so the change is paired sample by sample."
        },
    )
    toy_eval_sampler: str | None = field(
        default=None,
        metadata={
            "help": "Toy world only: 'deterministic' (the flow pipeline's ODE sampler, the flow default) or "
            "'rollout' (the training rollout sampler: Flow-GRPO's SDE window and noise level, DiffusionNFT's ODE at "
            "the training step count; Janus's IRIS rollout, the only Janus sampler and its default)."
        },
    )
    toy_noise_floor_seeds: int = field(
        default=0,
        metadata={
            "help": "Toy world only: measure the evaluation noise floor (SD of the overall accuracy of the model "
            "before training over this many evaluation seeds, ≥ 2, 5 advised; costs this many − 1 extra "
            "evaluations); 0 does not measure it and the report says so."
        },
    )
    toy_eval_split: str = field(
        default="test",
        metadata={
            "help": "Toy world only: 'test' (held-out compositions, the default) or 'train' (the prompts trained "
            "on; tells 'not learning' apart from 'not transferring')."
        },
    )
    toy_eval_steps: int = field(
        default=0,
        metadata={
            "help": "Toy world only: also measure held-out accuracy every this many steps (the accuracy curve); "
            "0 measures before and after only."
        },
    )
    toy_eval_reward_prompts: int = field(
        default=8,
        metadata={
            "help": "Toy world only: also score the trained rewards on this many fixed held-out prompts "
            "(num_generations samples each, `trainer.evaluate()`) whenever accuracy is measured; 0 disables."
        },
    )

    def __post_init__(self):
        for name in ("toy_eval_prompts_per_tag", "toy_eval_samples_per_tag"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 (or None for the protocol's default), got {value}.")
        if self.toy_eval_seed < 10_000:
            raise ValueError(
                f"toy_eval_seed must be ≥ 10000 (evaluation seeds never coincide with training seeds, which stay "
                f"below 10000), got {self.toy_eval_seed}."
            )
        if self.toy_eval_sampler not in (None, "deterministic", "rollout"):
            raise ValueError(
                f"toy_eval_sampler must be 'deterministic' or 'rollout', got {self.toy_eval_sampler!r}."
            )
        if self.toy_noise_floor_seeds < 0 or self.toy_noise_floor_seeds == 1:
            raise ValueError(
                f"toy_noise_floor_seeds must be 0 (not measured) or ≥ 2 (an SD needs two), got "
                f"{self.toy_noise_floor_seeds}."
            )
        if self.toy_eval_split not in ("test", "train"):
            raise ValueError(f"toy_eval_split must be 'test' or 'train', got {self.toy_eval_split!r}.")
        if self.toy_eval_steps < 0:
            raise ValueError(f"toy_eval_steps must be ≥ 0 (0 disables the curve), got {self.toy_eval_steps}.")
        if self.toy_eval_reward_prompts < 0:
            raise ValueError(
                f"toy_eval_reward_prompts must be ≥ 0 (0 disables), got {self.toy_eval_reward_prompts}."
            )

    def eval_protocol(self):
        """The toy-world evaluation protocol of these arguments (:class:`trl_intrinsic.toyworld.EvalProtocol`)."""
        from trl_intrinsic.toyworld.evaluation import EvalProtocol

        overrides = {
            "max_prompts_per_tag": self.toy_eval_prompts_per_tag,
            "min_samples_per_tag": self.toy_eval_samples_per_tag,
        }
        return EvalProtocol(
            split=self.toy_eval_split,
            seed=self.toy_eval_seed,
            **{k: v for k, v in overrides.items() if v is not None},
        )

    def train_dataset(self, seed: int):
        """The training prompts (a ``datasets.Dataset`` with a ``prompt`` column) from ``dataset_name``."""
        from trl_intrinsic.data import load_prompt_dataset

        return load_prompt_dataset(
            self.dataset_name, split=self.dataset_train_split, num_prompts=self.num_train_prompts, seed=seed
        )


def default_config_argv(argv: list[str], toy_config: str) -> list[str]:
    """With neither ``--config`` nor a model given, train on the toy world with ``configs/<toy_config>``."""
    if "--config" not in argv and not any(a.startswith("--model_name_or_path") for a in argv):
        return ["--config", str(CONFIGS / toy_config), *argv]
    return argv


def parse(parser, argv: list[str] | None, toy_config: str):
    argv = default_config_argv(sys.argv[1:] if argv is None else argv, toy_config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return parser.parse_args_and_config(argv)


class _RecordedReward:
    """A synchronous reward function that also appends ``(reward name, prompt, value)`` of every sample it scores
    to ``sink``; every other attribute is the wrapped function's (``requires_images``, ...)."""

    def __init__(self, func, name: str, sink: list):
        self.func, self.name, self.sink = func, name, sink

    def __getattr__(self, attr: str):
        return getattr(self.__dict__["func"], attr)

    def __call__(self, *args, **kwargs):
        values = self.func(*args, **kwargs)
        prompts = kwargs.get("prompts", args[0] if args else None)
        if prompts is not None and isinstance(values, (list, tuple)) and len(values) == len(prompts):
            self.sink.extend(
                (self.name, p if isinstance(p, str) else json.dumps(p, sort_keys=True, default=str), v)
                for p, v in zip(prompts, values)
            )
        return values


def _recordable(func) -> bool:
    """Whether :class:`_RecordedReward` can wrap ``func``: a plain synchronous callable (not a reward model, not
    async; those keep their means but get no paired change)."""
    import inspect

    return not (
        isinstance(func, torch.nn.Module)
        or inspect.iscoroutinefunction(func)
        or inspect.iscoroutinefunction(type(func).__call__)
    )


def reward_deltas(before: list, after: list) -> tuple[dict[str, float], dict[str, float]]:
    """``({reward: mean change}, {reward: paired SE})`` of per-sample rewards ``(name, prompt, value)`` of two
    evaluations of the same fixed prompts: samples pair by (prompt, occurrence), the SE is clustered by prompt.
    Samples a reward skipped (``None``, NaN) on either side are left out."""
    from trl_intrinsic.toyworld.evaluation import paired_mean_difference

    def keyed(samples, name):
        seen, out = {}, {}
        for n, prompt, value in samples:
            if n != name:
                continue
            k = seen[prompt] = seen.get(prompt, -1) + 1
            out[(prompt, k)] = value
        return out

    delta, se = {}, {}
    for name in dict.fromkeys(n for n, _, _ in before):
        b, a = keyed(before, name), keyed(after, name)
        pairs = [
            (key[0], float(b[key]), float(a[key]))
            for key in b
            if key in a and _finite(b[key]) and _finite(a[key])
        ]
        if pairs:
            delta[name], se[name] = paired_mean_difference(pairs)
    return delta, se


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


class ToyReport(ABC):
    """Toy-world accuracy before and after training, paired under one evaluation protocol; the reward curve; a
    grid of samples.

    Every measurement draws the same samples (:class:`~trl_intrinsic.toyworld.EvalProtocol`: every distinct prompt
    of each tag up to a cap, several samples per prompt, a fixed evaluation seed ≥ 10000 that no training seed may
    equal), so "after − before" is paired sample by sample: per tag and overall the change, its paired SE
    (clustered by prompt) and the flips (:func:`~trl_intrinsic.toyworld.paired_difference`); a change below 2 paired
    SE is printed as "no measurable change". With ``toy_noise_floor_seeds`` ≥ 2 the model before training is also
    evaluated at the next evaluation seeds: the noise floor (:func:`~trl_intrinsic.toyworld.noise_floor`), printed
    beside every change. The sampler is named in the report.

    With ``toy_eval_reward_prompts`` > 0 each measurement also scores the trained rewards on that many fixed
    prompts of the same split (``trainer.evaluate()``: the trainer's own rollouts, the same samples every time),
    so a run shows what it did to its own objective as well as to the verifier's accuracy; their per-sample
    values give the paired change of each reward (``rewards_delta``, ``rewards_delta_se``).

    A model family subclasses it and implements :meth:`sample`; :attr:`samplers` lists the samplers it has, the
    first being its default.
    """

    samplers: tuple[str, ...] = ("deterministic", "rollout")

    def __init__(self, trainer: Trainer, script_args: ScriptArguments):
        self.trainer = trainer
        self.protocol = script_args.eval_protocol()
        self.split = self.protocol.split
        self.sampler = script_args.toy_eval_sampler or self.samplers[0]
        if self.sampler not in self.samplers:
            raise ValueError(
                f"toy_eval_sampler: {type(self).__name__} samples with {self.samplers}, got {self.sampler!r}."
            )
        self.noise_floor_seeds = script_args.toy_noise_floor_seeds
        args = trainer.args
        self.protocol.check_training_seeds(
            args.seed, getattr(args, "data_seed", None), n_eval_seeds=max(1, self.noise_floor_seeds)
        )
        self.results: dict[str, dict[str, Any]] = {}
        self.records: dict[str, list] = {}
        self.reward_samples: dict[str, list] = {}
        self.noise_floor: dict[str, Any] | None = None
        self.grid_images: dict[str, list] = {}
        self.grid_prompts: list[str] = []
        self.curve: list[tuple[int, dict[str, Any], dict | None]] = []
        self.reward_dataset = None
        if script_args.toy_eval_reward_prompts:
            from trl_intrinsic.data import load_prompt_dataset

            self.reward_dataset = load_prompt_dataset(
                "toyworld", split=self.split, num_prompts=script_args.toy_eval_reward_prompts, seed=4321
            )

    @abstractmethod
    def sample(self, protocol, grid: bool) -> tuple[dict[str, Any], list[str], list]:
        """``(scores, grid prompts, grid images)``: the evaluator's scores of the model as it is now under
        ``protocol`` with :attr:`sampler` (with their per-sample ``"records"``); the grid lists may be empty when
        ``grid`` is False. Same prompts and seeds on every call with the same protocol."""

    def rewards(self) -> tuple[dict[str, float], list]:
        """``({reward name: mean}, [(reward name, prompt, value) per sample])`` over the rollouts of the fixed
        reward prompts (call on every process; the samples are gathered from all)."""
        from accelerate.utils import gather_object

        trainer = self.trainer
        model, control = trainer.model, trainer.control
        was_training, flags = model.training, asdict(control)
        sink: list = []
        funcs = trainer.reward_funcs
        trainer.reward_funcs = [
            _RecordedReward(f, name, sink) if _recordable(f) else f
            for f, name in zip(funcs, trainer.reward_func_names, strict=True)
        ]
        try:
            metrics = trainer.evaluate(self.reward_dataset)
        finally:
            trainer.reward_funcs = funcs
        # evaluate() leaves the model in eval mode and resets the control flags (should_log, ...) that the step
        # being measured has set: restore both so that the training step still logs and saves.
        model.train(was_training)
        for name, value in flags.items():
            setattr(control, name, value)
        prefix, suffix = "eval_rewards/", "/mean"
        means = {
            k[len(prefix) : -len(suffix)]: v
            for k, v in metrics.items()
            if k.startswith(prefix) and k.endswith(suffix)
        }
        samples = gather_object(sink) if trainer.accelerator.num_processes > 1 else sink
        return means, samples

    @torch.no_grad()
    def measure(self, name: str, grid: bool = True) -> None:
        """Accuracy per tag under the protocol (and a grid of samples) of the model as it is now, the paired
        change from ``"before"``, and the trained rewards on the fixed reward prompts."""
        from trl_intrinsic.toyworld.evaluation import paired_difference
        from trl_intrinsic.toyworld.report import format_change, format_noise_floor

        rewards = self.rewards() if self.reward_dataset is not None else None
        if not self.trainer.accelerator.is_main_process:
            return
        scores, prompts, images = self.sample(self.protocol, grid)
        self.records[name] = scores.pop("records")
        self.results[name] = scores
        if rewards is not None:
            scores["rewards"], self.reward_samples[name] = rewards
        change = None
        if name != "before" and "before" in self.records:
            change = paired_difference(self.records["before"], self.records[name])
        self.curve.append((self.trainer.state.global_step, scores, change))
        if grid:
            self.grid_prompts, self.grid_images[name] = prompts, images
        print(
            f"toy accuracy {name}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float))
            + f" ({self.protocol.n_samples} samples over {self.protocol.n_prompts} distinct "
            f"{'held-out' if self.split == 'test' else 'training'} prompts, {self.sampler} sampler, evaluation "
            f"seed {self.protocol.seed})"
        )
        if name == "before" and self.noise_floor_seeds:
            self.measure_noise_floor(scores)
        if change is not None:
            print(f"  change from before, overall: {format_change(change['overall'])}")
            print("  " + format_noise_floor(self.noise_floor, NOISE_FLOOR_HINT))
        if rewards and scores["rewards"]:
            print(
                f"rewards on {len(self.reward_dataset)} fixed prompts {name}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in scores["rewards"].items())
            )

    def measure_noise_floor(self, scores: dict[str, Any]) -> None:
        """The noise floor of the model as it is now: its overall accuracy over ``noise_floor_seeds`` evaluation
        seeds (``scores``, just measured, is the first)."""
        from trl_intrinsic.toyworld.evaluation import noise_floor
        from trl_intrinsic.toyworld.report import format_noise_floor

        self.noise_floor = noise_floor(
            lambda protocol: self.sample(protocol, grid=False)[0],
            self.protocol,
            self.noise_floor_seeds,
            known={self.protocol.seed: scores},
        )
        self.noise_floor["model"] = "the model before training"
        print(format_noise_floor(self.noise_floor))

    def write(self) -> None:
        """Write ``toy_accuracy.{json,md}``, ``toy_accuracy_samples.jsonl``, ``reward_curve.png``,
        ``accuracy_curve.png`` and ``before_after.png``."""
        from trl_intrinsic.toyworld.evaluation import paired_difference
        from trl_intrinsic.toyworld.report import before_after_grid, plot_curves, write_accuracy_report

        if not self.trainer.accelerator.is_main_process:
            return
        out = Path(self.trainer.args.output_dir)
        curves = training_reward_curves(self.trainer.state.log_history)
        for key in sorted({k for _, result, _ in self.curve for k in result.get("rewards", {})}):
            points = [(step, r["rewards"][key]) for step, r, _ in self.curve if key in r.get("rewards", {})]
            curves[f"{key}, fixed prompts"] = points
        title = "mean reward of each step's rollouts"
        if self.reward_dataset is not None:
            split = "held-out" if self.split == "test" else "training"
            title += f", and of {len(self.reward_dataset)} fixed {split} prompts"
        per_step = [name for name in curves if not name.endswith("fixed prompts")]
        plot_curves(curves, out / "reward_curve.png", title=title, smooth=per_step)
        tags = [k for k, v in self.curve[0][1].items() if isinstance(v, float)]
        plot_curves(
            {tag: [(step, result[tag]) for step, result, _ in self.curve] for tag in tags},
            out / "accuracy_curve.png",
            title=f"toy accuracy on {'held-out' if self.split == 'test' else 'training'} prompts",
        )
        before_after_grid(
            self.grid_prompts, self.grid_images["before"], self.grid_images["after"], out / "before_after.png"
        )
        curve = []
        for step, result, change in self.curve:
            point = {
                "step": step,
                **{k: v for k, v in result.items() if isinstance(v, float) or k == "rewards"},
            }
            if change is not None:
                point["change"], point["change_se"] = (
                    change["overall"]["value"],
                    change["overall"]["paired_se"],
                )
            curve.append(point)
        deltas = {}
        if "before" in self.reward_samples and "after" in self.reward_samples:
            delta, se = reward_deltas(self.reward_samples["before"], self.reward_samples["after"])
            deltas = {"rewards_delta": delta, "rewards_delta_se": se}
        path = write_accuracy_report(
            out,
            {k: {**self.results[k], "records": self.records[k]} for k in ("before", "after")},
            split=self.split,
            difference=paired_difference(self.records["before"], self.records["after"]),
            noise_floor=self.noise_floor,
            noise_floor_hint=NOISE_FLOOR_HINT,
            sampler=self.sampler,
            protocol=self.protocol.to_dict(),
            **deltas,
            curve=curve,
        )
        print(path.read_text())
        print(
            f"wrote {out / 'reward_curve.png'}, {out / 'accuracy_curve.png'}, {out / 'before_after.png'} and the "
            f"LoRA adapter in {out}"
        )


def training_reward_curves(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, mean reward of the step's rollouts)]}`` from a Trainer's ``log_history``: the total
    (``"reward"``) and each reward function's mean; with a single reward function the total is the same curve and
    is left out."""
    keys = sorted(
        {k for h in history for k in h if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))}
    )
    if "reward" in keys and len(keys) == 2:
        keys.remove("reward")
    return {
        key.removeprefix("rewards/").removesuffix("/mean"): [
            (h["step"], h[key]) for h in history if h.get(key) is not None
        ]
        for key in keys
    }


NOISE_FLOOR_HINT = "--toy_noise_floor_seeds 5 measures it; examples/evaluate.py does by default"


class AccuracyCurve(TrainerCallback):
    """Measures the toy accuracy every ``every`` optimizer steps (same prompts and seeds as before/after)."""

    def __init__(self, report: ToyReport, every: int):
        self.report, self.every = report, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.report.measure(f"step {state.global_step}", grid=False)


def train_with_report(trainer: Trainer, script_args: ScriptArguments, report_class: type[ToyReport] | None):
    """Train, save (and push) the adapter; with a ``report_class`` (toy world) measure before, along the way
    and after, and write the report files."""
    args = trainer.args
    report = None
    if report_class is not None:
        report = report_class(trainer, script_args)
        report.measure("before")
        if script_args.toy_eval_steps:
            trainer.add_callback(AccuracyCurve(report, script_args.toy_eval_steps))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    if report is not None:
        report.measure("after")
        report.write()
    if args.push_to_hub:
        trainer.push_to_hub()
    return trainer
