"""GRPO on intrinsic rewards: self-certainty for text LMs (Intuitor-style) and IRIS for Janus-Pro.

Text LMs: TRL's ``GRPOTrainer``, whose reward functions also receive the self-certainty of each completion,
caught from the raw (temperature 1) logits ``generate`` already produces by a forward hook
(:func:`~trl_intrinsic.autoregressive.self_certainty.record_generation_self_certainty`): no extra forward.

Janus-Pro: :meth:`IntrinsicGRPOTrainer._generate_and_score_completions` is IRIS, step by step, on the
rollout of :func:`~trl_intrinsic.autoregressive.janus.janus_rollout` (CoT from the text head, then image
tokens from the generation head under classifier-free guidance); one GRPO objective covers both parts.

Exact resume: each process saves the rollouts it has not trained on yet in the checkpoint
(:func:`~trl_intrinsic.trainers.common.save_rollout_buffer`) and a resume restores them with the
micro-step counter; prompt order and random streams are those of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object
from transformers import PreTrainedModel
from trl import GRPOTrainer
from trl.trainer.utils import is_async_callable, nanstd, use_adapter

from trl_intrinsic.autoregressive import janus as janus_ops
from trl_intrinsic.autoregressive.self_certainty import record_generation_self_certainty
from trl_intrinsic.seeding import derived_generator
from trl_intrinsic.trainers.common import (
    check_nonempty_datasets,
    check_reward_values,
    checkpoint_folder,
    load_rollout_buffer,
    repeat_sampler,
    resolve_resume_checkpoint,
    reward_call_error,
    save_rollout_buffer,
    write_training_args,
)
from trl_intrinsic.trainers.grpo_math import group_advantages
from trl_intrinsic.trainers.intrinsic_grpo_config import IntrinsicGRPOConfig

__all__ = ["IntrinsicGRPOTrainer"]


def _text(prompt: Any) -> str:
    """A prompt as text for error messages (conversations: their last message), never raising."""
    try:
        return janus_ops.prompt_text(prompt)
    except ValueError:
        return str(prompt)


class _CheckedReward:
    """A synchronous reward function whose failures name it: an exception becomes a ``RuntimeError``, a wrong
    number of rewards or an infinite one a ``ValueError``, each naming the function, the global step and the
    batch (:func:`~trl_intrinsic.trainers.common.check_reward_values`). ``None`` stays a skipped sample."""

    def __init__(self, func: Callable, name: str, trainer: IntrinsicGRPOTrainer):
        self.func, self.__name__, self._trainer = func, name, trainer

    def __call__(self, prompts: list, **kwargs: Any) -> list:
        step = self._trainer.state.global_step
        try:
            values = self.func(prompts=prompts, **kwargs)
        except Exception as error:
            raise reward_call_error(self.__name__, error, step, len(prompts), _text(prompts[0])) from error
        return check_reward_values(self.__name__, values, len(prompts), step, [_text(p) for p in prompts])


class IntrinsicGRPOTrainer(GRPOTrainer):
    """GRPO whose reward functions also receive the policy's self-certainty; IRIS for Janus-Pro models.

    Args:
        model: a causal LM (hub id, local path or instance), or a ``JanusForConditionalGeneration``.
        reward_funcs: as for ``GRPOTrainer``; e.g. ``[nsc_reward]`` or ``[self_certainty_reward]``.
        args: an :class:`IntrinsicGRPOConfig`.
        Remaining arguments: as for ``GRPOTrainer``.

    Text LMs: reward functions get the kwargs ``self_certainty`` (``list[float]``, one per completion: the mean
    over its completion tokens, EOS included, of ``KL(U ‖ p)`` at temperature 1) and
    ``self_certainty_per_token`` (``list[list[float]]``). The completions table gets a ``self_certainty``
    column and the metric ``self_certainty/mean`` is logged.

    Janus-Pro: reward functions are called as ``f(prompts=[str], completions=[PIL.Image], completion_ids=[the
    image-token ids], **kwargs)`` with kwargs ``cot`` (decoded CoT text, "" with ``use_cot=False``),
    ``self_certainty`` (mean over CoT and image tokens), ``self_certainty_text`` (CoT tokens; NaN without
    CoT), ``self_certainty_image``, ``trainer_state``, ``log_extra``, ``log_metric`` and the dataset columns.
    The loss is TRL's GRPO loss over CoT tokens (text head) and image tokens (generation head, conditional
    logits); the BOI token between them is conditioning only (``tool_mask`` = 0). The reference of the KL is
    the base model with the LoRA adapter disabled, or TRL's frozen copy for full fine-tuning. The completions
    table holds the prompt, the CoT text, the image (wandb / trackio) and the self-certainty columns.

    Checkpoints between two generations also hold each process's unconsumed rollouts
    (``rollout_buffer_<rank>.safetensors``), so a resumed run reproduces the uninterrupted one; they resume
    only with the same number of processes, ``steps_per_generation``, ``num_iterations``,
    ``gradient_accumulation_steps`` and ``per_device_train_batch_size`` (ValueError otherwise).
    ``resume_from_checkpoint=True`` skips checkpoints whose save was interrupted. The training arguments are
    saved as ``training_args.json``.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "trl-intrinsic", "self-certainty"]

    def __init__(self, model, reward_funcs=None, args: IntrinsicGRPOConfig | None = None, **kwargs: Any):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = IntrinsicGRPOConfig(f"{str(model_name).split('/')[-1]}-IntrinsicGRPO")
        if not isinstance(args, IntrinsicGRPOConfig):
            raise TypeError(
                f"`args` must be an IntrinsicGRPOConfig, got {type(args).__name__}; build one with the same fields."
            )
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` is not supported by IntrinsicGRPOTrainer: self-certainty is read from the trainer's "
                    "own single-turn rollout. Remove it or use trl.GRPOTrainer."
                )
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError(
                "`use_vllm` and `use_transformers_continuous_batching` must be False for IntrinsicGRPOTrainer: "
                "these backends do not expose the full next-token logits that self-certainty needs."
            )
        check_nonempty_datasets(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        model = janus_ops.load_janus_if_named(model, args.model_init_kwargs, args.trust_remote_code)
        self.is_janus = janus_ops.is_janus(model)
        if self.is_janus:
            kwargs["peft_config"] = janus_ops.prepare_janus(model, args, kwargs.get("peft_config"))
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.reward_funcs = [
            func
            if isinstance(func, torch.nn.Module) or is_async_callable(func)
            else _CheckedReward(func, name, self)
            for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True)
        ]
        self._pending_self_certainty: list[torch.Tensor] = []
        # Set by `train(resume_from_checkpoint=...)`; the first training micro-step restores its rollouts.
        self._resume_checkpoint: str | None = None
        self._eval_rollouts = 0  # Janus rollouts sampled by the current `evaluate()` call
        if self.is_janus:
            self.janus_tokens = janus_ops.JanusTokens.of(self._janus(), self._tokenizer)

    # ------------------------------------------------------------------------------------------------------
    # Text LMs: catch the generation logits.
    # ------------------------------------------------------------------------------------------------------

    def _base_model(self) -> torch.nn.Module:
        """The model whose forward returns the logits (the base model under PEFT; LoRA layers stay active)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        with record_generation_self_certainty(self._base_model(), self.args.self_certainty_chunk_size) as rec:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        self._pending_self_certainty = rec.per_completion(completion_ids)
        return completion_ids, logprobs

    def _generate(self, prompts: list):
        (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images) = (
            super()._generate(prompts)
        )
        per_token, self._pending_self_certainty = self._pending_self_certainty, []
        means = [float(v.mean()) if v.numel() else 0.0 for v in per_token]
        extra_fields = {
            **extra_fields,
            "self_certainty": means,
            "self_certainty_per_token": [v.tolist() for v in per_token],
        }
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather(torch.tensor(means, device=self.accelerator.device))
        self._metrics[mode]["self_certainty/mean"].append(gathered.mean().item())
        self._log_completion_extra("self_certainty", means)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    # ------------------------------------------------------------------------------------------------------
    # Janus-Pro (IRIS): CoT + image tokens, one GRPO objective.
    # ------------------------------------------------------------------------------------------------------

    def _janus(self) -> torch.nn.Module:
        """The ``JanusForConditionalGeneration`` inside the trainer's wrappers (LoRA layers stay active)."""
        return self._base_model()

    def _rollout_generator(self, mode: str) -> torch.Generator:
        """The generator of one Janus rollout, derived from (seed, mode, position, process): training rollouts
        take the micro-step counter (a resume restores it), evaluation rollouts their order in the `evaluate()`
        call (every evaluation draws the same samples); each process draws its own stream."""
        if mode == "train":
            position = self._step
        else:
            position, self._eval_rollouts = self._eval_rollouts, self._eval_rollouts + 1
        index = self.accelerator.process_index
        return derived_generator(
            self.args.seed, "janus", mode, position, index, device=self.accelerator.device
        )

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.is_janus:
            return super()._generate_and_score_completions(inputs)
        args, mode = self.args, "train" if self.model.training else "eval"
        prompts = [janus_ops.prompt_text(x["prompt"]) for x in inputs]

        # 1. Rollout: CoT (text head), then image tokens (generation head, CFG), self-certainty from both loops.
        rollout = janus_ops.janus_rollout(
            self._janus(),
            self.processing_class,
            prompts,
            max_cot_tokens=args.max_completion_length,
            use_cot=args.use_cot,
            cot_template=args.cot_template,
            temperature=args.temperature,
            cfg_weight=args.cfg_weight,
            image_temperature=args.image_temperature,
            tokens=self.janus_tokens,
            chunk_size=args.self_certainty_chunk_size,
            generator=self._rollout_generator(mode),
            device=self.accelerator.device,
        )

        # 2. Training layout: prompt (left-padded) | CoT, BOI, image tokens (right-padded); BOI is never trained.
        layout = janus_ops.training_layout(rollout, self.janus_tokens)

        # 3. Self-certainty per completion (CoT and image tokens together, and each part) for the rewards.
        sc_all, sc_text, sc_image = rollout.self_certainty()
        for i, x in enumerate(inputs):
            x.update(cot=rollout.cot_text[i], self_certainty=sc_all[i])
            x.update(self_certainty_text=sc_text[i], self_certainty_image=sc_image[i])

        # 4. Log-probs of the sampling policy (when it may differ from the optimised one) and of the reference.
        old_per_token_logps, ref_per_token_logps = self._janus_old_and_ref_logps(layout, mode)

        # 5. Rewards, gathered over processes, and group advantages.
        rewards_per_func = self._calculate_rewards(
            inputs, prompts, rollout.images, rollout.image.ids.tolist()
        )
        rewards, all_advantages = self._janus_advantages(rewards_per_func, mode)
        start = self.accelerator.process_index * len(prompts)

        # 6. Metrics and the completions table (prompt, CoT, image, rewards, self-certainty).
        self._log_janus(mode, prompts, rollout, layout, rewards_per_func, rewards, all_advantages)

        output = {
            **vars(layout),
            "advantages": all_advantages[start : start + len(prompts)],
            "num_items_in_batch": self.accelerator.gather(
                (layout.completion_mask * layout.tool_mask).sum()
            ).sum(),
        }
        if old_per_token_logps is not None:
            output["old_per_token_logps"] = old_per_token_logps
        if ref_per_token_logps is not None:
            output["ref_per_token_logps"] = ref_per_token_logps
        return output

    @torch.no_grad()
    def _janus_old_and_ref_logps(self, layout: janus_ops.JanusTrainingLayout, mode: str):
        """``(old, ref)`` per-token log-probs of the completions: the sampling policy's when GRPO needs them
        (``gradient_accumulation_steps`` not a multiple of a generation cycle), the reference's when ``beta`` ≠ 0
        (TRL's frozen copy, or the LoRA model with its adapter disabled); ``None`` otherwise."""
        args = self.args
        input_ids = torch.cat([layout.prompt_ids, layout.completion_ids], dim=1)
        attention_mask = torch.cat([layout.prompt_mask, layout.completion_mask], dim=1)
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        width, mm_token_type_ids = layout.completion_ids.shape[1], layout.mm_token_type_ids

        def logps(model) -> torch.Tensor:
            return self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, width, batch_size=batch_size, mm_token_type_ids=mm_token_type_ids
            )[0]  # fmt: skip

        old = None
        if args.gradient_accumulation_steps % (args.steps_per_generation * self.num_iterations) != 0:
            old = logps(self.model)
        if self.beta == 0.0:
            return old, None
        if self.ref_model is not None:
            return old, logps(self.ref_model)
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            return old, logps(self.model)

    def _janus_advantages(
        self, rewards_per_func: torch.Tensor, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted rewards of the gathered batch (NaN where no function scored) and their group advantages."""
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)[None]).nansum(dim=1)
        rewards[unscorable] = torch.nan
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // num_generations
        return rewards, group_advantages(rewards, group_ids, scale_rewards=self.scale_rewards)

    def _log_janus(self, mode, prompts, rollout, layout, rewards_per_func, rewards, all_advantages) -> None:
        """Metrics (rewards, self-certainty, CoT length, tokens seen) and the completions table of a Janus batch."""
        device, metrics = self.accelerator.device, self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        sc_all, sc_text, sc_image = rollout.self_certainty()
        for key, values in (("mean", sc_all), ("text", sc_text), ("image", sc_image)):
            gathered = self.accelerator.gather(torch.tensor(values, device=device))
            metrics[f"self_certainty/{key}"].append(torch.nanmean(gathered).item())
        lengths = torch.tensor([len(c) for c in rollout.cot_rows], device=device)
        metrics["completions/mean_length"].append(self.accelerator.gather(lengths).float().mean().item())
        if mode == "train":
            seen = layout.prompt_mask.sum() + layout.completion_mask.sum()
            self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(rollout.cot_text))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(all_advantages.tolist())
        for column, values in (("self_certainty", sc_all), ("self_certainty_image", sc_image)):
            self._logs["extra"][column].extend(gather_object(values))
        for column, values in sorted(self._pending_extra_logs.items()):
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        if self.log_multimodal:
            self._logs["images"].extend(gather_object([[im] for im in rollout.images]))

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        mm_token_type_ids=None,
        **kwargs,
    ):
        if not self.is_janus:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss,
                mm_token_type_ids=mm_token_type_ids, **kwargs,
            )  # fmt: skip
        if mm_token_type_ids is None:
            raise ValueError("Janus log-probs need `mm_token_type_ids` marking the image tokens.")
        unwrapped = self.accelerator.unwrap_model(model)
        janus = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        logps, entropy = janus_ops.janus_completion_logps(
            janus, input_ids, attention_mask, mm_token_type_ids, logits_to_keep, compute_entropy=compute_entropy,
            batch_size=batch_size, autocast=self.accelerator.autocast,
        )  # fmt: skip
        aux = torch.zeros((), device=input_ids.device) if compute_aux_loss else None
        return logps, entropy, aux

    # ------------------------------------------------------------------------------------------------------
    # Sampling order, checkpoints and exact resume.
    # ------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset=None):
        # TRL's RepeatSampler, positioned at the epoch `Trainer` announces: a resumed run continues the
        # permutation of its epoch instead of replaying the first epoch's.
        return repeat_sampler(self, self.train_dataset if dataset is None else dataset)

    def _prepare_inputs(self, generation_batch):
        if self.model.training and self._resume_checkpoint is not None:
            self._restore_rollout_buffer(self._resume_checkpoint)
            self._resume_checkpoint = None
        return super()._prepare_inputs(generation_batch)

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``Trainer.evaluate``. Every call samples the same rollouts for the same prompts, whatever the training
        step, so successive evaluations compare models, not sampling draws."""
        self._eval_rollouts = 0
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint of
        ``output_dir`` (a run killed while saving leaves a newer, incomplete one behind)."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            self._resume_checkpoint = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _buffer_metadata(self) -> dict[str, int]:
        """What a saved rollout buffer must agree on with the run that resumes it."""
        return {
            "num_processes": self.accelerator.num_processes,
            "steps_per_generation": self.args.steps_per_generation,
            "num_iterations": self.num_iterations,
            "step": self._step,
        }

    def _save_checkpoint(self, model, trial) -> None:
        # Rollouts sampled before this step and not consumed yet (steps_per_generation or num_iterations > 1)
        # are saved by each process before `Trainer` writes the trainer state that marks the checkpoint complete.
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._buffered_inputs is not None and self._step % generate_every != 0:
            save_rollout_buffer(
                checkpoint_folder(self, trial),
                self._buffered_inputs,
                rank=self.accelerator.process_index,
                metadata=self._buffer_metadata(),
            )
        self.accelerator.wait_for_everyone()  # every buffer is on disk before the main process completes the save
        super()._save_checkpoint(model, trial)

    def _restore_rollout_buffer(self, checkpoint: str) -> None:
        """Put the trainer where it stopped: the micro-step counter and the rollouts it was training on."""
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        buffered = load_rollout_buffer(
            checkpoint,
            rank=self.accelerator.process_index,
            expected=self._buffer_metadata(),
            generate_every=self.args.steps_per_generation * self.num_iterations,
            device=self.accelerator.device,
        )
        rows = {chunk["prompt_ids"].shape[0] for chunk in buffered or []}
        if buffered is not None and rows != {self.args.per_device_train_batch_size}:
            raise ValueError(
                f"Checkpoint {checkpoint} holds micro-batches of {sorted(rows)} rollouts, but "
                f"per_device_train_batch_size={self.args.per_device_train_batch_size}; resume with the saved value."
            )
        self._buffered_inputs = buffered

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """``Trainer._save`` with the training arguments written as ``training_args.json`` (not pickled):
        the model (a PEFT adapter or the full weights, safetensors), the processor and the arguments."""
        from peft import PeftModel

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Non-writing processes only take part when the model was sharded at load time (collective gathers).
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if isinstance(self.model, PreTrainedModel | PeftModel):
            model = self.model
        else:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if state_dict is None:
                state_dict = self.model.state_dict()
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_training_args(output_dir, self.args)
