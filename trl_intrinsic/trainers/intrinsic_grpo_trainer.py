"""GRPO on intrinsic rewards: self-certainty for text LMs (Intuitor-style) and IRIS for Janus-Pro.

For text LMs this is TRL's ``GRPOTrainer`` with one addition: every reward function receives the
self-certainty of each completion (``self_certainty``, mean over the completion tokens) and its per-token
values (``self_certainty_per_token``). They are computed from the logits that ``generate`` already
produces, caught by a forward hook on the model during the rollout, so no forward pass is added. The
hook sees the model's raw logits (temperature 1): logits processors, which would see them after
temperature / top-k / top-p, are not used for that reason.

For ``JanusForConditionalGeneration`` models the rollout, the rewards' inputs and the loss are those of
IRIS (see :mod:`trl_intrinsic.autoregressive.janus`): a chain-of-thought from the text head, then image
tokens from the generation head under classifier-free guidance, one GRPO objective over both.

Checkpoints resume exactly. ``GRPOTrainer`` samples once every ``steps_per_generation × num_iterations``
micro-steps and keeps the rollouts it has not trained on yet in memory; on a resume it would forget them,
sample afresh from the already-updated policy and shift the generation cycle. Here each process saves
its unconsumed rollouts in the checkpoint (``rollout_buffer_<rank>.safetensors``, before the trainer
state that marks the checkpoint complete) and a resume restores them with the micro-step counter. The
prompt order of every epoch is TRL's, reproduced from the epoch number after a resume, and the random
streams of sampling are restored (text LMs: ``Trainer``'s saved RNG states; Janus: a generator seeded
per rollout from the seed, the micro-step and the process). Saved models and checkpoints hold the
training arguments as ``training_args.json`` instead of ``Trainer``'s pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import is_async_callable, nanstd, use_adapter

from trl_intrinsic.autoregressive import janus as janus_ops
from trl_intrinsic.rewards.self_certainty import self_certainty
from trl_intrinsic.trainers.flow_grpo_trainer import (
    ROLLOUT_BUFFER_NAME,
    EpochRepeatSampler,
    resolve_resume_checkpoint,
)
from trl_intrinsic.trainers.grpo_math import group_advantages
from trl_intrinsic.trainers.intrinsic_grpo_config import IntrinsicGRPOConfig

__all__ = ["IntrinsicGRPOTrainer"]


class _CheckedReward:
    """A synchronous reward function whose failures name it: an exception becomes a ``RuntimeError`` and an
    infinite reward a ``ValueError``, each naming the function, the global step and the batch (TRL already
    rejects a wrong number of rewards, and turns ``None`` into NaN, a skipped sample)."""

    def __init__(self, func: Callable, name: str, trainer: IntrinsicGRPOTrainer):
        self.func, self.__name__, self._trainer = func, name, trainer

    def __call__(self, prompts: list, **kwargs: Any) -> list:
        step = self._trainer.state.global_step
        try:
            values = self.func(prompts=prompts, **kwargs)
        except Exception as error:
            raise RuntimeError(
                f"Reward function '{self.__name__}' raised {type(error).__name__} at global step {step} on a batch "
                f"of {len(prompts)} completions (first prompt: {_prompt_text(prompts[0])!r})."
            ) from error
        values = values.tolist() if isinstance(values, torch.Tensor) else values
        for value, prompt in zip(values, prompts, strict=False):
            if value is not None and math.isinf(float(value)):
                raise ValueError(
                    f"Reward function '{self.__name__}' returned an infinite reward at global step {step} (prompt "
                    f"{_prompt_text(prompt)!r}); return None to skip a sample."
                )
        return values


class _SelfCertaintyRecorder:
    """Forward hook computing the self-certainty of the last position of every forward's logits.

    During ``generate`` each forward call of the model predicts one new token per row from the logits of its
    last position, so the recorded values, stacked, are the per-token self-certainty of the generated tokens.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.steps: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        logits = output["logits"] if isinstance(output, dict) else output.logits
        self.steps.append(self_certainty(logits[:, -1, :], chunk_size=self.chunk_size))

    def per_token(self) -> torch.Tensor:
        """(B, steps) fp32 self-certainty of each generated position."""
        if not self.steps:
            raise RuntimeError("No forward pass was recorded during generation.")
        return torch.stack(self.steps, dim=1)


