"""What the flow example scripts share: argument dataclass, model and data loading, the toy-world report."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import ModelConfig, get_peft_config

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.data import load_prompt_dataset

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class FlowScriptArguments:
    """Data and rewards of a flow example run (the training knobs are in `FlowGRPOConfig`)."""

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
    toy_eval_steps: int = field(
        default=0,
        metadata={
            "help": "Toy world only: also measure held-out accuracy every this many steps (the accuracy curve); "
            "0 measures before and after only."
        },
    )

    def __post_init__(self):
        if self.toy_eval_prompts_per_tag < 1:
            raise ValueError(f"toy_eval_prompts_per_tag must be ≥ 1, got {self.toy_eval_prompts_per_tag}.")
        if self.toy_eval_steps < 0:
            raise ValueError(f"toy_eval_steps must be ≥ 0 (0 disables the curve), got {self.toy_eval_steps}.")


def default_config_argv(argv: list[str], toy_config: str) -> list[str]:
    """With neither ``--config`` nor a model given, train on the toy world with ``configs/<toy_config>``."""
    if "--config" not in argv and not any(a.startswith("--model_name_or_path") for a in argv):
        return ["--config", str(CONFIGS / toy_config), *argv]
    return argv


def run(
    script_args: FlowScriptArguments,
    training_args: FlowGRPOConfig,
    model_args: ModelConfig,
    reward_funcs: list,
) -> FlowGRPOTrainer:
    """Train; on the toy world also measure accuracy before and after and write the report files."""
    toy = model_args.model_name_or_path is None
    if toy:
        from trl_intrinsic.toyworld import load_toy_pipeline

        model = load_toy_pipeline()
    else:
        model = model_args.model_name_or_path
    dataset = load_prompt_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        num_prompts=script_args.num_train_prompts,
        seed=training_args.seed,
    )
    trainer = FlowGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    report = ToyReport(trainer, script_args.toy_eval_prompts_per_tag) if toy else None
    if report is not None:
        report.measure("before")
        if script_args.toy_eval_steps:
            trainer.add_callback(AccuracyCurve(report, script_args.toy_eval_steps))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if report is not None:
        report.measure("after")
        report.write()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


class AccuracyCurve(TrainerCallback):
    """Measures the toy accuracy every ``every`` optimizer steps (same prompts and seeds as before/after)."""

    def __init__(self, report: ToyReport, every: int):
        self.report, self.every = report, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.report.measure(f"step {state.global_step}", grid=False)


class ToyReport:
    """Toy-world accuracy on the held-out split before and after training, the reward curve and a grid."""

    def __init__(self, trainer: FlowGRPOTrainer, prompts_per_tag: int):
        from trl_intrinsic.toyworld import sample_metadata

        self.trainer, self.prompts_per_tag = trainer, prompts_per_tag
        self.results, self.grid_images, self.curve = {}, {}, []
        self.grid_prompts = [m["prompt"] for m in sample_metadata(8, seed=1234, split="test")]

    def _sampling(self) -> dict:
        args = self.trainer.args
        return {
            "num_inference_steps": args.eval_num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "height": args.resolution,
            "width": args.resolution,
            "max_sequence_length": args.max_sequence_length or 1,
        }

    @torch.no_grad()
    def measure(self, name: str, grid: bool = True) -> None:
        """Held-out accuracy per tag (and a grid of samples) of the pipeline as it is now."""
        from trl_intrinsic.toyworld.pretrain import evaluate_flow_pipeline

        if not self.trainer.accelerator.is_main_process:
            return
        pipe = self.trainer.pipeline
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        self.results[name] = evaluate_flow_pipeline(
            pipe, n_per_tag=self.prompts_per_tag, seed=0, **self._sampling()
        )
        self.curve.append((self.trainer.state.global_step, self.results[name]))
        if grid:
            generator = torch.Generator().manual_seed(0)
            self.grid_images[name] = pipe(self.grid_prompts, generator=generator, **self._sampling()).images
        pipe.transformer.train(was_training)
        print(
            f"toy accuracy {name}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in self.results[name].items() if k != "counts")
        )

    def write(self) -> None:
        from trl_intrinsic.toyworld.report import before_after_grid, plot_curves, write_accuracy_report

        if not self.trainer.accelerator.is_main_process:
            return
        out = Path(self.trainer.args.output_dir)
        history = self.trainer.state.log_history
        curves = {
            key: [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
            for key in sorted(
                {
                    k
                    for h in history
                    for k in h
                    if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))
                }
            )
        }
        plot_curves(curves, out / "reward_curve.png", title="reward (mean over each step's rollouts)")
        tags = [k for k in self.curve[0][1] if k != "counts"]
        plot_curves(
            {tag: [(step, result[tag]) for step, result in self.curve] for tag in tags},
            out / "accuracy_curve.png",
            title="toy accuracy on held-out prompts",
        )
        before_after_grid(
            self.grid_prompts, self.grid_images["before"], self.grid_images["after"], out / "before_after.png"
        )
        curve = [
            {"step": step, **{k: v for k, v in result.items() if k != "counts"}}
            for step, result in self.curve
        ]
        path = write_accuracy_report(out, {k: self.results[k] for k in ("before", "after")}, curve=curve)
        print(path.read_text())
        print(
            f"wrote {out / 'reward_curve.png'}, {out / 'accuracy_curve.png'}, {out / 'before_after.png'} and the "
            f"LoRA adapter in {out}"
        )


def parse(parser, argv: list[str] | None, toy_config: str):
    argv = default_config_argv(sys.argv[1:] if argv is None else argv, toy_config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return parser.parse_args_and_config(argv)
