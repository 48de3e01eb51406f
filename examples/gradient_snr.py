"""Is a reward's policy gradient estimable at this batch size? Cosine of independent Flow-GRPO gradients.

    python examples/gradient_snr.py                                    # toy SD3, toy verifier vs brightness
    python examples/gradient_snr.py --reward_funcs verifier_reward_partial --gradient_accumulation_steps 8

Runs ``FlowGRPOTrainer`` with learning rate 0 for ``--estimates`` optimizer steps, so every step estimates
the gradient at the same weights from fresh rollouts (``per_device_train_batch_size ×
gradient_accumulation_steps`` images), and records the LoRA gradient before each (no-op) optimizer step.
Every estimate uses **the same prompts** (the first ``images / num_generations`` prompts of the dataset)
with fresh sampling noise, so the estimates differ only by the noise of sampling, not by which prompts
they drew. If the estimates are ``g_k = μ + noise_k``, their mean pairwise cosine is about
``|μ|² / (|μ|² + σ²/n)`` for ``n`` images: it takes about ``n (1 − c) / c`` images for a cosine of 0.5
(the update then points roughly the right way). The standard error is a jackknife over the estimates
(leave one estimate out at a time): the ``K(K−1)/2`` pairwise cosines share estimates and are not
independent. A dense control reward, the images' mean brightness, is measured the same way.

What a near-zero cosine means: at this many images per update, on these prompts, an update is mostly
sampling noise — two independent updates are nearly orthogonal, so many small steps are needed for the
signal (which adds up linearly) to beat the noise (which adds up as a square root). What it does **not**
mean: that the reward has no signal (a small ``|μ|`` is not a zero one: more images raise the cosine);
that the reward tracks quality or not (the cosine measures how *consistent* the gradient direction is,
not whether it is a good direction: the brightness control has a high one; use
``examples/reward_diagnostics.py`` for whether a reward tracks quality); or anything about the noise
that varying prompts add during training (the prompts are fixed here on purpose). A gradient that is
exactly zero (every group's rewards equal, so every advantage is 0) also gives a cosine of 0: such
estimates are counted in ``zero_gradient_estimates``.

Writes ``gradient_snr.json`` and prints a table. Trains nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import ScriptArguments, parse
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser, get_peft_config

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.rewards import reward_by_name
from trl_intrinsic.rewards.diagnostics import mean_pairwise_similarity


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


class _PromptRecorder:
    """A reward that records the set of prompts each estimate's rollouts were sampled for."""

    def __init__(self, reward):
        self.reward, self.prompts = reward, []
        self.__name__ = getattr(reward, "__name__", type(reward).__name__)
        self.requires_images = getattr(reward, "requires_images", True)

    def __call__(self, prompts, images, **kwargs):
        self.prompts.append(sorted(set(prompts)))
        return self.reward(prompts, images, **kwargs)


def measure(
    reward, name: str, args: SnrArguments, training_args: FlowGRPOConfig, model_args: ModelConfig
) -> dict:
    """Mean pairwise cosine (± jackknife standard error) of ``args.estimates`` gradient estimates for one
    reward, every estimate on the same prompts."""
    model = model_args.model_name_or_path
    if model is None:
        from trl_intrinsic.toyworld import load_toy_pipeline

        model = load_toy_pipeline()
    images = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    num_prompts = images // training_args.num_generations
    dataset = args.train_dataset(seed=0)
    if len(dataset) < num_prompts:
        raise ValueError(f"An estimate needs {num_prompts} prompts; the dataset has {len(dataset)}.")
    recorder = _PromptRecorder(reward)
    trainer = FlowGRPOTrainer(
        model=model,
        reward_funcs=[recorder],
        args=training_args,
        # One epoch = one generation batch = one estimate: every estimate samples these prompts.
        train_dataset=dataset.select(range(num_prompts)),
        peft_config=get_peft_config(model_args),
    )
    gradients_recorder = _GradientRecorder([p for p in trainer.model.parameters() if p.requires_grad])
    trainer.add_callback(gradients_recorder)
    trainer.train()
    if any(p != recorder.prompts[0] for p in recorder.prompts):
        raise RuntimeError("The gradient estimates were sampled for different prompts.")
    gradients = torch.stack(gradients_recorder.gradients)
    norms = gradients.norm(dim=1)
    unit = gradients / norms.clamp_min(1e-30)[:, None]
    mean, stderr = mean_pairwise_similarity((unit @ unit.T).double().numpy())
    return {
        "reward": name,
        "images_per_estimate": images,
        "prompts_per_estimate": num_prompts,
        "prompts": recorder.prompts[0],
        "estimates": len(gradients),
        "zero_gradient_estimates": int((norms == 0).sum()),
        "cosine_mean": mean,
        "cosine_stderr": stderr,
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
    # Every generation batch is used for one optimizer step only: otherwise estimates would share rollouts.
    training_args.num_iterations = 1
    if training_args.steps_per_generation != training_args.gradient_accumulation_steps:
        raise ValueError(
            "steps_per_generation must equal gradient_accumulation_steps (one generation batch per estimate), "
            f"got {training_args.steps_per_generation} and {training_args.gradient_accumulation_steps}."
        )
    rewards = [(reward_by_name(name), name) for name in args.reward_funcs]
    if args.control:
        rewards.append((brightness, "brightness (control)"))
    rows = [measure(reward, name, args, training_args, model_args) for reward, name in rewards]
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_snr.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "| reward | images per estimate (prompts) | cosine of independent estimates | images for cosine 0.5 |"
    )
    print("|---|---:|---:|---:|")
    for row in rows:
        cosine = f"{row['cosine_mean']:.3f}" + (
            f" ± {row['cosine_stderr']:.3f}" if row["cosine_stderr"] is not None else ""
        )
        zero = f" ({row['zero_gradient_estimates']} zero gradients)" if row["zero_gradient_estimates"] else ""
        print(
            f"| {row['reward']} | {row['images_per_estimate']} ({row['prompts_per_estimate']}) | {cosine}{zero}"
            f" | {row['images_for_cosine_0.5']:.0f} |"
        )
    print(
        "\n± is a jackknife SE over the estimates. Every estimate samples the same prompts with fresh noise: a "
        "cosine near 0 means an update of this size is mostly sampling noise, not that the reward has no "
        "signal, nor whether it tracks quality (examples/reward_diagnostics.py measures that)."
    )
    return rows


if __name__ == "__main__":
    main()
