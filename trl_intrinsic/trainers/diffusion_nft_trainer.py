"""DiffusionNFT: online RL on the forward process for flow-matching pipelines, as a ``transformers.Trainer``.

One training cycle, read top to bottom (the maths is in :mod:`trl_intrinsic.flow.nft`):

1. the dataloader yields a generation batch of prompts, each repeated ``num_generations`` times;
2. :meth:`DiffusionNFTTrainer._generate_and_score` first moves the *old* (sampling) policy towards the
   trained one (``θ_old ← η·θ_old + (1 − η)·θ``, η growing with the optimizer steps), then samples clean
   latents with it using the deterministic flow ODE (no likelihoods, no SDE, no CFG by default), scores
   them with the rewards, and maps the per-group advantages to optimality probabilities ``r ∈ [0, 1]``;
3. the batch is split into micro-batches reused for ``num_iterations`` passes;
4. :meth:`training_step` re-noises each clean latent at several of the sampler's noise levels and, at
   each, regresses the implicit positive ``(1 − β)·v_old + β·v_θ`` and negative ``(1 + β)·v_old − β·v_θ``
   policies onto the flow-matching target, weighted by ``r`` and ``1 − r``, plus ``beta`` × a KL term to
   the base model; one backward pass per noise level.

Any reward of the flow reward contract drops in, SOLACE included (it is CFG-free and online, like the
method). Loading, the reward contract, logging, exact resume, saving and the model card are shared with
Flow-GRPO (:class:`~trl_intrinsic.trainers.common.FlowTrainerBase`); the old policy is saved in every
checkpoint (``old_policy.safetensors``) and restored on resume.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch

from trl_intrinsic.ema import ParameterCopy
from trl_intrinsic.flow.nft import (
    forward_noise,
    kl_to_reference,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    sample_nft_timesteps,
)
from trl_intrinsic.flow.rollout import sde_window
from trl_intrinsic.seeding import derived_generator
from trl_intrinsic.trainers.common import FlowTrainerBase, checkpoint_folder
from trl_intrinsic.trainers.diffusion_nft_config import DiffusionNFTConfig
from trl_intrinsic.trainers.grpo_math import combine_rewards

__all__ = ["DiffusionNFTTrainer"]

OLD_POLICY_NAME = "old_policy.safetensors"


class DiffusionNFTTrainer(FlowTrainerBase):
    """DiffusionNFT trainer for diffusers flow-matching pipelines (SD3/SD3.5, FLUX.1, Sana).

    Args:
        model: a diffusers pipeline, or the hub id / local directory of one.
        reward_funcs: flow rewards, as for :class:`~trl_intrinsic.FlowGRPOTrainer` (callables
            ``f(prompts, images, **kwargs)`` or names in :mod:`trl_intrinsic.rewards`).
        args: a :class:`DiffusionNFTConfig`.
        train_dataset / eval_dataset: datasets with a ``prompt`` column.
        peft_config: a ``peft.LoraConfig`` (target modules default to the pipeline adapter's); ``None``
            fine-tunes the whole transformer (the old policy is then a second full copy of its weights).
        callbacks / optimizers: as for ``transformers.Trainer``.
    """

    config_class = DiffusionNFTConfig
    per_row_keys = ("latents", "r", "advantages", "rows")
    _tag_names = ("trl", "trl-intrinsic", "diffusion-nft", "diffusers", "text-to-image")
    _name = "DiffusionNFT"
    _method_summary = "online diffusion RL on the forward process"
    _paper = {  # noqa: RUF012
        "title": "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
        "id": "2509.16117",
        "citation": (
            "@article{zheng2025diffusionnft,\n  title={DiffusionNFT: Online Diffusion Reinforcement with Forward "
            "Process},\n  author={Zheng, Kaiwen and others},\n  journal={arXiv preprint arXiv:2509.16117},\n"
            "  year={2025}\n}"
        ),
    }

    def __init__(self, model, reward_funcs, args: DiffusionNFTConfig | None = None, **kwargs: Any):
        super().__init__(model, reward_funcs, args=args, **kwargs)
        # The old (sampling) policy: a copy of the trainable weights, swapped in for sampling and for v_old.
        self._old = ParameterCopy(self._trainable)

    def _model_card_settings(self) -> str:
        args = self.args
        return (
            f"{args.num_inference_steps} ODE\n  steps; guidance {args.guidance_scale}; NFT β = {args.nft_beta}; "
            f"{args.timesteps_per_image} noise levels per image; KL weight {args.beta}"
        )

    # ------------------------------------------------------------------ the old policy
    def _update_old_policy(self) -> float:
        """``θ_old ← η·θ_old + (1 − η)·θ`` with the decay of the current optimizer step; returns η."""
        args = self.args
        decay = old_policy_decay(
            self.state.global_step,
            flat_steps=args.old_policy_flat_steps,
            rate=args.old_policy_decay_rate,
            max_decay=args.old_policy_max_decay,
        )
        self._old.blend_(decay)
        return decay

    # ------------------------------------------------------------------ rollouts and rewards
    @torch.no_grad()
    def _generate_and_score(self, inputs: list[dict], mode: str) -> dict[str, Any]:
        args, metrics = self.args, self._metrics[mode]
        micro = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size

        # 1. Before a training batch, move the old policy towards the trained one.
        if mode == "train":
            metrics["old_policy/decay"].append(self._update_old_policy())

        # 2. Encode each unique prompt once; the deterministic schedule.
        prompts, rows, embeddings = self._encode(inputs, use_cfg=args.guidance_scale > 1.0)
        steps = args.num_inference_steps if mode == "train" else args.eval_num_inference_steps
        sigmas, timesteps = self.adapter.set_timesteps(steps, args.resolution, args.resolution)

        # 3. Sample clean latents with the ODE: the old policy for training, the trained one for evaluation.
        started = time.perf_counter()
        policy = self._old.swapped() if mode == "train" else contextlib.nullcontext()
        with policy:
            rollouts = self._sample_rollouts(
                mode, rows, embeddings, sigmas, timesteps, sde_window(steps), 0.0, micro
            )
        final = torch.cat([r.latents[:, -1] for r in rollouts])
        metrics["timing/sampling_s"].append(time.perf_counter() - started)

        # 4. Decode images only if a reward, the evaluation or the sample log needs pixels.
        started = time.perf_counter()
        images = self._decode_if_needed(final, mode, micro)
        metrics["timing/decode_s"].append(time.perf_counter() - started)

        # 5. Rewards of every process, group advantages, optimality probabilities.
        all_rewards, all_groups, local = self._score(
            mode, inputs, prompts, images, final, embeddings, rows, sigmas, sigmas[:-1]
        )
        advantages, rewards = combine_rewards(
            all_rewards,
            self.reward_weights.to(all_rewards.device),
            all_groups,
            scale_rewards=args.scale_rewards,
            aggregation=args.multi_objective_aggregation,
        )
        r = optimality_probability(advantages, args.adv_clip_max)
        self._log_rollout_metrics(mode, all_rewards, rewards, all_groups, advantages, prompts, images, local)
        metrics["nft/r_mean"].append(r.mean().item())
        return {
            "latents": final,
            "r": r[local],
            "advantages": advantages[local],
            "rows": rows,
            "embeddings": embeddings,
            "sigmas": sigmas,
        }

    def _rollout_bytes_per_image(self, latent_numel: int) -> int:
        return 4 * (latent_numel + 2) + 8  # float32 clean latent, r and advantage; int64 prompt row

    def _copy_bytes(self) -> int:
        return super()._copy_bytes() + self._old.nbytes()

    # ------------------------------------------------------------------ loss
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Sample (every ``steps_per_generation × num_iterations`` calls), then back-propagate the NFT loss at
        each of ``timesteps_per_image`` noise levels of this micro-batch separately."""
        started = time.perf_counter()
        model.train()
        batch = self._prepare_inputs(inputs)
        args = self.args
        num_levels = args.timesteps_per_image
        # Noise levels and noise of this micro-step: identical after a resume, distinct on every process.
        generator = derived_generator(args.seed, "nft-train", self._step, self.accelerator.process_index)
        t = sample_nft_timesteps(
            len(batch["rows"]),
            generator,
            schedule=args.timestep_schedule,
            sigmas=batch["sigmas"].cpu(),
            k=num_levels,
            shift=args.timestep_shift,
        ).to(self.accelerator.device)
        latents = batch["latents"]

        def level_loss(k: int) -> torch.Tensor:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            return self._noise_level_loss(model, batch, t[:, k], noise)

        total = self._backward_pieces(model, num_levels, level_loss)
        self._metrics["train"]["timing/train_step_s"].append(time.perf_counter() - started)
        self._step += 1
        return total

    def _velocity(
        self, transformer, x_t: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        """Conditional velocity (no CFG) of ``transformer`` at ``x_t`` (B, ...) and noise levels ``t`` (B,)."""
        return self.adapter.predict_velocity(
            x_t,
            self.adapter.timestep_from_sigma(t),
            batch["embeddings"],
            batch["rows"],
            guidance_scale=1.0,
            conditional=True,
            transformer=transformer,
        )

    def _noise_level_loss(
        self, model, batch: dict[str, Any], t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """NFT loss (+ β·KL) of one micro-batch re-noised at levels ``t`` (B,); a scalar."""
        args, metrics = self.args, self._metrics["train"]
        x_t, target = forward_noise(batch["latents"], t, noise)
        with torch.no_grad(), self._old.swapped():
            v_old = self._velocity(self.accelerator.unwrap_model(model), x_t, t, batch)
        v_theta = self._velocity(model, x_t, t, batch)
        loss, stats = nft_loss(
            v_theta,
            v_old,
            target,
            t,
            batch["r"],
            args.nft_beta,
            adaptive_weighting=args.adaptive_weighting,
            adv_clip_max=args.adv_clip_max,
        )
        metrics["policy_loss"].append(loss.item())
        for key in ("positive_loss", "negative_loss", "old_deviation"):
            metrics[f"nft/{key}"].append(stats[key].item())
        if args.beta > 0:
            with torch.no_grad(), self._reference_model() as reference:
                v_ref = self._velocity(reference, x_t, t, batch)
            kl = kl_to_reference(v_theta, v_ref).mean()
            metrics["kl"].append(kl.item())
            loss = loss + args.beta * kl
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        # The old policy is part of the state a resume needs; written before the checkpoint is marked complete.
        if self.accelerator.is_main_process:
            folder = checkpoint_folder(self, trial)
            os.makedirs(folder, exist_ok=True)
            self._old.save(os.path.join(folder, OLD_POLICY_NAME))
        super()._save_checkpoint(model, trial)

    def _restore_from_checkpoint(self, checkpoint: str) -> None:
        super()._restore_from_checkpoint(checkpoint)
        self._old.load(os.path.join(checkpoint, OLD_POLICY_NAME), "old sampling policy of DiffusionNFT")
