"""What the flow example scripts share: model and data loading, training, the flow pipeline's toy-world report."""

from __future__ import annotations

import torch
from common import GRID_SIZE, ScriptArguments, ToyReport, train_with_report
from trl import ModelConfig, get_peft_config

from trl_intrinsic import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer


def run(
    script_args: ScriptArguments,
    training_args: FlowGRPOConfig | DiffusionNFTConfig,
    model_args: ModelConfig,
    reward_funcs: list,
) -> FlowGRPOTrainer | DiffusionNFTTrainer:
    """Train (Flow-GRPO, or DiffusionNFT for a ``DiffusionNFTConfig``); on the toy world also measure accuracy
    before and after and write the report files."""
    toy = model_args.model_name_or_path is None
    if toy:
        from trl_intrinsic.toyworld import load_toy_pipeline

        model = load_toy_pipeline()
    else:
        model = model_args.model_name_or_path
    dataset = script_args.train_dataset(training_args.seed)
    trainer_class = DiffusionNFTTrainer if isinstance(training_args, DiffusionNFTConfig) else FlowGRPOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    return train_with_report(trainer, script_args, FlowToyReport if toy else None)


class FlowToyReport(ToyReport):
    """The toy report of a flow pipeline: :func:`evaluate_flow_pipeline` under the protocol, with the deterministic
    sampler (the pipeline's ODE at ``eval_num_inference_steps``, the default) or the training rollout sampler
    (``num_inference_steps``; Flow-GRPO's SDE window and noise level, DiffusionNFT's ODE), and a grid of 8 held-out
    prompts."""

    def __init__(self, trainer: FlowGRPOTrainer | DiffusionNFTTrainer, script_args: ScriptArguments):
        from trl_intrinsic.toyworld import sample_metadata

        super().__init__(trainer, script_args)
        self.grid_prompts = [m["prompt"] for m in sample_metadata(GRID_SIZE, seed=1234, split=self.split)]

    def sample(self, protocol, grid: bool) -> tuple[dict, list[str], list]:
        from trl_intrinsic.toyworld.evaluation import evaluate_flow_pipeline

        args, pipe = self.trainer.args, self.trainer.pipeline
        sampling = {
            "num_inference_steps": args.eval_num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "height": args.resolution,
            "width": args.resolution,
        }
        if args.max_sequence_length is not None:  # else the pipeline's default, as in training
            sampling["max_sequence_length"] = args.max_sequence_length
        if args.negative_prompt:
            sampling["negative_prompt"] = args.negative_prompt
        rollout = None
        if self.sampler == "rollout":  # DiffusionNFT samples its rollouts with the ODE (no noise level)
            sampling["num_inference_steps"] = args.num_inference_steps
            rollout = {
                "noise_level": getattr(args, "noise_level", 0.0),
                "sde_type": getattr(args, "sde_type", "flow_sde"),
                "sde_window_size": getattr(args, "sde_window_size", 0),
                "sde_window_range": getattr(args, "sde_window_range", None),
            }
        was_training = pipe.transformer.training
        pipe.transformer.eval()
        scores = evaluate_flow_pipeline(
            pipe, protocol=protocol, sampler=self.sampler, rollout=rollout, **sampling
        )
        images = []
        if grid:
            generator = torch.Generator().manual_seed(protocol.seed)
            images = pipe(self.grid_prompts, generator=generator, **sampling).images
        pipe.transformer.train(was_training)
        return scores, self.grid_prompts, images
