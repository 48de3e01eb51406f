"""Janus-Pro rollouts for IRIS: a chain-of-thought from the text head, then image tokens from the generation head.

Sequence layout of one rollout (``B`` rows; ``P`` prompt, ``C`` CoT and ``N`` image tokens)::

    [pad … BOS prompt-template]  [CoT tokens … EOS]  [BOI]  [N image tokens]
     left-padded prompt (P)       text head           cond.  generation head

Both loops below are explicit, with a KV cache, and they compute the self-certainty of every sampled token
from the raw (temperature 1, conditional, unguided) logits they already produce, so the statistic costs no
extra forward. Position ids are ``cumsum(attention_mask) − 1`` everywhere, so the teacher-forced forward
used for training (:func:`janus_completion_logps`) sees exactly the positions the rollout saw.

Classifier-free guidance follows transformers' Janus ``generate``: the unconditional rows are the
conditional prefix with every token except BOS and BOI replaced by the pad token, and the sampled logits
are ``uncond + cfg_weight · (cond − uncond)``, divided by the image temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from transformers import DynamicCache

from trl_intrinsic.rewards.self_certainty import self_certainty

__all__ = [
    "decode_images",
    "janus_completion_logps",
    "janus_image_size",
    "janus_num_image_tokens",
    "janus_prompt_ids",
    "position_ids_from_mask",
    "sample_cot",
    "sample_image_tokens",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions ``cumsum(mask) − 1`` (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def janus_num_image_tokens(model) -> int:
    """Image tokens per image of a ``JanusForConditionalGeneration`` (576 for Janus-Pro)."""
    return int(model.config.vision_config.num_image_tokens)


def janus_image_size(model) -> int:
    """Side in pixels of the images the VQ decoder produces from :func:`janus_num_image_tokens` tokens."""
    side = round(janus_num_image_tokens(model) ** 0.5)
    return side * 2 ** (len(model.config.vq_config.channel_multiplier) - 1)


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
    chunk_size: int = 64,
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
    chunk_size: int = 64,
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


def janus_completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    compute_entropy: bool = False,
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

    Returns:
        ``(logps, entropies)``, each (B, logits_to_keep) fp32 (``entropies`` is None unless requested).
    """
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
