"""What the example scripts share: their data arguments, the toy-world default config, and what every
toy-world run reports: held-out accuracy before/after (and along the way), the
reward and accuracy curves as PNG plots, and a before/after image grid.

A model family plugs in by subclassing :class:`ToyReport` and implementing ``sample``: the toy
accuracy of the model as it is now, plus images of the grid prompts.
"""

from __future__ import annotations

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
    toy_eval_prompts_per_tag: int = field(
        default=20,
        metadata={"help": "Toy world only: held-out prompts per tag for the before/after accuracy."},
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
        if self.toy_eval_prompts_per_tag < 1:
            raise ValueError(f"toy_eval_prompts_per_tag must be ≥ 1, got {self.toy_eval_prompts_per_tag}.")
        if self.toy_eval_split not in ("test", "train"):
            raise ValueError(f"toy_eval_split must be 'test' or 'train', got {self.toy_eval_split!r}.")
        if self.toy_eval_steps < 0:
            raise ValueError(f"toy_eval_steps must be ≥ 0 (0 disables the curve), got {self.toy_eval_steps}.")
        if self.toy_eval_reward_prompts < 0:
            raise ValueError(
                f"toy_eval_reward_prompts must be ≥ 0 (0 disables), got {self.toy_eval_reward_prompts}."
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


class ToyReport(ABC):
    """Toy-world accuracy on the held-out split before and after training, the reward curve and a grid.

    With ``reward_prompts`` > 0 each measurement also scores the trained rewards on that many fixed prompts of
    the same split (``trainer.evaluate()``: the trainer's own rollouts, the same samples every time), so a run
    shows what it did to its own objective as well as to the verifier's accuracy.
    """

    def __init__(self, trainer: Trainer, prompts_per_tag: int, split: str = "test", reward_prompts: int = 0):
        self.trainer, self.prompts_per_tag, self.split = trainer, prompts_per_tag, split
        self.results: dict[str, dict[str, Any]] = {}
        self.grid_images: dict[str, list] = {}
        self.grid_prompts: list[str] = []
        self.curve: list[tuple[int, dict[str, Any]]] = []
        self.reward_dataset = None
        if reward_prompts:
            from trl_intrinsic.data import load_prompt_dataset

            self.reward_dataset = load_prompt_dataset(
                "toyworld", split=split, num_prompts=reward_prompts, seed=4321
            )

    @abstractmethod
    def sample(self, grid: bool) -> tuple[dict[str, Any], list[str], list]:
        """``(accuracy dict of trl_intrinsic.toyworld.evaluate, grid prompts, grid images)``; the grid
        lists may be empty when ``grid`` is False. Same prompts and seeds on every call."""

    def rewards(self) -> dict[str, float]:
        """``{reward name: mean}`` over the rollouts of the fixed reward prompts (call on every process)."""
        model, control = self.trainer.model, self.trainer.control
        was_training, flags = model.training, asdict(control)
        metrics = self.trainer.evaluate(self.reward_dataset)
        # evaluate() leaves the model in eval mode and resets the control flags (should_log, ...) that the step
        # being measured has set: restore both so that the training step still logs and saves.
        model.train(was_training)
        for name, value in flags.items():
            setattr(control, name, value)
        prefix, suffix = "eval_rewards/", "/mean"
        return {
            k[len(prefix) : -len(suffix)]: v
            for k, v in metrics.items()
            if k.startswith(prefix) and k.endswith(suffix)
        }

    @torch.no_grad()
    def measure(self, name: str, grid: bool = True) -> None:
        """Held-out accuracy per tag (and a grid of samples) of the model as it is now, and the trained
        rewards on the fixed reward prompts."""
        rewards = self.rewards() if self.reward_dataset is not None else None
        if not self.trainer.accelerator.is_main_process:
            return
        self.results[name], prompts, images = self.sample(grid)
        if rewards is not None:
            self.results[name]["rewards"] = rewards
        self.curve.append((self.trainer.state.global_step, self.results[name]))
        if grid:
            self.grid_prompts, self.grid_images[name] = prompts, images
        print(
            f"toy accuracy {name}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in self.results[name].items() if isinstance(v, float))
        )
        if rewards:
            print(
                f"rewards on {len(self.reward_dataset)} held-out prompts {name}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in rewards.items())
            )

    def write(self) -> None:
        """Write ``toy_accuracy.{json,md}``, ``reward_curve.png``, ``accuracy_curve.png`` and ``before_after.png``."""
        from trl_intrinsic.toyworld.report import before_after_grid, plot_curves, write_accuracy_report

        if not self.trainer.accelerator.is_main_process:
            return
        out = Path(self.trainer.args.output_dir)
        history = self.trainer.state.log_history
        keys = sorted(
            {
                k
                for h in history
                for k in h
                if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))
            }
        )
        curves = {
            key.removeprefix("rewards/").removesuffix("/mean"): [
                (h["step"], h[key]) for h in history if h.get(key) is not None
            ]
            for key in keys
        }
        for key in sorted({k for _, result in self.curve for k in result.get("rewards", {})}):
            points = [(step, r["rewards"][key]) for step, r in self.curve if key in r.get("rewards", {})]
            curves[f"{key}, fixed prompts"] = points
        title = "mean reward of each step's rollouts"
        if self.reward_dataset is not None:
            split = "held-out" if self.split == "test" else "training"
            title += f", and of {len(self.reward_dataset)} fixed {split} prompts"
        plot_curves(curves, out / "reward_curve.png", title=title)
        tags = [k for k, v in self.curve[0][1].items() if isinstance(v, float)]
        plot_curves(
            {tag: [(step, result[tag]) for step, result in self.curve] for tag in tags},
            out / "accuracy_curve.png",
            title=f"toy accuracy on {'held-out' if self.split == 'test' else 'training'} prompts",
        )
        before_after_grid(
            self.grid_prompts, self.grid_images["before"], self.grid_images["after"], out / "before_after.png"
        )
        curve = [
            {"step": step, **{k: v for k, v in result.items() if isinstance(v, float) or k == "rewards"}}
            for step, result in self.curve
        ]
        path = write_accuracy_report(
            out, {k: self.results[k] for k in ("before", "after")}, split=self.split, curve=curve
        )
        print(path.read_text())
        print(
            f"wrote {out / 'reward_curve.png'}, {out / 'accuracy_curve.png'}, {out / 'before_after.png'} and the "
            f"LoRA adapter in {out}"
        )


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
        report = report_class(
            trainer,
            script_args.toy_eval_prompts_per_tag,
            script_args.toy_eval_split,
            reward_prompts=script_args.toy_eval_reward_prompts,
        )
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
