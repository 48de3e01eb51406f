"""IRIS: GRPO on negative self-certainty for Janus-Pro (chain-of-thought, then image tokens).

    accelerate launch --config_file trl_intrinsic/accelerate_configs/zero3.yaml --num_processes 4 \\
        examples/train_iris.py --config examples/configs/iris_janus_pro_1b.yaml --dataset_name prompts.txt
    python examples/train_iris.py --model_name_or_path path/to/janus --dataset_name toyworld --max_steps 10

Rewards are names from ``trl_intrinsic.rewards`` (``nsc_reward`` by default; ``verifier_reward`` scores
toy-world images). ``--model_name_or_path`` may also be a text causal LM, which trains with
self-certainty rewards on the prompts as text completions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.data import load_prompt_dataset


@dataclass
class IrisScriptArguments:
    """Data and rewards of an IRIS run (the training knobs are in `IntrinsicGRPOConfig`)."""

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
        default_factory=lambda: ["nsc_reward"], metadata={"help": "Reward names from trl_intrinsic.rewards."}
    )


def main(argv: list[str] | None = None) -> IntrinsicGRPOTrainer:
    parser = TrlParser((IrisScriptArguments, IntrinsicGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(
        sys.argv[1:] if argv is None else argv
    )
    if model_args.model_name_or_path is None:
        raise ValueError(
            "--model_name_or_path is required: pass a Janus-Pro checkpoint (e.g. deepseek-community/Janus-Pro-1B "
            "with --config examples/configs/iris_janus_pro_1b.yaml) or a local JanusForConditionalGeneration "
            "directory."
        )
    dataset = load_prompt_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        num_prompts=script_args.num_train_prompts,
        seed=training_args.seed,
    )
    from trl_intrinsic import rewards

    trainer = IntrinsicGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[getattr(rewards, name) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    main()
