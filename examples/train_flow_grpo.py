"""Flow-GRPO on a diffusers flow-matching pipeline with external rewards (the toy-world verifier by default).

    accelerate launch examples/train_flow_grpo.py          # toy world on CPU, default config
    python examples/train_flow_grpo.py --config examples/configs/toy_flow_grpo.yaml --max_steps 5
    accelerate launch --config_file trl_intrinsic/accelerate_configs/multi_gpu.yaml examples/train_flow_grpo.py \\
        --model_name_or_path stabilityai/stable-diffusion-3.5-medium --dataset_name prompts.txt \\
        --reward_funcs clip_score --use_peft --lora_r 32 --lora_alpha 64 --resolution 512

Without ``--config`` and ``--model_name_or_path`` it trains the shipped toy SD3 pipeline with
``examples/configs/toy_flow_grpo.yaml`` and reports toy accuracy before and after on held-out prompts.
"""

from __future__ import annotations

from common import ScriptArguments, parse
from flow_common import run
from trl import ModelConfig, TrlParser

from trl_intrinsic import FlowGRPOConfig


def main(argv: list[str] | None = None):
    parser = TrlParser((ScriptArguments, FlowGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parse(parser, argv, "toy_flow_grpo.yaml")
    return run(script_args, training_args, model_args, reward_funcs=list(script_args.reward_funcs))


if __name__ == "__main__":
    main()
