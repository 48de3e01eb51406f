"""SOLACE: Flow-GRPO on the model's own noise-recovery accuracy (optionally mixed with external rewards).

    accelerate launch examples/train_solace.py             # toy world on CPU, default config
    accelerate launch --config_file trl_intrinsic/accelerate_configs/multi_gpu.yaml --num_processes 8 \\
        examples/train_solace.py --config examples/configs/solace_sd35m.yaml --dataset_name prompts.txt

``solace_<name>`` options configure :class:`trl_intrinsic.rewards.SolaceReward` (``solace_num_probes``,
``solace_timestep_weighting``, ...). ``--reward_funcs solace_reward clip_score --reward_weights 1 0.5
--multi_objective_aggregation normalize_then_sum`` trains the hybrid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from common import ScriptArguments, parse
from flow_common import run
from trl import ModelConfig, TrlParser

from trl_intrinsic import FlowGRPOConfig
from trl_intrinsic.rewards import SolaceReward


@dataclass
class SolaceArguments:
    """``SolaceReward`` options; the defaults are the paper's."""

    solace_num_probes: int = field(default=8, metadata={"help": "K noise probes per prompt group."})
    solace_antithetic: bool = field(default=True, metadata={"help": "Probes in ± pairs (exact zero mean)."})
    solace_delta: float = field(default=1e-6, metadata={"help": "S = -log(MSE + delta)."})
    solace_timestep_weighting: str = field(
        default="uniform", metadata={"help": "'uniform' (paper) or 't(1-t)'."}
    )
    solace_normalize: str | None = field(default=None, metadata={"help": "None (paper) or 'per_timestep'."})
    solace_online: bool = field(
        default=True, metadata={"help": "Score with the policy (False: frozen base)."}
    )
    solace_max_batch_size: int | None = field(
        default=64, metadata={"help": "Rows per scoring forward (None: all rows in one forward)."}
    )

    def reward(self) -> SolaceReward:
        return SolaceReward(**{f.name.removeprefix("solace_"): getattr(self, f.name) for f in fields(self)})


@dataclass
class SolaceScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["solace_reward"],
        metadata={"help": "Reward names; 'solace_reward' is configured by the solace_* options."},
    )


def main(argv: list[str] | None = None):
    parser = TrlParser((SolaceScriptArguments, SolaceArguments, FlowGRPOConfig, ModelConfig))
    script_args, solace_args, training_args, model_args = parse(parser, argv, "toy_solace.yaml")
    solace = solace_args.reward()
    rewards = [solace if name == "solace_reward" else name for name in script_args.reward_funcs]
    return run(script_args, training_args, model_args, reward_funcs=rewards)


if __name__ == "__main__":
    main()
