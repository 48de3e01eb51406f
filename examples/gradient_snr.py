"""Is a reward's policy gradient estimable at this batch size? Cosine of independent Flow-GRPO gradients.

    python examples/gradient_snr.py                                    # toy SD3, toy verifier vs brightness
    python examples/gradient_snr.py --reward_funcs verifier_reward_partial --gradient_accumulation_steps 8

Runs ``FlowGRPOTrainer`` with learning rate 0 for ``--estimates`` optimizer steps, so every step estimates
the gradient at the same weights from fresh rollouts (``per_device_train_batch_size ×
gradient_accumulation_steps`` images), and records the LoRA gradient before each (no-op) optimizer step.
If the estimates are ``g_k = μ + noise_k``, their mean pairwise cosine is about ``|μ|² / (|μ|² + σ²/n)``
for ``n`` images: near 0 means an update is mostly noise, and it takes about ``n (1 − c) / c`` images for a
cosine of 0.5 (the update then points roughly the right way). A dense control reward, the images' mean
brightness, is measured the same way on the same rollouts' settings.

Writes ``gradient_snr.json`` and prints a table. Trains nothing.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import ScriptArguments, parse
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser, get_peft_config

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.rewards import reward_by_name


@dataclass
class SnrArguments(ScriptArguments):
    """The example scripts' data arguments (the toy report options are unused here), plus the estimates."""

    estimates: int = field(default=6, metadata={"help": "Independent gradient estimates per reward (≥ 2)."})
    control: bool = field(default=True, metadata={"help": "Also measure the mean-brightness control reward."})


def brightness(prompts, images, **kwargs) -> list[float]:
    """Mean pixel value in [0, 1]: a dense reward every image responds to (the control)."""
    return [float(np.asarray(image, dtype=np.float32).mean() / 255.0) for image in images]


class _GradientRecorder(TrainerCallback):
    """Copies the trainable parameters' gradient (flattened) before every optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.gradients = params, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradients.append(torch.cat([p.grad.detach().flatten().float() for p in self.params]).cpu())


def measure(
    reward, name: str, args: SnrArguments, training_args: FlowGRPOConfig, model_args: ModelConfig
) -> dict:
    """Mean pairwise cosine (± standard error) of ``args.estimates`` gradient estimates for one reward."""
    model = model_args.model_name_or_path
    if model is None:
        from trl_intrinsic.toyworld import load_toy_pipeline

        model = load_toy_pipeline()
    trainer = FlowGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=training_args,
        train_dataset=args.train_dataset(seed=0),
        peft_config=get_peft_config(model_args),
    )
    recorder = _GradientRecorder([p for p in trainer.model.parameters() if p.requires_grad])
    trainer.add_callback(recorder)
    trainer.train()
    gradients = torch.stack(recorder.gradients)
    cosines = [
        float(torch.nn.functional.cosine_similarity(gradients[i], gradients[j], dim=0))
        for i, j in itertools.combinations(range(len(gradients)), 2)
    ]
    images = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    mean = float(np.mean(cosines))
    return {
        "reward": name,
        "images_per_estimate": images,
        "estimates": len(gradients),
        "cosine_mean": mean,
        "cosine_stderr": float(np.std(cosines, ddof=1) / math.sqrt(len(cosines)))
        if len(cosines) > 1
        else None,
        "images_for_cosine_0.5": images * (1 - mean) / mean if mean > 0 else float("inf"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = TrlParser((SnrArguments, FlowGRPOConfig, ModelConfig))
    args, training_args, model_args = parse(parser, argv, "toy_flow_grpo.yaml")
    if args.estimates < 2:
        raise ValueError(f"estimates must be ≥ 2 (cosines are pairwise), got {args.estimates}.")
    # The weights stay where they are: every step is a fresh estimate of the same gradient.
    training_args.learning_rate = 0.0
    training_args.max_steps = args.estimates
    training_args.beta = 0.0
    training_args.save_strategy = "no"
    rewards = [(reward_by_name(name), name) for name in args.reward_funcs]
    if args.control:
        rewards.append((brightness, "brightness (control)"))
    rows = [measure(reward, name, args, training_args, model_args) for reward, name in rewards]
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_snr.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| reward | images per estimate | cosine of independent estimates | images for cosine 0.5 |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['reward']} | {row['images_per_estimate']} | {row['cosine_mean']:.3f} ± {row['cosine_stderr'] or 0:.3f}"
            f" | {row['images_for_cosine_0.5']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
