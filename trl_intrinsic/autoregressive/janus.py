"""Janus-Pro rollouts for IRIS: a chain-of-thought from the text head, then image tokens from the generation head.

Sequence layout of one rollout (``B`` rows; ``P`` prompt, ``C`` CoT and ``N`` image tokens)::

    [pad … BOS prompt-template]  [CoT tokens … EOS]  [BOI]  [N image tokens]
     left-padded prompt (P)       text head           cond.  generation head

:func:`janus_rollout` samples it (used by ``IntrinsicGRPOTrainer`` and by the toy world's
``evaluate_janus``, so evaluation draws exactly what training draws) and :func:`training_layout` turns
it into the prompt / completion tensors GRPO trains on. Both loops below are explicit, with a KV
cache, and they compute the self-certainty of every sampled token from the raw (temperature 1,
conditional, unguided) logits they already produce, so the statistic costs no extra forward. Position
ids are ``cumsum(attention_mask) − 1`` everywhere, so the teacher-forced forward used for training
(:func:`janus_completion_logps`) sees exactly the positions the rollout saw.

Classifier-free guidance follows transformers' Janus ``generate``: the unconditional rows are the
conditional prefix with every token except BOS and BOI replaced by the pad token, and the sampled logits
are ``uncond + cfg_weight · (cond − uncond)``, divided by the image temperature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import DynamicCache

from trl_intrinsic.autoregressive.self_certainty import DEFAULT_CHUNK_SIZE, self_certainty

__all__ = [
    "DEFAULT_COT_TEMPLATE",
    "CoTSample",
    "ImageSample",
    "JanusRollout",
    "JanusTokens",
    "JanusTrainingLayout",
    "decode_images",
    "is_janus",
    "janus_completion_logps",
    "janus_image_size",
    "janus_num_image_tokens",
    "janus_prompt_ids",
    "janus_request",
    "janus_rollout",
    "left_pad",
    "load_janus_if_named",
    "position_ids_from_mask",
    "prepare_janus",
    "prompt_text",
    "restore_janus_generation_config",
    "sample_cot",
    "sample_image_tokens",
    "training_layout",
]

DEFAULT_COT_TEMPLATE = (
    'You are asked to generate an image from this prompt: "{prompt}". First describe, in one short '
    "paragraph, what the image should show: each object, its colour, shape, count and position, and the "
    "background. Keep the description faithful to the prompt."
)
"""The user message asking for the chain-of-thought; ``{prompt}`` is replaced by the dataset prompt."""


# ----------------------------------------------------------------------------------------------
# Models: recognise, load, prepare for IRIS
# ----------------------------------------------------------------------------------------------


def janus_num_image_tokens(model) -> int:
    """Image tokens per image of a ``JanusForConditionalGeneration`` (576 for Janus-Pro)."""
    return int(model.config.vision_config.num_image_tokens)


def janus_image_size(model) -> int:
    """Side in pixels of the images the VQ decoder produces from :func:`janus_num_image_tokens` tokens."""
    side = round(janus_num_image_tokens(model) ** 0.5)
    return side * 2 ** (len(model.config.vq_config.channel_multiplier) - 1)


def is_janus(model: Any) -> bool:
    """Whether ``model`` (possibly PEFT-wrapped) is a ``JanusForConditionalGeneration``."""
    from transformers import JanusForConditionalGeneration

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, JanusForConditionalGeneration)


def load_janus_if_named(
    model: Any, init_kwargs: dict[str, Any] | None = None, trust_remote_code: bool = False
):
    """Load a hub id / path whose config is a Janus model; anything else is returned as it is (TRL's loader
    targets causal LMs)."""
    if not isinstance(model, str):
        return model
    from transformers import AutoConfig, JanusForConditionalGeneration

    init_kwargs = dict(init_kwargs or {})
    init_kwargs.setdefault("trust_remote_code", trust_remote_code)
    config = AutoConfig.from_pretrained(model, trust_remote_code=init_kwargs["trust_remote_code"])
    if config.model_type != "janus":
        return model
    return JanusForConditionalGeneration.from_pretrained(model, **init_kwargs)


def prepare_janus(model: Any, args: Any, peft_config: Any) -> Any:
    """Check a Janus model against an ``IntrinsicGRPOConfig``, freeze what IRIS never trains, choose the adapter.

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
    own_tokens = janus_num_image_tokens(base)
    if args.image_token_num is not None and args.image_token_num != own_tokens:
        raise ValueError(
            f"`image_token_num`={args.image_token_num} but the model generates {own_tokens} image tokens; set "
            f"`image_token_num={own_tokens}` or leave it None."
        )
    own_size = janus_image_size(base)
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


