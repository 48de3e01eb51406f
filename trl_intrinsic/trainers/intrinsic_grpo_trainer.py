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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from trl import GRPOTrainer

from trl_intrinsic.rewards.self_certainty import self_certainty
from trl_intrinsic.trainers.intrinsic_grpo_config import IntrinsicGRPOConfig

__all__ = ["IntrinsicGRPOTrainer"]


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
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self._pending_self_certainty: list[torch.Tensor] = []

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
