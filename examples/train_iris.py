"""IRIS: GRPO on negative self-certainty for Janus-Pro (chain-of-thought, then image tokens).

    accelerate launch examples/train_iris.py              # toy world on CPU, default config
    accelerate launch --config_file trl_intrinsic/accelerate_configs/zero3.yaml --num_processes 4 \\
        examples/train_iris.py --config examples/configs/iris_janus_pro_1b.yaml --dataset_name prompts.txt
    python examples/train_iris.py --model_name_or_path path/to/janus --dataset_name toyworld --max_steps 10

Without ``--config`` and ``--model_name_or_path`` it trains the shipped toy Janus with
``examples/configs/toy_iris.yaml`` and reports toy accuracy before and after on held-out prompts, paired under
the toy world's evaluation protocol (the change per tag with its paired SE; ``--toy_noise_floor_seeds 5`` also
measures the evaluation noise floor).
Rewards are names from ``trl_intrinsic.rewards`` (``nsc_reward`` by default; ``verifier_reward`` scores
toy-world images). ``--model_name_or_path`` may also be a text causal LM, which trains with
self-certainty rewards on the prompts as text completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common import GRID_SIZE, ScriptArguments, ToyReport, parse, train_with_report
from trl import ModelConfig, TrlParser, get_peft_config

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.rewards import reward_by_name


@dataclass
class IrisScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["nsc_reward"],
        metadata={"help": "Reward names from trl_intrinsic.rewards, e.g. nsc_reward verifier_reward."},
    )


class JanusToyReport(ToyReport):
    """The toy report of a Janus model under the protocol, sampled as the trainer's rollouts are (CoT, guidance,
    temperatures): the IRIS rollout is the only Janus sampler (``"rollout"``)."""

    samplers = ("rollout",)

    def sample(self, protocol, grid: bool) -> tuple[dict, list[str], list]:
        from trl_intrinsic.toyworld.evaluation import evaluate_janus

        args = self.trainer.args
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        model = (
            model.get_base_model() if hasattr(model, "get_base_model") else model
        )  # LoRA layers stay active
        scores = evaluate_janus(
            model,
            self.trainer.processing_class,
            protocol=protocol,
            use_cot=args.use_cot,
            cot_template=args.cot_template,
            return_samples=True,
            cfg_weight=args.cfg_weight,
            image_temperature=args.image_temperature,
            temperature=args.temperature,
            max_cot_tokens=args.max_completion_length,
        )
        samples = scores.pop("samples")
        if not grid:
            return scores, [], []
        picks = range(0, len(samples["images"]), max(1, len(samples["images"]) // GRID_SIZE))
        picks = list(picks)[:GRID_SIZE]
        return (
            scores,
            [samples["metadata"][i]["prompt"] for i in picks],
            [samples["images"][i] for i in picks],
        )


def main(argv: list[str] | None = None) -> IntrinsicGRPOTrainer:
    parser = TrlParser((IrisScriptArguments, IntrinsicGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parse(parser, argv, "toy_iris.yaml")
    reward_funcs = [reward_by_name(name) for name in script_args.reward_funcs]
    toy = model_args.model_name_or_path is None
    processor = None
    if toy:
        from trl_intrinsic.toyworld import load_toy_janus

        model, processor = load_toy_janus()
    else:
        model = model_args.model_name_or_path
    dataset = script_args.train_dataset(training_args.seed)
    trainer = IntrinsicGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
    )
    return train_with_report(trainer, script_args, JanusToyReport if toy else None)


if __name__ == "__main__":
    main()
