"""Flow-GRPO: online RL for flow-matching text-to-image pipelines, as a ``transformers.Trainer``.

One training cycle, read top to bottom:

1. the dataloader yields a *generation batch* of prompts, each repeated ``num_generations`` times
   (TRL's ``RepeatSampler``; a prompt group may span processes);
2. :meth:`FlowGRPOTrainer._generate_and_score` encodes each unique prompt once, samples the
   trajectories with the SDE window (:mod:`trl_intrinsic.flow.rollout`), decodes images only if a
   reward needs pixels, calls the rewards with the flow reward contract, gathers the rewards of all
   processes and turns them into per-group advantages (:mod:`trl_intrinsic.trainers.grpo_math`);
3. the batch is split into micro-batches of ``per_device_train_batch_size`` (the sampling
   micro-batch size, so the transformer sees the same batch shapes when the log-probabilities are
   recomputed) and reused for ``num_iterations`` passes;
4. :meth:`training_step` recomputes each trained step's log-probability, applies the clipped GRPO
   loss plus ``beta`` × the KL to the base model (LoRA adapters disabled), and back-propagates one
   timestep at a time so activation memory stays that of a single forward.

Loading, the flow reward contract, logging, checkpoints with exact resume, saving and the model card are
shared with the other flow trainers (:class:`~trl_intrinsic.trainers.common.FlowTrainerBase`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from trl_intrinsic.flow.rollout import sde_window, train_step_indices
from trl_intrinsic.flow.sde import sde_step_with_logprob
from trl_intrinsic.trainers.common import FlowTrainerBase
from trl_intrinsic.trainers.flow_grpo_config import FlowGRPOConfig
from trl_intrinsic.trainers.grpo_math import (
    clipped_ratio_loss,
    combine_rewards,
    gaussian_mean_kl,
    ratio_norm_log_ratio,
)

__all__ = ["FlowGRPOTrainer"]


class FlowGRPOTrainer(FlowTrainerBase):
    """Flow-GRPO trainer for diffusers flow-matching pipelines (SD3/SD3.5, FLUX.1, Sana).

    Args:
        model: a diffusers pipeline, or the hub id / local directory of one (loaded with safetensors
            weights only, in ``args.model_init_kwargs["torch_dtype"]``, float32 by default).
        reward_funcs: one flow reward or a list of them: callables
            ``f(prompts, images, **kwargs) -> list[float | None]`` (sync or async), or names of rewards in
            :mod:`trl_intrinsic.rewards`. ``kwargs`` carry ``latents`` (B, *latent_shape), ``velocity_fn``,
            ``reference_velocity_fn``, ``sigmas`` (S+1,), ``train_sigmas``, ``group_ids``,
            ``trainer_state`` and every dataset column. A reward with ``requires_images = False`` receives
            ``images=None``; when no reward needs pixels the VAE never decodes during training.
        args: a :class:`FlowGRPOConfig`.
        train_dataset: a dataset with a ``prompt`` column; every other column reaches the rewards.
        eval_dataset: the same, sampled deterministically at ``eval_num_inference_steps`` by ``evaluate()``.
        peft_config: a ``peft.LoraConfig`` for the transformer (its ``target_modules`` default to the
            pipeline adapter's); ``None`` fine-tunes the whole transformer.
        callbacks: ``transformers.TrainerCallback`` instances, as for ``transformers.Trainer``.
        optimizers: ``(optimizer, lr_scheduler)``, as for ``transformers.Trainer``.
    """

    config_class = FlowGRPOConfig
    per_row_keys = ("latents", "log_probs", "advantages", "rows", "means", "uncond")
    _tag_names = ("trl", "trl-intrinsic", "flow-grpo", "diffusers", "text-to-image")
    _name = "Flow-GRPO"
    _method_summary = "online RL for flow-matching models"
    _paper = {  # noqa: RUF012
        "title": "Flow-GRPO: Training Flow Matching Models via Online RL",
        "id": "2505.05470",
        "citation": (
            "@article{liu2025flowgrpo,\n  title={Flow-GRPO: Training Flow Matching Models via Online RL},\n"
            "  author={Liu, Jie and others},\n  journal={arXiv preprint arXiv:2505.05470},\n  year={2025}\n}"
        ),
    }

    def __init__(self, model, reward_funcs, args: FlowGRPOConfig | None = None, **kwargs: Any):
        if args is not None and isinstance(args, FlowGRPOConfig) and args.noise_level <= 0:
            raise ValueError(
                "`noise_level` must be > 0 for training: with 0 every step is deterministic and has no "
                "log-probability to optimise."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)

    def _model_card_settings(self) -> str:
        args = self.args
        return (
            f"{args.num_inference_steps} sampler\n  steps; noise level {args.noise_level} ({args.sde_type}); "
            f"guidance {args.guidance_scale}; β = {args.beta}"
        )

    def _rollout_bytes_per_image(self, latent_numel: int) -> int:
        args, steps = self.args, self.args.num_inference_steps
        window = args.sde_window_size or steps - 1
        trained = max(1, math.ceil(args.timestep_fraction * window - 1e-9))
        latents = steps + 1 + (steps if args.grpo_guard else 0) + (trained if self._caches_uncond else 0)
        return 4 * (latents * latent_numel + steps + 1) + 8  # float32 latents (+ step means, + uncond
        # velocities), log-probs and advantage; int64 prompt row

    # ------------------------------------------------------------------ rollouts and rewards
    @torch.no_grad()
    def _generate_and_score(self, inputs: list[dict], mode: str) -> dict[str, Any]:
        args, metrics = self.args, self._metrics[mode]
        micro = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size

        # 1. Encode each unique prompt once (with the negative prompt under CFG).
        prompts, rows, embeddings = self._encode(inputs, use_cfg=args.guidance_scale > 1.0)

        # 2. The schedule, the SDE window (training only: evaluation samples are deterministic), trained steps.
        steps = args.num_inference_steps if mode == "train" else args.eval_num_inference_steps
        sigmas, timesteps = self.adapter.set_timesteps(steps, args.resolution, args.resolution)
        if mode == "train":
            window = sde_window(
                steps,
                window_size=args.sde_window_size,
                window_range=args.sde_window_range,
                generator=self._generator("window"),
            )
            noise_level = args.noise_level
        else:
            window, noise_level = sde_window(steps), 0.0
        train_steps = train_step_indices(window, args.timestep_fraction, args.timestep_selection)

        # 3. Sample the trajectories, micro-batch by micro-batch.
        started = time.perf_counter()
        guard = args.grpo_guard and mode == "train"
        cached = train_steps if mode == "train" and self._caches_uncond else ()
        rollouts = self._sample_rollouts(
            mode, rows, embeddings, sigmas, timesteps, window, noise_level, micro, args.sde_type, guard, cached
        )
        latents = torch.cat([r.latents for r in rollouts])
        log_probs = torch.cat([r.log_probs for r in rollouts])
        final = latents[:, -1]
        metrics["timing/sampling_s"].append(time.perf_counter() - started)

        # 4. Decode images only if a reward, the evaluation or the sample log needs pixels.
        started = time.perf_counter()
        images = self._decode_if_needed(final, mode, micro)
        metrics["timing/decode_s"].append(time.perf_counter() - started)

        # 5. Rewards of every process, then per-group advantages over the gathered batch.
        all_rewards, all_groups, local = self._score(
            mode, inputs, prompts, images, final, embeddings, rows, sigmas, sigmas[train_steps]
        )
        advantages, rewards = combine_rewards(
            all_rewards,
            self.reward_weights.to(all_rewards.device),
            all_groups,
            scale_rewards=args.scale_rewards,
            aggregation=args.multi_objective_aggregation,
        )
        self._log_rollout_metrics(mode, all_rewards, rewards, all_groups, advantages, prompts, images, local)
        batch = {
            "latents": latents,
            "log_probs": log_probs,
            "advantages": advantages[local],
            "rows": rows,
            "embeddings": embeddings,
            "sigmas": sigmas,
            "timesteps": timesteps,
            "train_steps": list(train_steps),
        }
        if guard:  # the sampling policy's step means, for GRPO-Guard's normalised ratio
            batch["means"] = torch.cat([r.means for r in rollouts])
        if cached:  # the unconditional velocities at the trained steps, valid until the next optimizer step
            batch["uncond"] = torch.cat([r.uncond for r in rollouts])
            batch["sampled_at"] = self.state.global_step
        return batch

    # ------------------------------------------------------------------ loss
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Sample (every ``steps_per_generation × num_iterations`` calls), then back-propagate the GRPO loss of
        each trained timestep of this micro-batch separately."""
        started = time.perf_counter()
        model.train()
        batch = self._prepare_inputs(inputs)
        train_steps = batch["train_steps"]
        total = self._backward_pieces(
            model, len(train_steps), lambda k: self._timestep_loss(model, batch, train_steps[k])
        )
        self._metrics["train"]["timing/train_step_s"].append(time.perf_counter() - started)
        self._step += 1
        return total

    @property
    def _caches_uncond(self) -> bool:
        """Whether rollouts keep the unconditional velocity of the trained steps: with guidance and a detached
        unconditional half, training on unchanged weights reuses it instead of running that half again."""
        return self.args.guidance_scale > 1.0 and not self.args.cfg_uncond_gradient

    def _replay_step(self, transformer, batch: dict[str, Any], j: int, uncond_velocity=None):
        """Re-evaluate stored transition ``j`` (x_j → x_{j+1}) of a micro-batch under ``transformer``;
        ``uncond_velocity`` (B, ...) is a known unconditional prediction of ``transformer`` at x_j."""
        args, sigmas = self.args, batch["sigmas"]
        x = batch["latents"][:, j]
        velocity = self.adapter.predict_velocity(
            x,
            batch["timesteps"][j],
            batch["embeddings"],
            batch["rows"],
            guidance_scale=args.guidance_scale,
            transformer=transformer,
            detach_uncond=not args.cfg_uncond_gradient and torch.is_grad_enabled(),
            uncond_velocity=uncond_velocity,
        )
        return sde_step_with_logprob(
            velocity,
            x,
            sigmas[j],
            sigmas[j + 1],
            noise_level=args.noise_level,
            prev_sample=batch["latents"][:, j + 1],
            sde_type=args.sde_type,
            sigma_max=sigmas[1],
        )

    def _timestep_loss(self, model, batch: dict[str, Any], j: int) -> torch.Tensor:
        """Clipped GRPO loss (+ β·KL) of sampler step ``j`` for one micro-batch; a scalar."""
        args, metrics = self.args, self._metrics["train"]
        # The sampled unconditional velocity is exact while no optimizer step has changed the weights.
        fresh = "uncond" in batch and batch["sampled_at"] == self.state.global_step
        cached = batch["uncond"][:, batch["train_steps"].index(j)] if fresh else None
        step, old_log_prob = self._replay_step(model, batch, j, cached), batch["log_probs"][:, j]
        log_ratio = step.log_prob - old_log_prob
        if args.grpo_guard:  # RatioNorm: an unbiased ratio whose spread does not depend on the timestep
            old_mean = batch["means"][:, j]
            log_ratio = ratio_norm_log_ratio(
                step.log_prob, old_log_prob, step.prev_sample_mean, old_mean, step.noise_std
            )
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        loss, stats = clipped_ratio_loss(
            log_ratio,
            batch["advantages"],
            epsilon_low=args.epsilon,
            epsilon_high=epsilon_high,
            adv_clip_max=args.adv_clip_max,
        )
        if args.grpo_guard:  # gradient reweighting: divide by the step size |dt| (GRPO-Guard, Flow-GRPO form)
            loss = loss / (batch["sigmas"][j] - batch["sigmas"][j + 1])
        metrics["policy_loss"].append(loss.item())
        metrics["clip_ratio"].append(stats["clipped"].float().mean().item())
        metrics["ratio"].append(stats["ratio"].mean().item())
        metrics["approx_kl"].append(0.5 * (step.log_prob.detach() - old_log_prob).pow(2).mean().item())
        if args.beta > 0:
            with torch.no_grad(), self._reference_model() as reference:
                ref_mean = self._replay_step(reference, batch, j).prev_sample_mean
            kl = gaussian_mean_kl(step.prev_sample_mean, ref_mean, step.std_dev).mean()
            metrics["kl"].append(kl.item())
            loss = loss + args.beta * kl
        return loss