@contextlib.contextmanager
def record_generation_self_certainty(
    model: torch.nn.Module, chunk_size: int
) -> Iterator[_SelfCertaintyRecorder]:
    """Record the self-certainty of every token ``model.generate`` produces inside the block.

    Args:
        model: the causal LM whose ``forward`` ``generate`` calls (the base model under a PEFT wrapper).
        chunk_size: see :func:`~trl_intrinsic.rewards.self_certainty`.
    """
    recorder = _SelfCertaintyRecorder(chunk_size)
    handle = model.register_forward_hook(recorder, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()


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

    Checkpoints: when one falls between two generations (``steps_per_generation`` or ``num_iterations`` > 1),
    each process also saves the rollouts it has not trained on yet (``rollout_buffer_<rank>.safetensors``) and
    ``train(resume_from_checkpoint=...)`` trains on them, so a resumed run reproduces the uninterrupted one.
    Such a checkpoint resumes only with the same number of processes, ``steps_per_generation``,
    ``num_iterations``, ``gradient_accumulation_steps`` and ``per_device_train_batch_size`` (ValueError
    otherwise). ``resume_from_checkpoint=True`` skips checkpoints whose save was interrupted. The training
    arguments are saved as ``training_args.json``.
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
        model = _load_janus_if_named(model, args)
        self.is_janus = _is_janus(model)
        if self.is_janus:
            kwargs["peft_config"] = _prepare_janus(model, args, kwargs.get("peft_config"))
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
        if self.is_janus:
            self._init_janus()

    # ------------------------------------------------------------------------------------------------------
    # Text LMs: catch the generation logits.
    # ------------------------------------------------------------------------------------------------------

    def _logits_module(self) -> torch.nn.Module:
        """The module whose forward returns the logits during ``generate`` (the base model under PEFT)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        with record_generation_self_certainty(
            self._logits_module(), self.args.self_certainty_chunk_size
        ) as rec:
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        per_token = rec.per_token()
        if per_token.shape[0] != len(completion_ids):
            raise RuntimeError(
                f"Recorded {per_token.shape[0]} rows of generation logits for {len(completion_ids)} completions."
            )
        longest = max((len(ids) for ids in completion_ids), default=0)
        if per_token.shape[1] < longest:
            raise RuntimeError(
                f"Recorded {per_token.shape[1]} generation steps for completions of up to {longest} tokens."
            )
        self._pending_self_certainty = [
            per_token[i, : len(ids)].cpu() for i, ids in enumerate(completion_ids)
        ]
        return completion_ids, logprobs

    def _generate(self, prompts: list):
        (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images) = (
            super()._generate(prompts)
        )
        per_token = self._pending_self_certainty
        self._pending_self_certainty = []
        means = [float(v.mean()) if v.numel() else 0.0 for v in per_token]
        extra_fields = dict(extra_fields)
        extra_fields["self_certainty"] = means
        extra_fields["self_certainty_per_token"] = [v.tolist() for v in per_token]
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather(torch.tensor(means, device=self.accelerator.device))
        self._metrics[mode]["self_certainty/mean"].append(gathered.mean().item())
        self._log_completion_extra("self_certainty", means)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    # ------------------------------------------------------------------------------------------------------
    # Janus-Pro (IRIS): CoT + image tokens, one GRPO objective.
    # ------------------------------------------------------------------------------------------------------

    def _janus(self):
        """The ``JanusForConditionalGeneration`` inside the trainer's wrappers (LoRA layers stay active)."""
        return self._logits_module()

    def _init_janus(self) -> None:
        tokenizer = self._tokenizer
        janus = self._janus()
        self._boi_token_id = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
        # `generation_kwargs` (with `boi_token_id`) is not saved by `save_pretrained`: restore it.
        generation_kwargs = dict(getattr(janus.generation_config, "generation_kwargs", None) or {})
        generation_kwargs.setdefault("boi_token_id", self._boi_token_id)
        janus.generation_config.generation_kwargs = generation_kwargs
        self._bos_token_id = tokenizer.bos_token_id
        if self._bos_token_id is None:
            raise ValueError("The Janus tokenizer has no `bos_token`; Janus prompts must start with BOS.")
        self.num_image_tokens = janus_ops.janus_num_image_tokens(janus)
        self._eval_rollouts = 0  # rollouts sampled by the current `evaluate()` call

    def _rollout_generator(self, mode: str) -> torch.Generator:
        """The generator of one Janus rollout, seeded by (seed, mode, position in training, process).

        Training rollouts take the micro-step counter, which a resume restores, so a resumed run samples the
        same CoT and image tokens as an uninterrupted one; evaluation rollouts take their order within the
        `evaluate()` call, so every evaluation draws the same samples whatever the training step. Each process
        draws its own stream: the rows of one prompt group on two processes get different samples.
        """
        if mode == "train":
            position = (0, self._step)
        else:
            position = (1, self._eval_rollouts)
            self._eval_rollouts += 1
        seed = self.args.seed
        for value in (*position, self.accelerator.process_index):
            seed = (seed * 1_000_003 + int(value)) % (2**63 - 1)
        return torch.Generator(device=self.accelerator.device).manual_seed(seed)

    def _janus_prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat-formatted request (the CoT request, or the prompt itself without CoT)."""
        text = self.args.cot_template.format(prompt=prompt) if self.args.use_cot else prompt
        return janus_ops.janus_prompt_ids(self.processing_class, text, self._bos_token_id)

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, device=device)
                mask[i, width - len(r) :] = 1
        return ids, mask

    def _janus_rollout(self, janus, prompt_rows, prompt_ids, prompt_mask, generator):
        """Sample the CoT (``use_cot``) and the image tokens of a batch, and decode the images.

        Returns ``(cot_rows, sc_text_rows, image, images)``: CoT token ids and their per-token self-certainty
        per row, the :class:`~trl_intrinsic.autoregressive.janus.ImageSample` and the PIL images.
        """
        args, device, pad_id = self.args, self.accelerator.device, self._tokenizer.pad_token_id
        batch = len(prompt_rows)
        if args.use_cot:
            cot = janus_ops.sample_cot(
                janus,
                prompt_ids,
                prompt_mask,
                max_new_tokens=args.max_completion_length,
                temperature=args.temperature,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=pad_id,
                chunk_size=args.self_certainty_chunk_size,
                generator=generator,
            )
            cot_rows = [row[m.bool()].tolist() for row, m in zip(cot.ids, cot.mask)]
            sc_text_rows = [row[m.bool()] for row, m in zip(cot.self_certainty, cot.mask)]
        else:
            cot_rows = [[] for _ in range(batch)]
            sc_text_rows = [torch.zeros(0, device=device) for _ in range(batch)]
        prefix_ids, prefix_mask = self._left_pad(
            [p + c + [self._boi_token_id] for p, c in zip(prompt_rows, cot_rows)]
        )
        image = janus_ops.sample_image_tokens(
            janus,
            prefix_ids,
            prefix_mask,
            num_image_tokens=self.num_image_tokens,
            cfg_weight=args.cfg_weight,
            temperature=args.image_temperature,
            bos_token_id=self._bos_token_id,
            boi_token_id=self._boi_token_id,
            pad_token_id=pad_id,
            chunk_size=args.self_certainty_chunk_size,
            generator=generator,
        )
        images = janus_ops.decode_images(janus, image.ids)
        return cot_rows, sc_text_rows, image, images

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.is_janus:
            return super()._generate_and_score_completions(inputs)
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        args = self.args
        prompts = [_prompt_text(x["prompt"]) for x in inputs]
        janus = self._janus()
        pad_id = self._tokenizer.pad_token_id

        # 1. Rollout: CoT (text head), then image tokens (generation head, CFG), self-certainty from both loops.
        # Sampled in eval mode: in training mode a gradient-checkpointed language model drops the KV cache
        # the cached loops rely on (and LoRA dropout would make the samples off-policy).
        prompt_rows = [self._janus_prompt_ids(p) for p in prompts]
        prompt_ids, prompt_mask = self._left_pad(prompt_rows)
        batch = len(prompts)
        generator = self._rollout_generator(mode)
        was_training = self.model.training
        self.model.eval()
        try:
            cot_rows, sc_text_rows, image, images = self._janus_rollout(
                janus, prompt_rows, prompt_ids, prompt_mask, generator
            )
        finally:
            self.model.train(was_training)

        # 2. Training layout: prompt (left-padded) | CoT, BOI, image tokens (right-padded). BOI is a template
        # token: attended, never trained (tool_mask = 0); mm_token_type_ids = 1 marks image tokens.
        completion_rows = [[*c, self._boi_token_id, *ids] for c, ids in zip(cot_rows, image.ids.tolist())]
        width = max(len(r) for r in completion_rows)
        completion_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        completion_mask = torch.zeros_like(completion_ids)
        tool_mask = torch.zeros_like(completion_ids)
        image_type = torch.zeros_like(completion_ids)
        for i, (row, c) in enumerate(zip(completion_rows, cot_rows)):
            completion_ids[i, : len(row)] = torch.tensor(row, device=device)
            completion_mask[i, : len(row)] = 1
            tool_mask[i, : len(c)] = 1
            tool_mask[i, len(c) + 1 : len(row)] = 1
            image_type[i, len(c) + 1 : len(row)] = 1
        mm_token_type_ids = torch.cat([torch.zeros_like(prompt_ids), image_type], dim=1)
        loss_mask = completion_mask * tool_mask
        num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()

        # 3. Self-certainty per completion: mean over CoT and image tokens together, and over each part.
        sc_text = [float(v.mean()) if v.numel() else float("nan") for v in sc_text_rows]
        sc_image = image.self_certainty.mean(dim=1).tolist()
        sc_all = [float(torch.cat([t, im]).mean()) for t, im in zip(sc_text_rows, image.self_certainty)]
        cot_text = self._tokenizer.batch_decode(cot_rows, skip_special_tokens=True)
        for i, x in enumerate(inputs):
            x["cot"] = cot_text[i]
            x["self_certainty"] = sc_all[i]
            x["self_certainty_text"] = sc_text[i]
            x["self_certainty_image"] = sc_image[i]

        # 4. Log-probs of the sampling policy (when it may differ from the optimised one) and of the reference.
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        logp_kwargs = dict(batch_size=batch_size, mm_token_type_ids=mm_token_type_ids)
        with torch.no_grad():
            old_per_token_logps = None
            if args.gradient_accumulation_steps % (args.steps_per_generation * self.num_iterations) != 0:
                old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, width, **logp_kwargs
                )
            ref_per_token_logps = None
            if self.beta != 0.0:
                if self.ref_model is not None:
                    ref_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
                        self.ref_model, input_ids, attention_mask, width, **logp_kwargs
                    )
                else:
                    unwrapped = self.accelerator.unwrap_model(self.model)
                    with use_adapter(
                        unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
                    ):
                        ref_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
                            self.model, input_ids, attention_mask, width, **logp_kwargs
                        )

        # 5. Rewards, gathered over processes, and group advantages.
        image_token_lists = image.ids.tolist()
        rewards_per_func = self._calculate_rewards(inputs, prompts, images, image_token_lists)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * weights[None]).nansum(dim=1)
        rewards[unscorable] = torch.nan
        group_ids = torch.arange(rewards.numel(), device=device) // num_generations
        all_advantages = group_advantages(rewards, group_ids, scale_rewards=self.scale_rewards)
        process_slice = slice(
            self.accelerator.process_index * batch, (self.accelerator.process_index + 1) * batch
        )
        advantages = all_advantages[process_slice]

        # 6. Metrics and the completions table (prompt, CoT, image, rewards, self-certainty).
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        for key, values in (
            ("self_certainty/mean", sc_all),
            ("self_certainty/text", sc_text),
            ("self_certainty/image", sc_image),
        ):
            gathered = self.accelerator.gather(torch.tensor(values, device=device))
            metrics[key].append(torch.nanmean(gathered).item())
        lengths = self.accelerator.gather(torch.tensor([len(c) for c in cot_rows], device=device)).float()
        metrics["completions/mean_length"].append(lengths.mean().item())
        if mode == "train":
            self.state.num_input_tokens_seen += self.accelerator.gather(attention_mask.sum()).sum().item()
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(cot_text))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(all_advantages.tolist())
        for column, values in (("self_certainty", sc_all), ("self_certainty_image", sc_image)):
            self._logs["extra"][column].extend(gather_object(values))
        for column, values in sorted(self._pending_extra_logs.items()):
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        if self.log_multimodal:
            self._logs["images"].extend(gather_object([[im] for im in images]))

        output = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "tool_mask": tool_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "advantages": advantages,
            "num_items_in_batch": num_items_in_batch,
        }
        if old_per_token_logps is not None:
            output["old_per_token_logps"] = old_per_token_logps
        if ref_per_token_logps is not None:
            output["ref_per_token_logps"] = ref_per_token_logps
        return output

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
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                mm_token_type_ids=mm_token_type_ids,
                **kwargs,
            )
        if mm_token_type_ids is None:
            raise ValueError("Janus log-probs need `mm_token_type_ids` marking the image tokens.")
        unwrapped = self.accelerator.unwrap_model(model)
        janus = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                lp, ent = janus_ops.janus_completion_logps(
                    janus,
                    input_ids[rows],
                    attention_mask[rows],
                    mm_token_type_ids[rows],
                    logits_to_keep,
                    compute_entropy=compute_entropy,
                )
            logps.append(lp)
            entropies.append(ent)
        entropy = torch.cat(entropies) if compute_entropy else None
        aux = torch.zeros((), device=input_ids.device) if compute_aux_loss else None
        return torch.cat(logps), entropy, aux

    # ------------------------------------------------------------------------------------------------------
    # Sampling order, checkpoints and exact resume.
    # ------------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset=None):
        # TRL's RepeatSampler, positioned at the epoch `Trainer` announces: a resumed run continues the
        # permutation of its epoch instead of replaying the first epoch's.
        return EpochRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

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

    def _save_checkpoint(self, model, trial) -> None:
        # Rollouts sampled before this step and not consumed yet (steps_per_generation or num_iterations > 1)
        # are saved by each process before `Trainer` writes the trainer state that marks the checkpoint complete.
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._buffered_inputs is not None and self._step % generate_every != 0:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            os.makedirs(folder, exist_ok=True)
            tensors, extras = _flatten_rollouts(self._buffered_inputs)
            metadata = {
                "step": str(self._step),
                "num_processes": str(self.accelerator.num_processes),
                "steps_per_generation": str(self.args.steps_per_generation),
                "num_iterations": str(self.num_iterations),
                "extras": extras,
            }
            name = ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index)
            save_file(tensors, os.path.join(folder, name), metadata=metadata)
        self.accelerator.wait_for_everyone()  # every buffer is on disk before the main process completes the save
        super()._save_checkpoint(model, trial)

    def _restore_rollout_buffer(self, checkpoint: str) -> None:
        """Put the trainer where it stopped: the micro-step counter and the rollouts it was training on."""
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        generate_every = self.args.steps_per_generation * self.num_iterations
        name = ROLLOUT_BUFFER_NAME.format(rank=self.accelerator.process_index)
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            if self._step % generate_every == 0:
                return  # a generation boundary: the next micro-step samples afresh, as the uninterrupted run does
            raise ValueError(
                f"Checkpoint {checkpoint} falls between two generations but has no {name} with the rollouts this "
                "process had not trained on yet (saved by another number of processes, with other "
                "steps_per_generation / num_iterations / gradient_accumulation_steps, or by a trainer that did not "
                "save them?). Resume with the launch setup and batch settings of the run that saved it, or from a "
                f"checkpoint at a multiple of steps_per_generation × num_iterations = {generate_every} micro-steps."
            )
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        saved = {
            key: int(metadata.get(key, -1))
            for key in ("num_processes", "steps_per_generation", "num_iterations")
        }
        now = {
            "num_processes": self.accelerator.num_processes,
            "steps_per_generation": self.args.steps_per_generation,
            "num_iterations": self.num_iterations,
        }
        for key, value in saved.items():
            if value != now[key]:
                raise ValueError(
                    f"Checkpoint {checkpoint} was saved between two generations with {key}={value}; resume it with "
                    f"{key}={value} (now {now[key]}), or from a checkpoint at a generation boundary."
                )
        if int(metadata.get("step", -1)) != self._step:
            raise ValueError(
                f"Checkpoint {checkpoint} was saved at micro-step {metadata.get('step')}, but global step "
                f"{self.state.global_step} × gradient_accumulation_steps={self.args.gradient_accumulation_steps} gives "
                f"{self._step}; resume with the gradient_accumulation_steps of the run that saved it."
            )
        buffered = _unflatten_rollouts(load_file(path), metadata.get("extras", "{}"), self.accelerator.device)
        rows = {chunk["prompt_ids"].shape[0] for chunk in buffered}
        if rows != {self.args.per_device_train_batch_size}:
            raise ValueError(
                f"Checkpoint {checkpoint} holds micro-batches of {sorted(rows)} rollouts, but "
                f"per_device_train_batch_size={self.args.per_device_train_batch_size}; resume with the saved value."
            )
        self._buffered_inputs = buffered

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """``Trainer._save`` with the training arguments written as ``training_args.json`` (not pickled):
        the model (a PEFT adapter or the full weights, safetensors), the processor and the arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Non-writing processes only take part when the model was sharded at load time (collective gathers).
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        from peft import PeftModel

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
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())


