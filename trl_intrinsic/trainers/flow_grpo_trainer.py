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
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather
from datasets import Dataset, IterableDataset
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from trl_intrinsic.flow import diagnostics
from trl_intrinsic.flow.pipelines import FlowPipelineAdapter, PromptEmbeddings, get_flow_adapter
from trl_intrinsic.flow.rollout import Rollout, sample_trajectories, sde_window, train_step_indices
from trl_intrinsic.flow.sde import sde_step_with_logprob
from trl_intrinsic.trainers.flow_grpo_config import FlowGRPOConfig
from trl_intrinsic.trainers.grpo_math import clipped_policy_loss, combine_rewards, gaussian_mean_kl

logger = logging.get_logger(__name__)

RewardFunc = Callable[..., list]
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"
TRAINER_STATE_NAME = (
    "trainer_state.json"  # written last by `Trainer._save_checkpoint`: marks a complete checkpoint
)
ROLLOUT_BUFFER_NAME = "rollout_buffer_{rank}.safetensors"
COLLAPSE_REFERENCE_NAME = "collapse_reference.json"

# Keys of a generation batch that hold one entry per image (split into micro-batches); the others are
# shared by the whole batch.
_PER_ROW_KEYS = ("latents", "log_probs", "advantages", "rows")


class FlowGRPOTrainer(_BaseTrainer):
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

    _tag_names = ("trl", "trl-intrinsic", "flow-grpo", "diffusers", "text-to-image")
    _name = "Flow-GRPO"
    _paper = {  # noqa: RUF012
        "title": "Flow-GRPO: Training Flow Matching Models via Online RL",
        "id": "2505.05470",
        "citation": (
            "@article{liu2025flowgrpo,\n  title={Flow-GRPO: Training Flow Matching Models via Online RL},\n"
            "  author={Liu, Jie and others},\n  journal={arXiv preprint arXiv:2505.05470},\n  year={2025}\n}"
        ),
    }

    def __init__(
        self,
        model: str | DiffusionPipeline,
        reward_funcs: RewardFunc | str | list[RewardFunc | str],
        args: FlowGRPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: Any | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = FlowGRPOConfig(f"{str(name).split('/')[-1]}-Flow-GRPO")
        if not isinstance(args, FlowGRPOConfig):
            raise TypeError(f"`args` must be a FlowGRPOConfig, got {type(args).__name__}.")
        if args.noise_level <= 0:
            raise ValueError(
                "`noise_level` must be > 0 for training: with 0 every step is deterministic and has no "
                "log-probability to optimise."
            )
        self.pipeline = self._load_pipeline(model, args)
        self.adapter: FlowPipelineAdapter = get_flow_adapter(self.pipeline)
        self.reward_funcs, self.reward_func_names = self._resolve_rewards(reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(args.reward_weights)} entries but there are {len(self.reward_funcs)} "
                "reward functions; give one weight per reward."
            )
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.requires_images = any(getattr(f, "requires_images", True) for f in self.reward_funcs)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            columns = getattr(dataset, "column_names", None)
            if columns is not None and "prompt" not in columns:
                raise ValueError(
                    f"`{name}` has no 'prompt' column (columns: {columns}); rename the prompt column to 'prompt' "
                    "or load it with `trl_intrinsic.data.load_prompt_dataset`."
                )

        if (
            eval_dataset is not None
            and (args.per_device_eval_batch_size * args.world_size) % args.num_generations
        ):
            raise ValueError(
                f"The global eval batch ({args.per_device_eval_batch_size} per device × {args.world_size} processes) "
                f"must hold whole groups of num_generations={args.num_generations}; set `per_device_eval_batch_size` "
                "to a multiple of num_generations / num_processes."
            )
        # LoRA matrices are initialised randomly: seed first so that a run is reproducible from `args.seed`.
        set_seed(args.seed)
        transformer = self._prepare_transformer(self.pipeline, args, peft_config)
        self.num_generations = args.num_generations
        self.num_iterations = args.num_iterations
        self.shuffle_dataset = args.shuffle_dataset

        super().__init__(
            model=transformer,
            args=args,
            data_collator=lambda features: features,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False
        self.pipeline.to(self.accelerator.device)
        if self.ref_transformer is not None:
            self.ref_transformer.to(self.accelerator.device)
        self._step = 0
        self._eval_batches = 0  # batches sampled by the current `evaluate()` call
        self._buffered_inputs: list[dict] | None = None
        self._resume_checkpoint: str | None = None
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._logged_samples: dict[str, list] = {"prompt": [], "image": [], "reward": []}
        self._async_loop: asyncio.AbstractEventLoop | None = None
        # Latent texture of the first training rollout, the yardstick of `collapse/texture_ratio`.
        self._collapse_reference: float | None = None
        self._collapse_warned = False

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _load_pipeline(model: str | DiffusionPipeline, args: FlowGRPOConfig) -> DiffusionPipeline:
        if isinstance(model, DiffusionPipeline):
            return model
        if not isinstance(model, str | os.PathLike):
            raise TypeError(
                f"`model` must be a DiffusionPipeline, a hub id or a local path, got {type(model).__name__}."
            )
        kwargs = dict(args.model_init_kwargs or {})
        dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        kwargs.setdefault("trust_remote_code", False)
        # Components saved as absent (e.g. SD3 without T5: `[null, null]` in model_index.json) must be
        # passed as None explicitly, or diffusers refuses to load the pipeline.
        index = DiffusionPipeline.load_config(str(model))
        for name, entry in index.items():
            if (
                isinstance(entry, list | tuple)
                and len(entry) == 2
                and entry[0] is None
                and name not in kwargs
            ):
                kwargs[name] = None
        return DiffusionPipeline.from_pretrained(
            str(model),
            dtype=dtype if dtype not in (None, "auto") else torch.float32,
            use_safetensors=True,
            **kwargs,
        )

    def _prepare_transformer(
        self, pipeline: DiffusionPipeline, args: FlowGRPOConfig, peft_config
    ) -> torch.nn.Module:
        """Freeze every component, then make LoRA adapters (or the whole transformer) trainable."""
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()
        transformer = pipeline.transformer
        self.ref_transformer = None
        if peft_config is not None:
            peft_config = copy.deepcopy(peft_config)
            if not peft_config.target_modules:
                peft_config.target_modules = list(self.adapter.lora_target_modules)
            if getattr(peft_config, "lora_dropout", 0.0) > 0:
                logger.warning(
                    f"LoRA dropout {peft_config.lora_dropout} makes the trained policy differ from the one that "
                    "sampled the rollouts (rollouts are sampled without dropout), so importance ratios are not 1 "
                    "on-policy and updates get clipped; set `lora_dropout=0` (TRL's ModelConfig defaults to 0.05)."
                )
            transformer.add_adapter(peft_config)
            for param in transformer.parameters():
                if param.requires_grad:
                    param.data = param.data.float()  # LoRA weights train in fp32 whatever the base dtype
            self.use_lora = True
        else:
            transformer.requires_grad_(True)
            self.use_lora = False
            if args.beta > 0:
                self.ref_transformer = copy.deepcopy(transformer).requires_grad_(False).eval()
        if args.activation_checkpointing:
            # diffusers models have their own switch; Trainer's would look for a transformers method.
            transformer.enable_gradient_checkpointing()
            args.activation_checkpointing = args.gradient_checkpointing = False
        return transformer

    @staticmethod
    def _resolve_rewards(reward_funcs) -> tuple[list[RewardFunc], list[str]]:
        funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty; pass at least one reward function.")
        resolved, names = [], []
        for func in funcs:
            if isinstance(func, str):
                from trl_intrinsic.rewards import reward_by_name

                func = reward_by_name(func)
            if isinstance(func, torch.nn.Module) or not callable(func):
                raise TypeError(
                    f"Flow rewards must be plain callables `f(prompts, images, **kwargs)`, got {type(func).__name__}; "
                    "wrap a scoring model in a function or a class with `__call__`."
                )
            resolved.append(func)
            names.append(getattr(func, "__name__", type(func).__name__))
        return resolved, names

    def _send_telemetry(self):
        # TRL's telemetry reads `model.config.model_type`, which diffusers models do not have.
        return

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self):
        # The dataloader yields whole generation batches (per_device_train_batch_size × steps_per_generation).
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        return EpochRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(
            data_source=eval_dataset, mini_repeat_count=self.num_generations, seed=self.args.seed
        )

    def _prepare_inputs(self, generation_batch: list[dict]) -> dict[str, Any]:
        if not self.model.training:
            return self._generate_and_score(generation_batch, mode="eval")
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._resume_checkpoint is not None:
            self._restore_rollout_buffer(self._resume_checkpoint)
            self._resume_checkpoint = None
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score(generation_batch, mode="train")
            self._buffered_inputs = self._split(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    @staticmethod
    def _split(batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
        size = len(batch["rows"]) // num_chunks
        return [
            {k: (v[i * size : (i + 1) * size] if k in _PER_ROW_KEYS else v) for k, v in batch.items()}
            for i in range(num_chunks)
        ]

    # ------------------------------------------------------------------ rollouts and rewards
    def _rng(self, *salt: int, step: int | None = None) -> torch.Generator:
        """A generator determined by (seed, ``step`` (default: the global step), *salt): identical across
        resumes."""
        seed = self.args.seed
        for value in (self.state.global_step if step is None else step, *salt):
            seed = (seed * 1_000_003 + int(value)) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``Trainer.evaluate``. Evaluation samples start from the same noise on every call, whatever the
        training step, so successive evaluations compare models, not noise draws."""
        self._eval_batches = 0
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    @torch.no_grad()
    def _generate_and_score(self, inputs: list[dict], mode: str) -> dict[str, Any]:
        args, device = self.args, self.accelerator.device
        prompts = [example["prompt"] for example in inputs]
        unique = list(dict.fromkeys(prompts))
        rows = torch.tensor([unique.index(p) for p in prompts], device=device)
        use_cfg = args.guidance_scale > 1.0
        embeddings = self.adapter.encode_prompts(
            unique,
            negative_prompt=args.negative_prompt if use_cfg else None,
            max_sequence_length=args.max_sequence_length,
        )
        steps = args.num_inference_steps if mode == "train" else args.eval_num_inference_steps
        sigmas, timesteps = self.adapter.set_timesteps(steps, args.resolution, args.resolution)
        if mode == "train":
            window = sde_window(
                steps,
                window_size=args.sde_window_size,
                window_range=args.sde_window_range,
                generator=self._rng(-1),
            )
            noise_level = args.noise_level
        else:  # evaluation samples are deterministic
            window, noise_level = sde_window(steps), 0.0
        train_steps = train_step_indices(window, args.timestep_fraction, args.timestep_selection)

        # One generator per sample, seeded by (seed, step, global position): the noise of a sample does not
        # depend on how the batch is split across processes and micro-batches, and resumes reproduce it. With
        # `same_latent` the initial noise comes from a generator per prompt group (groups may span processes).
        offset = self.accelerator.process_index * len(prompts)
        same_latent = args.same_latent and mode == "train"
        if mode == "eval":  # seeded by the batch's place in the evaluation, not by the training step
            batch_index, self._eval_batches = self._eval_batches, self._eval_batches + 1
        timing, started = self._metrics[mode], time.perf_counter()
        micro = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), micro):
            chunk = rows[start : start + micro]
            positions = range(offset + start, offset + start + len(chunk))
            if mode == "eval":
                generator = [self._rng(-3, batch_index, p, step=0) for p in positions]
            else:
                generator = [self._rng(p, 0) for p in positions]
            if same_latent:
                groups = [self._rng(-2, p // self.num_generations) for p in positions]
                noise = self.adapter.prepare_latents(len(chunk), args.resolution, args.resolution, groups)
            else:
                noise = self.adapter.prepare_latents(len(chunk), args.resolution, args.resolution, generator)
            rollouts.append(
                sample_trajectories(
                    self.adapter,
                    embeddings,
                    chunk,
                    noise,
                    sigmas,
                    timesteps,
                    sde_steps=window,
                    guidance_scale=args.guidance_scale,
                    noise_level=noise_level,
                    sde_type=args.sde_type,
                    generator=generator,
                    transformer=transformer,
                )
            )
        transformer.train(was_training)
        latents = torch.cat([r.latents for r in rollouts])
        log_probs = torch.cat([r.log_probs for r in rollouts])
        final = latents[:, -1]
        timing["timing/sampling_s"].append(time.perf_counter() - started)

        started = time.perf_counter()
        images = None
        if self.requires_images or (mode == "eval" or args.log_completions):
            images = []
            for start in range(0, len(prompts), micro):
                images += self.adapter.decode(final[start : start + micro], args.resolution, args.resolution)

        timing["timing/decode_s"].append(time.perf_counter() - started)

        # Global position of each local row in the gathered batch; consecutive runs of G share a prompt.
        started = time.perf_counter()
        n = len(prompts)
        group_ids = (torch.arange(n, device=device) + offset) // self.num_generations
        rewards_per_func = self._calculate_rewards(
            inputs, prompts, images, final, embeddings, rows, sigmas, sigmas[train_steps], group_ids
        )
        all_rewards = gather(rewards_per_func)
        all_groups = gather(group_ids)
        timing["timing/rewards_s"].append(time.perf_counter() - started)
        self._log_collapse_statistics(mode, final, images, all_groups)
        advantages, rewards = combine_rewards(
            all_rewards,
            self.reward_weights.to(device),
            all_groups,
            scale_rewards=args.scale_rewards,
            aggregation=args.multi_objective_aggregation,
        )
        local = slice(offset, offset + n)
        self._log_rollout_metrics(mode, all_rewards, rewards, all_groups, advantages, prompts, images, local)
        return {
            "latents": latents,
            "log_probs": log_probs,
            "advantages": advantages[local],
            "rows": rows,
            "embeddings": embeddings,
            "sigmas": sigmas,
            "timesteps": timesteps,
            "train_steps": train_steps,
        }

    def _velocity_fn(self, embeddings: PromptEmbeddings, rows: torch.Tensor, reference: bool = False):
        """The flow reward contract's ``velocity_fn`` (current policy) or ``reference_velocity_fn``."""

        @torch.no_grad()
        def velocity_fn(x_t: torch.Tensor, sigma: torch.Tensor, call_rows: torch.Tensor) -> torch.Tensor:
            """Conditional velocity (N, *latent_shape) at ``x_t`` (N, ...), ``sigma`` (N,) ∈ [0, 1]; row i is
            conditioned on the prompt of image ``call_rows[i]`` of the reward call. No guidance, no grad."""
            sigma = torch.as_tensor(sigma, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
            call_rows = torch.as_tensor(call_rows, device=rows.device, dtype=torch.long)
            with self._reference_model() if reference else contextlib.nullcontext() as module:
                module = module or self.accelerator.unwrap_model(self.model)
                return self.adapter.predict_velocity(
                    x_t,
                    self.adapter.timestep_from_sigma(sigma),
                    embeddings,
                    rows[call_rows],
                    guidance_scale=self.args.guidance_scale,
                    conditional=True,
                    transformer=module,
                )

        return velocity_fn

    @contextlib.contextmanager
    def _reference_model(self):
        """Yield the frozen base transformer: the policy with its LoRA adapters disabled, or a frozen copy."""
        if self.ref_transformer is not None:
            yield self.ref_transformer
            return
        transformer = self.accelerator.unwrap_model(self.model)
        if not self.use_lora:  # full fine-tuning with beta = 0: the reference is the initial policy
            raise ValueError("No reference model: full fine-tuning keeps a frozen copy only when `beta > 0`.")
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    def _calculate_rewards(
        self, inputs, prompts, images, latents, embeddings, rows, sigmas, train_sigmas, group_ids
    ) -> torch.Tensor:
        """Call every reward on the local batch; returns (B, num_rewards) float32, NaN where a reward gave None."""
        device = self.accelerator.device
        columns = {key: [example[key] for example in inputs] for key in inputs[0] if key != "prompt"}
        kwargs = {
            **columns,
            "latents": latents,
            "velocity_fn": self._velocity_fn(embeddings, rows),
            "reference_velocity_fn": self._velocity_fn(embeddings, rows, reference=True),
            "sigmas": sigmas,
            "train_sigmas": train_sigmas,
            "group_ids": group_ids.tolist(),
            "trainer_state": self.state,
        }
        outputs: dict[int, Any] = {}
        pending = {}
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)):
            needs_images = getattr(func, "requires_images", True)
            try:
                result = func(prompts=prompts, images=images if needs_images else None, **kwargs)
            except Exception as error:
                raise RuntimeError(
                    f"Reward function '{name}' raised {type(error).__name__} at global step "
                    f"{self.state.global_step} on a batch of {len(prompts)} prompts (first: {prompts[0]!r})."
                ) from error
            if inspect.isawaitable(result):
                pending[i] = result
            else:
                outputs[i] = result
        if pending:
            for i, result in zip(pending, self._run_async(list(pending.values())), strict=True):
                outputs[i] = result
        rewards = torch.empty(len(prompts), len(self.reward_funcs), dtype=torch.float32)
        for i, name in enumerate(self.reward_func_names):
            values = outputs[i]
            if isinstance(values, torch.Tensor):
                values = values.tolist()
            if len(values) != len(prompts):
                raise ValueError(
                    f"Reward function '{name}' returned {len(values)} rewards for a batch of {len(prompts)} images "
                    f"at global step {self.state.global_step}; return exactly one value (or None) per image."
                )
            column = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
            if torch.isinf(column).any():
                raise ValueError(
                    f"Reward function '{name}' returned an infinite reward at global step {self.state.global_step} "
                    f"(prompt {prompts[int(torch.isinf(column).nonzero()[0])]!r}); return None to skip a sample."
                )
            rewards[:, i] = column
        if torch.isnan(rewards).all(dim=1).any():
            logger.warning("Every reward function returned None for some samples; they get a zero advantage.")
        return rewards.to(device)

    def _run_async(self, awaitables: list) -> list:
        """Await the async rewards concurrently on a private event loop thread."""
        if self._async_loop is None:
            self._async_loop = asyncio.new_event_loop()
            threading.Thread(target=self._async_loop.run_forever, daemon=True).start()

        async def _gather():
            return await asyncio.gather(*awaitables)

        return asyncio.run_coroutine_threadsafe(_gather(), self._async_loop).result()

    def _log_rollout_metrics(
        self, mode, rewards_per_func, rewards, group_ids, advantages, prompts, images, local
    ):
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            valid = column[~torch.isnan(column)]
            metrics[f"rewards/{name}/mean"].append(valid.mean().item() if valid.numel() else math.nan)
            metrics[f"rewards/{name}/std"].append(
                valid.std(unbiased=False).item() if valid.numel() else math.nan
            )
        valid = rewards[~torch.isnan(rewards)]
        metrics["reward"].append(valid.mean().item() if valid.numel() else math.nan)
        metrics["reward_std"].append(valid.std(unbiased=False).item() if valid.numel() > 1 else 0.0)
        _, inverse = torch.unique(group_ids, return_inverse=True)
        zero_std = [
            bool(torch.nan_to_num(rewards[inverse == g]).std(unbiased=False) < 1e-8)
            for g in range(int(inverse.max()) + 1)
        ]
        metrics["frac_reward_zero_std"].append(sum(zero_std) / len(zero_std))
        metrics["advantages/abs_mean"].append(advantages.abs().mean().item())
        if images is not None and self.args.log_completions:
            self._logged_samples = {
                "prompt": prompts,
                "image": images,
                "reward": rewards[local].tolist(),
            }

    def _log_collapse_statistics(
        self, mode: str, final: torch.Tensor, images, all_groups: torch.Tensor
    ) -> None:
        """Log `collapse/*` (see `trl_intrinsic.flow.diagnostics`) over the whole gathered batch, and warn
        once when training drifts towards textureless or blank images."""
        metrics, args = self._metrics[mode], self.args
        stats = diagnostics.latent_statistics(final)
        texture = gather(stats["texture"]).mean().item()
        metrics["collapse/latent_std"].append(gather(stats["std"]).mean().item())
        metrics["collapse/latent_texture"].append(texture)
        pooled = gather(diagnostics.pooled(final))
        metrics["collapse/group_diversity"].append(diagnostics.group_diversity(pooled, all_groups).item())
        blank = None
        if images is not None:
            pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
            pixel_std = gather(
                diagnostics.image_std(pixels.permute(0, 3, 1, 2).float().div(255)).to(final.device)
            )
            blank = (pixel_std < diagnostics.BLANK_IMAGE_STD).float().mean().item()
            metrics["collapse/image_std"].append(pixel_std.mean().item())
            metrics["collapse/blank_fraction"].append(blank)
        if mode != "train":
            return
        if self._collapse_reference is None:
            self._collapse_reference = texture
        ratio = texture / max(self._collapse_reference, 1e-12)
        metrics["collapse/texture_ratio"].append(ratio)
        collapsing = ratio < args.collapse_warning_ratio or (blank is not None and blank > 0.5)
        if collapsing and args.collapse_warning_ratio > 0 and not self._collapse_warned:
            logger.warning(
                f"Step {self.state.global_step}: the samples are losing texture (latent texture at {ratio:.2f}× its "
                f"first value{'' if blank is None else f', {blank:.0%} blank images'}), the known collapse of "
                "intrinsic rewards such as SOLACE. Train fewer timesteps (`timestep_fraction` ≤ 0.6 with "
                "`timestep_selection='suffix'`), keep CFG in rollouts (`guidance_scale` > 1), raise `beta`, or mix "
                "in an external reward."
            )
        self._collapse_warned = collapsing

    # ------------------------------------------------------------------ loss
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Sample (every ``steps_per_generation × num_iterations`` calls), then back-propagate the GRPO loss of
        each trained timestep of this micro-batch separately."""
        started = time.perf_counter()
        model.train()
        batch = self._prepare_inputs(inputs)
        train_steps = batch["train_steps"]
        scale = 1.0 / (len(train_steps) * self.current_gradient_accumulation_steps)
        total = torch.zeros((), device=self.accelerator.device)
        deepspeed_loss = None
        for k, j in enumerate(train_steps):
            with self.compute_loss_context_manager():
                loss = self._timestep_loss(model, batch, j) * scale
            if self.is_deepspeed_enabled:  # the engine expects a single backward per micro-batch
                deepspeed_loss = loss if deepspeed_loss is None else deepspeed_loss + loss
            else:
                last = k == len(train_steps) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    self.accelerator.backward(loss)
            total += loss.detach()
        if deepspeed_loss is not None:
            self.accelerator.backward(deepspeed_loss, scale_wrt_gas=False)
        self._metrics["train"]["timing/train_step_s"].append(time.perf_counter() - started)
        self._step += 1
        return total

    def _replay_step(self, transformer, batch: dict[str, Any], j: int):
        """Re-evaluate stored transition ``j`` (x_j → x_{j+1}) of a micro-batch under ``transformer``."""
        args, sigmas = self.args, batch["sigmas"]
        x = batch["latents"][:, j]
        velocity = self.adapter.predict_velocity(
            x,
            batch["timesteps"][j],
            batch["embeddings"],
            batch["rows"],
            guidance_scale=args.guidance_scale,
            transformer=transformer,
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
        args = self.args
        step = self._replay_step(model, batch, j)
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        loss, stats = clipped_policy_loss(
            step.log_prob,
            batch["log_probs"][:, j],
            batch["advantages"],
            epsilon_low=args.epsilon,
            epsilon_high=epsilon_high,
            adv_clip_max=args.adv_clip_max,
        )
        metrics = self._metrics["train"]
        metrics["policy_loss"].append(loss.item())
        metrics["clip_ratio"].append(stats["clipped"].float().mean().item())
        metrics["ratio"].append(stats["ratio"].mean().item())
        metrics["approx_kl"].append(
            0.5 * (step.log_prob.detach() - batch["log_probs"][:, j]).pow(2).mean().item()
        )
        if args.beta > 0:
            with torch.no_grad(), self._reference_model() as reference:
                ref_mean = self._replay_step(reference, batch, j).prev_sample_mean
            kl = gaussian_mean_kl(step.prev_sample_mean, ref_mean, step.std_dev).mean()
            metrics["kl"].append(kl.item())
            loss = loss + args.beta * kl
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self._prepare_inputs(inputs) if isinstance(inputs, list) else inputs
        losses = [self._timestep_loss(model, batch, j) for j in batch["train_steps"]]
        return torch.stack(losses).mean()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._prepare_inputs(inputs)  # samples deterministically and records the eval rewards
        return None, None, None

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if self.args.log_completions and self._logged_samples["image"] and self.accelerator.is_main_process:
            self._log_images()

    def _log_images(self) -> None:
        """Save the last rollout's image grid (one row per prompt group) and completions table under
        ``output_dir/samples/``, and send both to wandb / trackio when they are in ``report_to``."""
        import pandas as pd

        samples, step = self._logged_samples, self.state.global_step
        directory = Path(self.args.output_dir) / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        image_grid(samples["image"], columns=self.num_generations).save(directory / f"step_{step:06d}.png")
        table = pd.DataFrame({"step": step, "prompt": samples["prompt"], "reward": samples["reward"]})
        table.to_parquet(directory / f"completions_{step:06d}.parquet")
        backends = []
        if "wandb" in (self.args.report_to or []):
            import wandb

            if wandb.run is not None:
                backends.append(wandb)
        if "trackio" in (self.args.report_to or []):
            import trackio

            backends.append(trackio)
        for backend in backends:
            images = [backend.Image(image) for image in samples["image"]]
            backend.log({"completions": backend.Table(dataframe=table.assign(image=images))})
        self._logged_samples = {"prompt": [], "image": [], "reward": []}

    # ------------------------------------------------------------------ saving and loading
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint of
        ``output_dir`` (a run killed while saving leaves a newer, incomplete one behind)."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            self._resume_checkpoint = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        # Rollouts sampled before this step and not yet consumed (steps_per_generation or num_iterations > 1)
        # are saved per process, before `Trainer` writes the trainer state that marks the checkpoint complete.
        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._buffered_inputs is not None and self._step % generate_every != 0:
            os.makedirs(folder, exist_ok=True)
            name = ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index)
            tensors = _flatten_rollouts(self._buffered_inputs)
            metadata = {"step": str(self._step), "num_processes": str(self.accelerator.num_processes)}
            save_file(tensors, os.path.join(folder, name), metadata=metadata)
        if self._collapse_reference is not None and self.accelerator.is_main_process:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, COLLAPSE_REFERENCE_NAME), "w") as f:
                json.dump({"latent_texture": self._collapse_reference}, f)
        super()._save_checkpoint(model, trial)

    def _restore_rollout_buffer(self, checkpoint: str) -> None:
        """Put the trainer where it stopped: the micro-step counter and the rollouts that were in use."""
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        reference = os.path.join(checkpoint, COLLAPSE_REFERENCE_NAME)
        if os.path.isfile(reference):
            with open(reference) as f:
                self._collapse_reference = float(json.load(f)["latent_texture"])
        if self._step % (self.args.steps_per_generation * self.num_iterations) == 0:
            return  # the checkpoint is at a generation boundary: the next step samples afresh
        path = os.path.join(checkpoint, ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index))
        if not os.path.isfile(path):
            raise ValueError(
                f"Checkpoint {checkpoint} was saved between two generations but has no {os.path.basename(path)} "
                "(saved with another number of processes?); resume with the same launch setup, or from a "
                "checkpoint at a multiple of steps_per_generation × num_iterations steps."
            )
        with safe_open(path, framework="pt") as f:
            saved_processes = int((f.metadata() or {}).get("num_processes", 1))
        if saved_processes != self.accelerator.num_processes:
            raise ValueError(
                f"Checkpoint {checkpoint} was saved between two generations by {saved_processes} processes; resume it "
                f"with {saved_processes} processes (now {self.accelerator.num_processes}), or from a checkpoint at a "
                "multiple of steps_per_generation × num_iterations steps."
            )
        buffered = _unflatten_rollouts(load_file(path), device=self.accelerator.device)
        if len(buffered) != self.args.steps_per_generation:
            raise ValueError(
                f"Checkpoint {checkpoint} holds rollouts for steps_per_generation={len(buffered)}, but "
                f"steps_per_generation={self.args.steps_per_generation} now; resume with the saved value."
            )
        self._buffered_inputs = buffered

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the LoRA in diffusers format (``pytorch_lora_weights.safetensors``), or the full
        transformer, plus the training arguments as JSON. Called on the main process only."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        transformer = self.accelerator.unwrap_model(self.model)
        if self.use_lora:
            from peft.utils import get_peft_model_state_dict

            lora_layers = {
                k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()
            }
            type(self.pipeline).save_lora_weights(
                output_dir,
                transformer_lora_layers=lora_layers,
                transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
        else:
            transformer.save_pretrained(os.path.join(output_dir, TRANSFORMER_DIR), safe_serialization=True)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # sharded engines need every process to take part in collecting the state dict
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._save(output_dir)
            if not _internal_call and self.args.save_full_pipeline and not self.use_lora:
                self.pipeline.save_pretrained(output_dir, safe_serialization=True)
            self.create_model_card(output_dir=output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        transformer = self.accelerator.unwrap_model(model or self.model)
        if self.use_lora:
            from peft.utils import set_peft_model_state_dict

            path = os.path.join(resume_from_checkpoint, LORA_WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise ValueError(
                    f"No {LORA_WEIGHTS_NAME} in checkpoint {resume_from_checkpoint}; cannot resume."
                )
            prefix = "transformer."
            state = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(transformer, state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"Checkpoint {path} has unexpected LoRA keys: {result.unexpected_keys[:5]}")
        else:
            loaded = type(transformer).from_pretrained(
                os.path.join(resume_from_checkpoint, TRANSFORMER_DIR), torch_dtype=transformer.dtype
            )
            transformer.load_state_dict(loaded.state_dict())

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """Write ``README.md``: base model, method, rewards and how to load the weights."""
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        base = getattr(self.pipeline, "name_or_path", None) or self.pipeline.config.get("_name_or_path", "")
        pipeline_class = type(self.pipeline).__name__
        repo = self.args.hub_model_id or Path(output_dir).name
        rewards = ", ".join(
            f"`{n}` (weight {w:g})"
            for n, w in zip(self.reward_func_names, self.reward_weights.tolist(), strict=True)
        )
        if self.use_lora:
            usage = f"pipe = {pipeline_class}.from_pretrained({base!r})\npipe.load_lora_weights({repo!r})"
        else:
            usage = f"pipe = {pipeline_class}.from_pretrained({base!r})\n# replace pipe.transformer with the one in {TRANSFORMER_DIR}/"
        front_matter = {
            "base_model": base if base and not os.path.isdir(base) else None,
            "library_name": "diffusers",
            "pipeline_tag": "text-to-image",
            "tags": list(self._tag_names) + (["lora"] if self.use_lora else []),
        }
        header = "\n".join(f"{k}: {json.dumps(v)}" for k, v in front_matter.items() if v is not None)
        card = f"""---
{header}
---

# {repo}

{"A LoRA adapter for" if self.use_lora else "A fine-tuned transformer of"} `{base or pipeline_class}`, trained with
**Flow-GRPO** (online RL for flow-matching models, [arXiv:{self._paper["id"]}](https://arxiv.org/abs/{self._paper["id"]}))
using [trl-intrinsic](https://github.com/trl-intrinsic/trl-intrinsic).

- Rewards: {rewards}
- Steps: {self.state.global_step}; G = {self.args.num_generations} images per prompt; {self.args.num_inference_steps} sampler
  steps; noise level {self.args.noise_level} ({self.args.sde_type}); guidance {self.args.guidance_scale}; β = {self.args.beta}
- Resolution: {self.args.resolution} px

## Usage

```python
from diffusers import {pipeline_class}

{usage}
image = pipe("a photo of a cat", num_inference_steps={self.args.eval_num_inference_steps}).images[0]
```

## Citation

```bibtex
{self._paper["citation"]}
```
"""
        with open(os.path.join(output_dir, "README.md"), "w") as f:
            f.write(card)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision=None,
        **kwargs,
    ):
        """Upload the final weights and the model card (no checkpoints, samples or logs)."""
        if self.hub_model_id is None and not self.args.hub_model_id:
            raise ValueError("`push_to_hub` needs a repository: set `hub_model_id` in the FlowGRPOConfig.")
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        from huggingface_hub import HfApi

        weights = [LORA_WEIGHTS_NAME] if self.use_lora else [f"{TRANSFORMER_DIR}/*"]
        return HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token or self.args.hub_token,
            revision=revision or self.args.hub_revision,
            allow_patterns=["README.md", *weights],
            run_as_future=not blocking,
        )


class EpochRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` that can be positioned at any epoch.

    ``RepeatSampler`` draws each epoch's permutation from one generator that advances epoch after epoch, so a
    run resumed in epoch ``e`` would replay epoch 0's order. ``Trainer`` calls :meth:`set_epoch` at the start
    of every epoch (through accelerate's data loader); it reseeds the generator and skips the permutations of
    the earlier epochs, so the order is TRL's, with or without a resume.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished ``Trainer`` checkpoint: its trainer state, written last, parses."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-<step>`` of ``output_dir`` with the highest step, or ``None``."""
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit():
            steps[int(step)] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return steps[step]
        logger.warning(f"Skipping incomplete checkpoint {steps[step]} (its save was interrupted).")
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` should load: ``True`` means the newest
    complete checkpoint of ``output_dir``; a path must hold a complete checkpoint; falsy means none."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_complete_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(
                f"`resume_from_checkpoint=True` but {output_dir} has no complete checkpoint; pass a checkpoint path "
                "or start without resuming."
            )
    if not resume_from_checkpoint:
        return None
    if not is_complete_checkpoint(resume_from_checkpoint):
        raise ValueError(
            f"Checkpoint {resume_from_checkpoint} is incomplete (no readable {TRAINER_STATE_NAME}: the save was "
            "interrupted); resume from an earlier checkpoint or pass `resume_from_checkpoint=True`."
        )
    return str(resume_from_checkpoint)


def _flatten_rollouts(chunks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The micro-batches of one generation batch as a flat ``{name: tensor}`` dict for safetensors: per-image
    tensors concatenated over the chunks, shared ones (embeddings, sigmas, timesteps, trained steps) once."""
    shared = chunks[0]
    tensors = {key: torch.cat([chunk[key] for chunk in chunks]) for key in _PER_ROW_KEYS}
    tensors["num_chunks"] = torch.tensor(len(chunks))
    tensors["sigmas"], tensors["timesteps"] = shared["sigmas"], shared["timesteps"]
    tensors["train_steps"] = torch.tensor(list(shared["train_steps"]), dtype=torch.long)
    embeddings = shared["embeddings"]
    for part in ("cond", "uncond", "shared"):
        for key, value in (getattr(embeddings, part) or {}).items():
            tensors[f"embeddings.{part}.{key}"] = value
    tensors["embeddings.has_uncond"] = torch.tensor(embeddings.uncond is not None)
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def _unflatten_rollouts(tensors: dict[str, torch.Tensor], device: torch.device) -> list[dict[str, Any]]:
    """Inverse of :func:`_flatten_rollouts`."""
    tensors = {key: value.to(device) for key, value in tensors.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {"cond": {}, "uncond": {}, "shared": {}}
    for key, value in tensors.items():
        if key.startswith("embeddings.") and key != "embeddings.has_uncond":
            _, part, name = key.split(".", 2)
            parts[part][name] = value
    embeddings = PromptEmbeddings(
        cond=parts["cond"],
        uncond=parts["uncond"] if bool(tensors["embeddings.has_uncond"]) else None,
        shared=parts["shared"],
    )
    batch = {key: tensors[key] for key in _PER_ROW_KEYS}
    batch.update(
        embeddings=embeddings,
        sigmas=tensors["sigmas"],
        timesteps=tensors["timesteps"],
        train_steps=tensors["train_steps"].tolist(),
    )
    return FlowGRPOTrainer._split(batch, int(tensors["num_chunks"]))


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row, ``columns`` per row."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


__all__ = ["FlowGRPOTrainer", "image_grid"]
