"""Flow-GRPO and SOLACE cost, each measured against the bare model compute it needs, in one run.

    python benchmarks/bench_flow.py            # a few minutes on 2 CPU cores
    python benchmarks/bench_flow.py --quick    # seconds; a smoke test (do not commit its results)

1. Trainer overhead: a ``FlowGRPOTrainer`` step (sampling, rewards, advantages, loss, backward,
   optimizer) vs the same forwards, backwards and optimizer step run by hand with no trainer.
2. SOLACE: the reward call vs the bare batched transformer forwards it needs, and vs a loop making
   one forward per (probe, sigma).
3. Images per second of training with a latent-only reward (no VAE decode) vs the same reward
   declared as needing pixels; prompt encoding once per group vs once per image.

All on a small random SD3 transformer (``trl_intrinsic.testing.tiny_sd3_pipeline`` with wider
layers) at 64 px. Writes ``benchmarks/results/flow.json`` and ``flow.md``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from _common import base_parser, interleaved_times, markdown_table, paired_ratio, write_results
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.flow.pipelines import get_flow_adapter
from trl_intrinsic.flow.rollout import sample_trajectories, sde_window, train_step_indices
from trl_intrinsic.flow.sde import sde_step_with_logprob
from trl_intrinsic.rewards import SolaceReward
from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.trainers.grpo_math import clipped_policy_loss

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square", "three circles"]


def latent_mean(prompts, images, *, latents, **kwargs):
    """A latent-only reward: the mean of each final latent."""
    return latents.flatten(1).mean(1).tolist()


latent_mean.requires_images = False


def _pipeline(settings: dict):
    return tiny_sd3_pipeline(
        num_layers=settings["layers"],
        attention_head_dim=settings["head_dim"],
        num_attention_heads=4,
        caption_projection_dim=4 * settings["head_dim"],
    )


class _StepTimer(TrainerCallback):
    """Times every trainer step and, right after it, one run of ``paired`` (the bare-compute baseline), so
    that both see the same machine load."""

    def __init__(self, paired=None):
        self.times, self.paired_times, self.paired, self._start = [], [], paired, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        if self.paired is not None:
            start = time.perf_counter()
            self.paired()
            self.paired_times.append(time.perf_counter() - start)


class _AlternateDecode(TrainerCallback):
    """Makes the trainer decode images on odd steps only, so steps with and without VAE decoding alternate
    under the same machine load (the reward ignores the images either way)."""

    def __init__(self):
        self.trainer = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.requires_images = state.global_step % 2 == 1


def _config(settings: dict, output_dir: str, **overrides) -> FlowGRPOConfig:
    values = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, seed=0,
        per_device_train_batch_size=settings["batch"], num_generations=settings["group"],
        max_steps=settings["steps"], resolution=settings["resolution"],
        num_inference_steps=settings["sampler_steps"], save_strategy="no", logging_steps=10_000,
        learning_rate=1e-4, beta=0.0, guidance_scale=4.5, max_sequence_length=8,
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOConfig(**values)


def trainer_step_times(settings: dict, reward, paired=None, callbacks=(), **overrides):
    """Times of ``FlowGRPOTrainer`` optimizer steps (first step excluded) and of ``paired`` run after each."""
    timer = _StepTimer(paired)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = FlowGRPOTrainer(
            _pipeline(settings),
            [reward],
            args=_config(settings, tmp, **overrides),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 8}),
            peft_config=LoraConfig(r=8, lora_alpha=16),
            callbacks=[timer, *callbacks],
        )
        for callback in callbacks:
            callback.trainer = trainer
        trainer.train()
    return timer.times[1:], timer.paired_times[1:]


def decode_step_times(settings: dict) -> tuple[list[float], list[float]]:
    """Step times without and with VAE decoding, from one run whose steps alternate (first pair excluded)."""
    times, _ = trainer_step_times(
        settings, latent_mean, callbacks=[_AlternateDecode()], max_steps=2 * settings["repeats"] + 2
    )
    times = times[1:]  # step 1 was excluded above; drop step 2 to start on a (no decode, decode) pair
    return times[0::2], times[1::2]


def bare_step(settings: dict):
    """The same work as one trainer step, written by hand: encode, sample with the SDE, score the
    latents, then for each trained step a forward with grad, the loss, a backward; one optimizer step."""
    pipe = _pipeline(settings)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=8, lora_alpha=16, target_modules=list(get_flow_adapter(pipe).lora_target_modules))
    )
    adapter = get_flow_adapter(pipe)
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)
    size, steps, batch, group = (
        settings["resolution"],
        settings["sampler_steps"],
        settings["batch"],
        settings["group"],
    )
    prompts = [p for p in PROMPTS[: batch // group] for _ in range(group)]
    generator = torch.Generator().manual_seed(0)

    def step():
        unique = list(dict.fromkeys(prompts))
        rows = torch.tensor([unique.index(p) for p in prompts])
        with torch.no_grad():
            embeddings = adapter.encode_prompts(unique, negative_prompt="", max_sequence_length=8)
            sigmas, timesteps = adapter.set_timesteps(steps, size, size)
            window = sde_window(steps)
            noise = adapter.prepare_latents(len(prompts), size, size, generator)
            rollout = sample_trajectories(
                adapter, embeddings, rows, noise, sigmas, timesteps, sde_steps=window,
                guidance_scale=4.5, noise_level=0.7, generator=generator,
            )  # fmt: skip
            rewards = rollout.final_latents.flatten(1).mean(1)
            advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        transformer.train()
        trained = train_step_indices(window, 1.0)
        for j in trained:
            velocity = adapter.predict_velocity(
                rollout.latents[:, j], timesteps[j], embeddings, rows, guidance_scale=4.5
            )
            out = sde_step_with_logprob(
                velocity, rollout.latents[:, j], sigmas[j], sigmas[j + 1], noise_level=0.7,
                prev_sample=rollout.latents[:, j + 1], sigma_max=sigmas[1],
            )  # fmt: skip
            loss, _ = clipped_policy_loss(
                out.log_prob,
                rollout.log_probs[:, j],
                advantages,
                epsilon_low=1e-4,
                epsilon_high=1e-4,
                adv_clip_max=5.0,
            )
            (loss / len(trained)).backward()
        torch.nn.utils.clip_grad_norm_([p for p in transformer.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        transformer.eval()

    return step


def solace_times(settings: dict) -> dict[str, float]:
    pipe = _pipeline(settings)
    adapter = get_flow_adapter(pipe)
    size, batch, probes = settings["resolution"], settings["batch"], 8
    prompts = [p for p in PROMPTS[: batch // settings["group"]] for _ in range(settings["group"])]
    unique = list(dict.fromkeys(prompts))
    rows = torch.tensor([unique.index(p) for p in prompts])
    embeddings = adapter.encode_prompts(unique, max_sequence_length=8)
    sigmas, _ = adapter.set_timesteps(settings["sampler_steps"], size, size)
    train_sigmas = sigmas[train_step_indices(sde_window(len(sigmas) - 1), 0.6, "suffix")]
    latents = adapter.prepare_latents(batch, size, size, torch.Generator().manual_seed(0))
    chunk = settings["solace_chunk"]

    @torch.no_grad()
    def velocity_fn(x_t, sigma, call_rows):
        return adapter.predict_velocity(
            x_t, adapter.timestep_from_sigma(sigma), embeddings, rows[call_rows], conditional=True
        )

    reward = SolaceReward(num_probes=probes, max_batch_size=chunk)
    group_ids = [i // settings["group"] for i in range(batch)]
    num_rows = probes * len(train_sigmas) * batch
    x = torch.randn(num_rows, *latents.shape[1:])
    sigma_rows = train_sigmas.repeat_interleave(probes * batch)
    call_rows = torch.arange(batch).repeat(probes * len(train_sigmas))

    @torch.no_grad()
    def bare():
        for start in range(0, num_rows, chunk):
            velocity_fn(
                x[start : start + chunk], sigma_rows[start : start + chunk], call_rows[start : start + chunk]
            )

    @torch.no_grad()
    def per_probe_loop():
        for sigma in train_sigmas:
            for _ in range(probes):
                velocity_fn(x[:batch], sigma.expand(batch), torch.arange(batch))

    times = interleaved_times(
        {
            "solace": lambda: reward(
                prompts,
                None,
                latents=latents,
                velocity_fn=velocity_fn,
                train_sigmas=train_sigmas,
                group_ids=group_ids,
            ),
            "bare": bare,
            "loop": per_probe_loop,
        },
        rounds=settings["repeats"],
    )
    return {"rows_per_call": num_rows, **times}


def encode_times(settings: dict) -> dict[str, float]:
    adapter = get_flow_adapter(_pipeline(settings))
    prompts = [p for p in PROMPTS for _ in range(settings["group"])]
    unique = list(dict.fromkeys(prompts))
    return interleaved_times(
        {
            "once_per_prompt": lambda: adapter.encode_prompts(unique, negative_prompt=""),
            "every_image": lambda: adapter.encode_prompts(prompts, negative_prompt=""),
        },
        rounds=settings["repeats"],
    )


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        settings = dict(
            layers=1,
            head_dim=8,
            resolution=32,
            batch=4,
            group=2,
            steps=3,
            sampler_steps=3,
            repeats=2,
            solace_chunk=64,
        )
    else:
        settings = dict(
            layers=4,
            head_dim=32,
            resolution=64,
            batch=8,
            group=4,
            steps=6,
            sampler_steps=6,
            repeats=5,
            solace_chunk=128,
        )

    trainer_times, bare_times = trainer_step_times(settings, latent_mean, paired=bare_step(settings))
    no_decode_times, decode_times = decode_step_times(settings)
    solace = solace_times(settings)
    encode = encode_times(settings)
    med = statistics.median
    no_decode_s, decode_s = med(no_decode_times), med(decode_times)

    def row(name, ours, baseline, goal):
        return {
            "benchmark": name,
            "ours_s": med(ours),
            "baseline_s": med(baseline),
            "ratio": med(ours) / med(baseline),
            "paired_ratio": paired_ratio(ours, baseline),
            "goal": goal,
        }

    rows = [
        row("trainer step vs bare compute", trainer_times, bare_times, "<= 1.15"),
        row("SOLACE vs bare batched forwards", solace["solace"], solace["bare"], "<= 1.05"),
        row("SOLACE batched vs one forward per probe", solace["solace"], solace["loop"], "speed-up"),
        row("encode per prompt vs per image", encode["once_per_prompt"], encode["every_image"], "< 1"),
        row("step without VAE decode vs with", no_decode_times, decode_times, "< 1"),
    ]
    images_per_step = settings["batch"]
    throughput = {
        "images_per_s_latent_only": images_per_step / no_decode_s,
        "images_per_s_with_decode": images_per_step / decode_s,
    }
    result = {
        "quick": args.quick,
        "settings": settings,
        "rows": rows,
        "throughput": throughput,
        "solace": solace,
    }
    markdown = "\n".join(
        [
            "# Flow-GRPO and SOLACE cost" + (" (quick run)" if args.quick else ""),
            "",
            f"Small random SD3 transformer ({settings['layers']} layers, 4 heads × {settings['head_dim']}), "
            f"{settings['resolution']} px, {settings['batch']} images per step (G = {settings['group']}), "
            f"{settings['sampler_steps']} sampler steps, LoRA r = 8; median of {settings['repeats']} repeats "
            f"(trainer: steps 2–{settings['steps']}, each followed by one bare step; decoding: a second run whose steps alternate between decoding and not). Ratio = median ours / median "
            "baseline; paired ratio = median of per-round ratios (variants alternate, so load drift cancels).",
            "",
            *markdown_table(rows, ["benchmark", "ours_s", "baseline_s", "ratio", "paired_ratio", "goal"]),
            "",
            f"Training throughput: {throughput['images_per_s_latent_only']:.3g} images/s with a latent-only reward, "
            f"{throughput['images_per_s_with_decode']:.3g} images/s when the reward needs decoded pixels. "
            f"SOLACE scored {solace['rows_per_call']} probe rows per call.",
        ]
    )
    write_results("flow", result, markdown, args.output_dir)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
