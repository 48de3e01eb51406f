"""DiffusionNFT on a diffusers flow-matching pipeline: the toy-world verifier by default, SOLACE or any reward.

    accelerate launch examples/train_diffusion_nft.py     # toy world on CPU, default config
    python examples/train_diffusion_nft.py --max_steps 2
    python examples/train_diffusion_nft.py --reward_funcs solace_reward      # SOLACE, CFG-free and online
    accelerate launch --config_file trl_intrinsic/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        examples/train_diffusion_nft.py --config examples/configs/diffusion_nft_sd35m.yaml --dataset_name prompts.txt

Without ``--config`` and ``--model_name_or_path`` it trains the shipped toy SD3 pipeline with
``examples/configs/toy_diffusion_nft.yaml`` and reports toy accuracy before and after on held-out prompts.
``solace_<name>`` options configure :class:`trl_intrinsic.rewards.SolaceReward`, as in ``train_solace.py``.
"""

from __future__ import annotations

from common import ScriptArguments, parse
from flow_common import run
from train_solace import SolaceArguments
from trl import ModelConfig, TrlParser

from trl_intrinsic import DiffusionNFTConfig


def main(argv: list[str] | None = None):
    parser = TrlParser((ScriptArguments, SolaceArguments, DiffusionNFTConfig, ModelConfig))
    script_args, solace_args, training_args, model_args = parse(parser, argv, "toy_diffusion_nft.yaml")
    solace = solace_args.reward()
    rewards = [solace if name == "solace_reward" else name for name in script_args.reward_funcs]
    return run(script_args, training_args, model_args, reward_funcs=rewards)


if __name__ == "__main__":
    main()