def restore_janus_generation_config(model, processor):
    """Set the token ids Janus image generation reads from ``model.generation_config``.

    ``JanusForConditionalGeneration.generate(generation_mode="image")`` needs
    ``generation_config.generation_kwargs["boi_token_id"]`` (and BOS/PAD for the unconditional
    CFG branch), and ``save_pretrained`` does not write ``generation_kwargs``: call this after
    every ``from_pretrained`` of a Janus model. Works for any tokenizer with ``boi_token``
    (the real Janus-Pro tokenizers have it). Returns ``model``.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    boi_token = getattr(tokenizer, "boi_token", None)
    if boi_token is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no `boi_token`; pass the JanusProcessor (or its tokenizer) "
            "that belongs to this model."
        )
    config = model.generation_config
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    generation_kwargs = getattr(config, "generation_kwargs", None) or {}
    config.generation_kwargs = {**generation_kwargs, "boi_token_id": tokenizer.boi_token_id}
    return model


@dataclass(frozen=True)
class JanusTokens:
    """The special token ids of a rollout: ``bos`` starts every prompt, ``boi`` opens the image, ``pad`` pads,
    ``eos`` (any of them) ends the chain-of-thought."""

    bos: int
    boi: int
    pad: int
    eos: tuple[int, ...]

    @classmethod
    def of(cls, model, processor_or_tokenizer) -> JanusTokens:
        """The ids of ``model``'s tokenizer; ``eos`` holds the tokenizer's EOS and the generation config's, as
        TRL's ``GRPOTrainer`` stops text generation. Also records ``boi_token_id`` in
        ``model.generation_config.generation_kwargs`` when missing (``save_pretrained`` drops it)."""
        tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        if tokenizer.bos_token_id is None:
            raise ValueError("The Janus tokenizer has no `bos_token`; Janus prompts must start with BOS.")
        boi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
        config = model.generation_config
        config.generation_kwargs = {"boi_token_id": boi, **(getattr(config, "generation_kwargs", None) or {})}
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id not in eos:
            eos = [tokenizer.eos_token_id, *eos]
        return cls(bos=tokenizer.bos_token_id, boi=boi, pad=tokenizer.pad_token_id, eos=tuple(eos))


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def prompt_text(prompt: Any) -> str:
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


def janus_request(prompt: str, use_cot: bool, cot_template: str | None = None) -> str:
    """The user message of an IRIS rollout: the CoT request (``cot_template``, default
    :data:`DEFAULT_COT_TEMPLATE`) with ``use_cot``, else the prompt itself."""
    return (cot_template or DEFAULT_COT_TEMPLATE).format(prompt=prompt) if use_cot else prompt


def janus_prompt_ids(processor_or_tokenizer, text: str, bos_token_id: int | None = None) -> list[int]:
    """Token ids of one chat-formatted user request, as IRIS rollouts feed it to Janus (starts with BOS).

    With a chat template (on the processor or tokenizer) the request is one user turn with the generation
    prompt appended; without one, Janus-Pro's conversation format ``<|User|>: {text}\n\n<|Assistant|>:``.

    Args:
        processor_or_tokenizer: a ``JanusProcessor`` or its tokenizer.
        text: the user message (the CoT request built from ``cot_template``, or the bare prompt).
        bos_token_id: prepended when the tokenizer did not already start with it; default the
            tokenizer's ``bos_token_id``.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    bos = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
    if getattr(processor_or_tokenizer, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        ids = processor_or_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        ids = ids[0] if isinstance(ids[0], (list, torch.Tensor)) else ids
    else:  # Janus-Pro's conversation format, for processors saved without a chat template
        ids = tokenizer(f"<|User|>: {text}\n\n<|Assistant|>:")["input_ids"]
    ids = [int(i) for i in ids]
    return ids if ids and ids[0] == bos else [bos, *ids]


def left_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded into ``(ids, attention_mask)``, both (B, longest row) ``long`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), device=device)
            mask[i, width - len(r) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Sampling loops
# ----------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions ``cumsum(mask) − 1`` (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _step(model, embeds, attention_mask, cache) -> torch.Tensor:
    """One cached forward of the language model; returns the last position's hidden state (B, H)."""
    positions = position_ids_from_mask(attention_mask)[:, -embeds.shape[1] :]
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return out.last_hidden_state[:, -1]


@dataclass
class CoTSample:
    """Output of :func:`sample_cot`: ``ids`` (B, C) right-padded, ``mask`` (B, C), ``self_certainty`` (B, C)."""

    ids: torch.Tensor
    mask: torch.Tensor
    self_certainty: torch.Tensor


@torch.no_grad()
def sample_cot(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: list[int],
    pad_token_id: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    generator: torch.Generator | None = None,
) -> CoTSample:
    """Sample a chain-of-thought with the text head (``lm_head``), recording per-token self-certainty.

    Args:
        model: a ``JanusForConditionalGeneration`` (LoRA layers, if any, are used as they are).
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        max_new_tokens: at most this many CoT tokens; a row stops after its first EOS.
        temperature: sampling temperature (the self-certainty is always taken at temperature 1).

    Returns:
        A :class:`CoTSample`; tokens after a row's EOS are ``pad_token_id`` with mask 0 and self-certainty 0.
    """
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    eos = torch.tensor(eos_token_ids, device=device)
    cache = DynamicCache()
    attention_mask = prompt_mask.clone()
    embeds = model.get_input_embeddings()(prompt_ids)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ids, masks, scs = [], [], []
    for _ in range(max_new_tokens):
        hidden = _step(model, embeds, attention_mask, cache)
        logits = model.lm_head(hidden)
        alive = ~done
        scs.append(self_certainty(logits, alive, chunk_size=chunk_size))
        token = torch.where(
            alive,
            _sample(logits, temperature, generator),
            torch.full_like(done, pad_token_id, dtype=torch.long),
        )
        ids.append(token)
        masks.append(alive.long())
        done = done | torch.isin(token, eos)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, alive.long()[:, None]], dim=1)
        embeds = model.get_input_embeddings()(token[:, None])
    if not ids:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return CoTSample(empty, empty.clone(), torch.zeros(batch, 0, device=device))
    return CoTSample(torch.stack(ids, 1), torch.stack(masks, 1), torch.stack(scs, 1))


@dataclass
class ImageSample:
    """Output of :func:`sample_image_tokens`: ``ids`` (B, N) and ``self_certainty`` (B, N) (conditional logits)."""

    ids: torch.Tensor
    self_certainty: torch.Tensor


@torch.no_grad()
def sample_image_tokens(
    model,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    *,
    num_image_tokens: int,
    cfg_weight: float,
    temperature: float,
    bos_token_id: int,
    boi_token_id: int,
    pad_token_id: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    generator: torch.Generator | None = None,
) -> ImageSample:
    """Sample image tokens with the generation head under classifier-free guidance.

    Args:
        model: a ``JanusForConditionalGeneration``.
        prefix_ids, prefix_mask: (B, L) left-padded conditioning, ending with the BOI token.
        num_image_tokens: tokens to sample per image.
        cfg_weight: guidance weight; 1 samples from the conditional logits alone (no unconditional rows).
        temperature: applied to the guided logits.

    Returns:
        An :class:`ImageSample`; self-certainty comes from the conditional, unguided logits at temperature 1.
    """
    batch = prefix_ids.shape[0]
    guided = cfg_weight != 1.0
    if guided:
        keep = (prefix_ids == bos_token_id) | (prefix_ids == boi_token_id)
        uncond = torch.where(keep, prefix_ids, torch.full_like(prefix_ids, pad_token_id))
        input_ids = torch.cat([prefix_ids, uncond])
        attention_mask = torch.cat([prefix_mask, prefix_mask])
    else:
        input_ids, attention_mask = prefix_ids, prefix_mask
    cache = DynamicCache()
    embeds = model.get_input_embeddings()(input_ids)
    ids, scs = [], []
    for _ in range(num_image_tokens):
        hidden = _step(model, embeds, attention_mask, cache)
        logits = model.model.generation_head(hidden)
        cond = logits[:batch]
        scs.append(self_certainty(cond, chunk_size=chunk_size))
        mixed = logits[batch:] + cfg_weight * (cond - logits[batch:]) if guided else cond
        token = _sample(mixed, temperature, generator)
        ids.append(token)
        step_token = torch.cat([token, token]) if guided else token
        embeds = model.prepare_embeddings_for_image_generation(step_token[:, None])
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1
        )
    return ImageSample(torch.stack(ids, 1), torch.stack(scs, 1))


@torch.no_grad()
def decode_images(model, image_ids: torch.Tensor) -> list[PIL.Image.Image]:
    """Decode (B, N) image tokens with the VQ model to RGB PIL images (values in [-1, 1] mapped to 0…255)."""
    pixels = model.decode_image_tokens(image_ids).float()  # (B, H, W, 3) in [-1, 1]
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [PIL.Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


# ----------------------------------------------------------------------------------------------
# One IRIS rollout, and the layout GRPO trains on
# ----------------------------------------------------------------------------------------------


@dataclass
class JanusRollout:
    """Output of :func:`janus_rollout` for ``B`` prompts.

    Attributes:
        prompt_ids, prompt_mask: (B, P) left-padded chat-formatted requests.
        cot_rows: the CoT token ids of each row up to and including its EOS (empty without CoT).
        cot_text: the CoT of each row, decoded without special tokens ("" without CoT).
        cot_self_certainty: per row, the (len(cot_rows[i]),) self-certainty of its CoT tokens.
        image: the image tokens and their self-certainty (:class:`ImageSample`).
        images: the decoded RGB images.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    cot_rows: list[list[int]]
    cot_text: list[str]
    cot_self_certainty: list[torch.Tensor]
    image: ImageSample
    images: list[PIL.Image.Image]

    def self_certainty(self) -> tuple[list[float], list[float], list[float]]:
        """Per-row mean self-certainty over ``(CoT and image tokens, CoT tokens, image tokens)``; the CoT mean is
        NaN for a row without CoT tokens."""
        text = [float(v.mean()) if v.numel() else float("nan") for v in self.cot_self_certainty]
        image = self.image.self_certainty.mean(dim=1).tolist()
        both = [
            float(torch.cat([t, im]).mean())
            for t, im in zip(self.cot_self_certainty, self.image.self_certainty)
        ]
        return both, text, image


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Every submodule in eval mode inside the block, each back in its own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def janus_rollout(
    model,
    processor,
    prompts: Sequence[str],
    *,
    max_cot_tokens: int,
    use_cot: bool = True,
    cot_template: str | None = None,
    temperature: float = 1.0,
    cfg_weight: float = 5.0,
    image_temperature: float = 1.0,
    tokens: JanusTokens | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> JanusRollout:
    """Sample one IRIS rollout per prompt: the CoT request, the CoT (text head, up to EOS), BOI, the image
    tokens (generation head, classifier-free guidance), and decode the images.

    The model is sampled in eval mode (a gradient-checkpointed language model in training mode drops the KV
    cache the loops rely on, and dropout would make the samples off-policy) and left in its own modes.

    Args:
        model: a ``JanusForConditionalGeneration`` (LoRA layers, if any, are used as they are).
        processor: its ``JanusProcessor`` (or tokenizer).
        prompts: the image prompts.
        max_cot_tokens: at most this many CoT tokens (``max_completion_length`` in the trainer).
        use_cot: sample a CoT before the image; without it the request is the bare prompt.
        cot_template: the CoT request, ``{prompt}`` replaced by the prompt; default :data:`DEFAULT_COT_TEMPLATE`.
        temperature, image_temperature: sampling temperatures of the CoT and of the (guided) image tokens.
        cfg_weight: guidance weight of the image tokens (1 = none).
        tokens: the special ids; default :meth:`JanusTokens.of` the model and processor.
        chunk_size: see :func:`~trl_intrinsic.autoregressive.self_certainty.self_certainty`.
        generator: the random stream of both loops; equal generators give equal rollouts.
        device: where the token tensors live; default the model's device.
    """
    tokens = tokens or JanusTokens.of(model, processor)
    device = device if device is not None else model.device
    tokenizer = getattr(processor, "tokenizer", processor)
    rows = [janus_prompt_ids(processor, janus_request(p, use_cot, cot_template), tokens.bos) for p in prompts]
    prompt_ids, prompt_mask = left_pad(rows, tokens.pad, device)
    with _eval_mode(model):
        if use_cot:
            cot = sample_cot(
                model,
                prompt_ids,
                prompt_mask,
                max_new_tokens=max_cot_tokens,
                temperature=temperature,
                eos_token_ids=list(tokens.eos),
                pad_token_id=tokens.pad,
                chunk_size=chunk_size,
                generator=generator,
            )
            cot_rows = [row[m.bool()].tolist() for row, m in zip(cot.ids, cot.mask)]
            cot_sc = [row[m.bool()] for row, m in zip(cot.self_certainty, cot.mask)]
        else:
            cot_rows = [[] for _ in rows]
            cot_sc = [torch.zeros(0, device=device) for _ in rows]
        prefix_ids, prefix_mask = left_pad(
            [r + c + [tokens.boi] for r, c in zip(rows, cot_rows)], tokens.pad, device
        )
        image = sample_image_tokens(
            model,
            prefix_ids,
            prefix_mask,
            num_image_tokens=janus_num_image_tokens(model),
            cfg_weight=cfg_weight,
            temperature=image_temperature,
            bos_token_id=tokens.bos,
            boi_token_id=tokens.boi,
            pad_token_id=tokens.pad,
            chunk_size=chunk_size,
            generator=generator,
        )
        images = decode_images(model, image.ids)
    cot_text = tokenizer.batch_decode(cot_rows, skip_special_tokens=True)
    return JanusRollout(prompt_ids, prompt_mask, cot_rows, cot_text, cot_sc, image, images)


@dataclass
class JanusTrainingLayout:
    """The tensors GRPO trains a :class:`JanusRollout` on, named as TRL's ``GRPOTrainer`` names its inputs.

    ``prompt_ids``/``prompt_mask`` (B, P) left-padded; ``completion_ids``/``completion_mask`` (B, W) the CoT,
    BOI and image tokens, right-padded; ``tool_mask`` (B, W) 1 on the trained tokens (BOI is a template token:
    attended, never trained); ``mm_token_type_ids`` (B, P + W) 1 on image tokens.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    tool_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor


def training_layout(rollout: JanusRollout, tokens: JanusTokens) -> JanusTrainingLayout:
    """Lay a rollout out as prompt | CoT, BOI, image tokens (see :class:`JanusTrainingLayout`)."""
    prompt_ids = rollout.prompt_ids
    rows = [[*c, tokens.boi, *ids] for c, ids in zip(rollout.cot_rows, rollout.image.ids.tolist())]
    width = max(len(r) for r in rows)
    completion_ids = torch.full((len(rows), width), tokens.pad, dtype=torch.long, device=prompt_ids.device)
    completion_mask = torch.zeros_like(completion_ids)
    tool_mask = torch.zeros_like(completion_ids)
    image_type = torch.zeros_like(completion_ids)
    for i, (row, cot) in enumerate(zip(rows, rollout.cot_rows)):
        completion_ids[i, : len(row)] = torch.tensor(row, device=prompt_ids.device)
        completion_mask[i, : len(row)] = 1
        tool_mask[i, : len(cot)] = 1
        tool_mask[i, len(cot) + 1 : len(row)] = 1
        image_type[i, len(cot) + 1 : len(row)] = 1
    mm_token_type_ids = torch.cat([torch.zeros_like(prompt_ids), image_type], dim=1)
    return JanusTrainingLayout(
        prompt_ids, rollout.prompt_mask, completion_ids, completion_mask, tool_mask, mm_token_type_ids
    )


# ----------------------------------------------------------------------------------------------
# The training forward
# ----------------------------------------------------------------------------------------------


def janus_completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    compute_entropy: bool = False,
    batch_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced per-token log-probabilities of the last ``logits_to_keep`` tokens, text and image alike.

    Text tokens are embedded with the input embeddings and scored with ``lm_head``; image tokens
    (``image_token_mask`` = 1) are embedded with the generation embeddings + aligner and scored with the
    generation head, conditionally (no guidance), as IRIS trains them.

    Args:
        model: a ``JanusForConditionalGeneration``.
        input_ids: (B, L) prompt + completion ids; image-token ids index the image codebook.
        attention_mask: (B, L).
        image_token_mask: (B, L) 1 where ``input_ids`` holds an image token.
        logits_to_keep: number of trailing (completion) positions to score.
        compute_entropy: also return the per-token entropy of the scoring distribution.
        batch_size: rows per forward (default: all ``B`` at once).
        autocast: a context-manager factory entered around each forward (e.g. ``accelerator.autocast``).

    Returns:
        ``(logps, entropies)``, each (B, logits_to_keep) fp32 (``entropies`` is None unless requested).
    """
    batch_size = batch_size or input_ids.shape[0]
    logps, entropies = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        with autocast():
            lp, ent = _completion_logps(
                model,
                input_ids[rows],
                attention_mask[rows],
                image_token_mask[rows],
                logits_to_keep,
                compute_entropy,
            )
        logps.append(lp)
        entropies.append(ent)
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None


def _completion_logps(model, input_ids, attention_mask, image_token_mask, logits_to_keep, compute_entropy):
    is_image = image_token_mask.bool()
    text_embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
    image_embeds = model.prepare_embeddings_for_image_generation(
        input_ids.masked_fill(~is_image, 0).clamp(max=model.config.vq_config.num_embeddings - 1)
    )
    embeds = torch.where(is_image[..., None], image_embeds.to(text_embeds.dtype), text_embeds)
    hidden = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state
    hidden = hidden[:, -logits_to_keep - 1 : -1]
    targets = input_ids[:, -logits_to_keep:]
    target_is_image = is_image[:, -logits_to_keep:]
    logps = hidden.new_zeros(targets.shape, dtype=torch.float32)
    entropies = hidden.new_zeros(targets.shape, dtype=torch.float32) if compute_entropy else None
    for head, where in ((model.lm_head, ~target_is_image), (model.model.generation_head, target_is_image)):
        if not bool(where.any()):
            continue
        log_probs = torch.log_softmax(head(hidden[where]).float(), dim=-1)
        logps = logps.masked_scatter(where, log_probs.gather(-1, targets[where][:, None]).squeeze(-1))
        if compute_entropy:
            entropies = entropies.masked_scatter(where, -(log_probs.exp() * log_probs).sum(-1).detach())
    return logps, entropies