def _flatten_rollouts(chunks: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], str]:
    """The buffered micro-batches as ``{"<chunk>.<key>": tensor}`` for safetensors, plus the non-tensor
    entries (e.g. image counts of vision-language prompts) as JSON."""
    tensors, extras = {}, {}
    for i, chunk in enumerate(chunks):
        for key, value in chunk.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                extras[f"{i}.{key}"] = value
    try:
        return tensors, json.dumps(extras)
    except TypeError as err:
        raise ValueError(
            f"The buffered rollouts hold entries that cannot be checkpointed ({sorted(extras)}): {err}. Save "
            "checkpoints at multiples of steps_per_generation × num_iterations micro-steps."
        ) from err


def _unflatten_rollouts(tensors: dict[str, torch.Tensor], extras: str, device) -> list[dict[str, Any]]:
    """Inverse of :func:`_flatten_rollouts`."""
    entries = {key: value.to(device) for key, value in tensors.items()}
    entries.update(json.loads(extras))
    chunks: dict[int, dict[str, Any]] = {}
    for name, value in entries.items():
        index, key = name.split(".", 1)
        chunks.setdefault(int(index), {})[key] = value
    return [chunks[i] for i in sorted(chunks)]


def _prompt_text(prompt: Any) -> str:
    """A dataset prompt as plain text (conversational prompts: the text of the last user message)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        content = prompt[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise ValueError(
        "Janus prompts must be strings or conversations whose last message has text content; got "
        f"{type(prompt).__name__}."
    )


def _is_janus(model: Any) -> bool:
    from transformers import JanusForConditionalGeneration

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, JanusForConditionalGeneration)


def _load_janus_if_named(model: Any, args: IntrinsicGRPOConfig) -> Any:
    """Load a hub id / path whose config is a Janus model (TRL's loader targets causal LMs)."""
    if not isinstance(model, str):
        return model
    from transformers import AutoConfig, JanusForConditionalGeneration

    init_kwargs = dict(args.model_init_kwargs or {})
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    config = AutoConfig.from_pretrained(model, trust_remote_code=init_kwargs["trust_remote_code"])
    if config.model_type != "janus":
        return model
    return JanusForConditionalGeneration.from_pretrained(model, **init_kwargs)


def _prepare_janus(model: Any, args: IntrinsicGRPOConfig, peft_config: Any) -> Any:
    """Check a Janus model against the config, freeze what IRIS never trains, choose the adapter.

    Returns the ``peft_config`` to use (the default language-model LoRA when none is given and
    ``args.janus_lora``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    if getattr(inner, "generation_head", None) is None or getattr(inner, "vqmodel", None) is None:
        raise ValueError(
            "This Janus model has no image-generation head or VQ model; IRIS needs a Janus-Pro checkpoint with "
            "`model.generation_head` and `model.vqmodel` (e.g. deepseek-community/Janus-Pro-1B)."
        )
    own_tokens = janus_ops.janus_num_image_tokens(base)
    if args.image_token_num is not None and args.image_token_num != own_tokens:
        raise ValueError(
            f"`image_token_num`={args.image_token_num} but the model generates {own_tokens} image tokens; set "
            f"`image_token_num={own_tokens}` or leave it None."
        )
    own_size = janus_ops.janus_image_size(base)
    if args.image_size is not None and args.image_size != own_size:
        raise ValueError(
            f"`image_size`={args.image_size} but the model's VQ decoder produces {own_size}px images from "
            f"{own_tokens} tokens; set `image_size={own_size}` or leave it None."
        )
    if (
        args.top_k not in (0, None)
        or args.top_p != 1.0
        or args.min_p is not None
        or args.repetition_penalty != 1.0
    ):
        raise ValueError(
            "`top_k`, `top_p`, `min_p` and `repetition_penalty` are not supported for Janus rollouts (the CoT and "
            "image tokens are sampled with `temperature` / `image_temperature` only); leave them at their defaults."
        )
    # IRIS never trains the understanding path nor the image tokenizer.
    for module in (inner.vision_model, inner.aligner, inner.vqmodel, inner.generation_aligner):
        module.requires_grad_(False)
    if peft_config is None and args.janus_lora and not hasattr(model, "peft_config"):
        from peft import LoraConfig

        names = "|".join(args.janus_lora_target_modules)
        peft_config = LoraConfig(
            r=args.janus_lora_r,
            lora_alpha=args.janus_lora_alpha,
            lora_dropout=args.janus_lora_dropout,
            target_modules=rf".*language_model\..*\.({names})",
        )
    return peft_config
