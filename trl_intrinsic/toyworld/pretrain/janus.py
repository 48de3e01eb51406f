"""Pretrain the toy Janus (``JanusForConditionalGeneration`` + ``JanusProcessor``) on toy-world renders.

Usage::

    python -m trl_intrinsic.toyworld.pretrain janus [--seed S] [--minutes M] [--max-steps N] \\
        [--vq-max-steps N] [--threads T] [--output DIR]

Two stages, both on images rendered on the fly from ``sample_metadata(split="train")``:

1. **VQ tokenizer.** A ``JanusVQVAE`` (2 downsamplings: 32×32 px ↔ 8×8 = 64 tokens, 512 codes of
   dimension 8) learns to reconstruct renders. Its own ``forward`` has no gradient path and
   ``get_codebook_entry`` (used by ``decode``) l2-normalises the codebook, so training runs its own
   quantisation: l2-normalised latents snap to the nearest l2-normalised code, gradients pass
   straight through, with codebook and commitment losses; coloured pixels weigh ×5 (or it settles on
   the white background) and codes unused for a while are reset to recent latents. The normalised
   codebook is what ships.
2. **Language model.** A Llama text model (hidden 128, 4 layers) with a word-level tokenizer learns
   the sequences an IRIS rollout produces (:mod:`trl_intrinsic.autoregressive.janus`): half the
   samples are ``[CoT request] [description … EOS] BOI [64 image tokens]`` — the request formatted
   by :func:`~trl_intrinsic.autoregressive.janus.janus_prompt_ids` from the default ``cot_template``,
   the description a deterministic account of the metadata
   (:func:`~trl_intrinsic.toyworld.evaluation.describe`) — and half are
   ``[bare prompt] BOI [64 image tokens]`` (IRIS without CoT). In a share of them everything between
   BOS and BOI is replaced by PAD, as the unconditional rows of classifier-free guidance are built.
   The text head learns the description, the generation head the image tokens (embedded with
   ``prepare_embeddings_for_image_generation``). The vision tower (understanding) is unused: it stays
   small, frozen and random.

The prompts of the held-out ``"test"`` split never appear in training; the accuracy reported at the
end (:func:`~trl_intrinsic.toyworld.evaluation.evaluate_janus`: the trainer's rollout, verifier) is measured
on them, with and without the chain-of-thought, on the fp16 weights reloaded by
:func:`~trl_intrinsic.toyworld.load_toy_janus`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from trl_intrinsic.autoregressive.janus import janus_prompt_ids, janus_request, position_ids_from_mask
from trl_intrinsic.toyworld.evaluation import describe, evaluate_janus
from trl_intrinsic.toyworld.models import JANUS_SAMPLING, load_toy_janus
from trl_intrinsic.toyworld.pretrain.common import (
    PretrainConfig,
    TrainStream,
    all_prompts,
    format_scores,
    render_batch,
    timed_log,
    to_pil,
)
from trl_intrinsic.toyworld.pretrain.components import janus_model
from trl_intrinsic.toyworld.scenes import TEST_TAGS, sample_metadata
from trl_intrinsic.toyworld.verifier import evaluate

__all__ = [
    "JanusPretrainConfig",
    "build_janus",
    "build_janus_tokenizer",
    "encode_image_tokens",
    "pretrain_janus",
]

SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
IMAGE_TOKENS = {
    "image_token": "<image_placeholder>",
    "boi_token": "<begin_of_image>",
    "eoi_token": "<end_of_image>",
}


TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
"""``LlamaConfig`` values of the toy Janus's language model (hidden 128, 4 layers)."""


@dataclass
class JanusPretrainConfig(PretrainConfig):
    """Settings of :func:`pretrain_janus`: :class:`~trl_intrinsic.toyworld.pretrain.common.PretrainConfig`
    (35 minutes, learning rate 1e-3, fewer evaluation prompts) plus the VQ stage (``vq_*``), the shares of
    CoT and unconditional sequences, the guidance sweep and the language model's size."""

    minutes: float = 35.0
    learning_rate: float = 1e-3
    eval_per_tag: int = 16
    final_eval_per_tag: int = 100
    vq_minutes: float = 10.0
    vq_target_accuracy: float = 0.95
    vq_check_every: int = 250
    vq_max_steps: int | None = None
    vq_batch_size: int = 16
    vq_learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1
    vq_commitment: float = 0.25
    vq_dead_code_every: int = 100
    cot_share: float = 0.5
    uncond_share: float = 0.1
    cfg_sweep: tuple[float, ...] = (3.0, 5.0, 7.0)
    cfg_sweep_per_tag: int = 24
    text: dict[str, Any] = field(default_factory=lambda: dict(TEXT_CONFIG))

    _stage1_minutes: ClassVar[tuple[str, ...]] = ("vq_minutes",)
    _stage1_counts: ClassVar[tuple[str, ...]] = ("vq_batch_size",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("cot_share", "uncond_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# Text: the word-level tokenizer
# ----------------------------------------------------------------------------------------------


def _training_texts() -> list[str]:
    """Every text the tokenizer must cover: both requests of every prompt (chat format) and every description."""
    texts = []
    for meta in all_prompts():
        for use_cot in (True, False):
            texts.append(f"<|User|>: {janus_request(meta['prompt'], use_cot)}\n\n<|Assistant|>:")
        texts.append(describe(meta))
    return texts


def build_janus_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` covering every toy-world request and description (prepends BOS).

    Words are split on whitespace and between word characters and punctuation (``tokenizers``'
    ``Whitespace`` pre-tokenizer); the vocabulary is every piece of :func:`_training_texts` plus BOS, EOS,
    PAD, UNK and Janus's ``<image_placeholder>``, ``<begin_of_image>``, ``<end_of_image>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in _training_texts() for w, _ in pre.pre_tokenize_str(text)})
    specials = [*SPECIAL_TOKENS.values(), *IMAGE_TOKENS.values()]
    vocab = {w: i for i, w in enumerate([*specials, *(w for w in words if w not in specials)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **SPECIAL_TOKENS, extra_special_tokens=dict(IMAGE_TOKENS)
    )


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_janus(seed: int = 0, **text_overrides: Any):
    """A randomly initialised toy ``JanusForConditionalGeneration`` and its ``JanusProcessor``.

    * VQ: ``JanusVQVAE`` with ``embed_dim=8, num_embeddings=512, latent_channels=32, base_channels=32,
      channel_multiplier=[1, 2, 2], num_res_blocks=1``: 32×32 px ↔ 8×8 = 64 tokens;
    * language model: Llama, hidden 128, 4 layers (``text_overrides`` replace any ``LlamaConfig`` value),
      vocabulary of :func:`build_janus_tokenizer`;
    * vision tower (understanding, unused here): 1 SigLIP layer of width 32 on 32×32 px, patch 4.

    Built by :func:`~trl_intrinsic.toyworld.pretrain.components.janus_model`, as the test model
    :func:`trl_intrinsic.testing.tiny_janus` is.
    """
    from transformers import LlamaConfig

    tokenizer = build_janus_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **{**TEXT_CONFIG, **text_overrides},
    )
    return janus_model(
        tokenizer,
        text_config,
        image_size=32,
        patch_size=4,
        vision=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0
        ),
        vq=dict(
            embed_dim=8,
            num_embeddings=512,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 2, 2],
            num_res_blocks=1,
        ),
        seed=seed,
    )


# ----------------------------------------------------------------------------------------------
# Stage 1: VQ tokenizer
# ----------------------------------------------------------------------------------------------


def _latents(vq, images: torch.Tensor) -> torch.Tensor:
    """l2-normalised encoder latents, (B, 8, h, w)."""
    return F.normalize(vq.quant_conv(vq.encoder(images)), dim=1)


def _nearest(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest normalised code of each normalised latent (N, D) -> (N,)."""
    return (flat @ F.normalize(codebook, dim=-1).T).argmax(-1)


@torch.no_grad()
def encode_image_tokens(vq, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) pixels in [-1, 1] -> (B, 64) image tokens, row-major, as ``vq.decode`` reads them."""
    z = _latents(vq, images)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return _nearest(flat, vq.quantize.embedding.weight).view(z.shape[0], -1)


@torch.no_grad()
def _vq_reconstruction_accuracy(vq, seed: int, n_per_tag: int = 16) -> float:
    """Verifier accuracy on encode → tokens → ``decode`` round trips of test-split renders."""
    test = sample_metadata(n_per_tag * len(TEST_TAGS), seed=seed, split="test")
    recon = vq.decode(encode_image_tokens(vq, render_batch(test, range(len(test)))))
    return evaluate(to_pil(recon), test)["overall"]


def _train_vq(vq, config: JanusPretrainConfig, log) -> dict[str, Any]:
    """Train ``vq`` on renders in place (straight-through on normalised latents and codes); normalises the codebook.

    Stops after ``config.vq_minutes`` (or ``vq_max_steps``), or earlier once the verifier accepts
    ``config.vq_target_accuracy`` of the reconstructions (checked every ``vq_check_every`` steps).
    """
    stream = TrainStream(config.seed + 11, config.train_tags)
    params = [p for name, p in vq.named_parameters() if not name.startswith("quantize.")]
    codebook = vq.quantize.embedding.weight
    optimizer = torch.optim.AdamW(
        [{"params": params}, {"params": [codebook]}], lr=config.vq_learning_rate, weight_decay=0.0
    )
    usage = torch.zeros(codebook.shape[0])
    vq.train()
    start, step, loss, recon_acc, resets = time.monotonic(), 0, None, float("nan"), 0
    history = []
    while time.monotonic() - start < config.vq_minutes * 60 and (
        config.vq_max_steps is None or step < config.vq_max_steps
    ):
        images = render_batch(*stream.next(config.vq_batch_size))
        z = _latents(vq, images)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = F.normalize(codebook, dim=-1)
        index = _nearest(flat.detach(), codebook)
        quant = codes[index]
        commitment = F.mse_loss(flat, quant.detach())
        codebook_loss = F.mse_loss(quant, flat.detach())
        straight = flat + (quant - flat).detach()
        straight = straight.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        recon = vq.decoder(vq.post_quant_conv(straight))
        # Coloured pixels (anything not white) weigh 5x: otherwise the background dominates.
        weight = 1.0 + 4.0 * (images.min(dim=1, keepdim=True).values < 0.9).float()
        loss = (weight * (recon - images) ** 2).mean() + codebook_loss + config.vq_commitment * commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        usage += torch.bincount(index, minlength=codebook.shape[0]).float()
        if step % config.vq_dead_code_every == 0:
            dead = (usage == 0).nonzero().squeeze(-1)
            if len(dead):  # restart unused codes at recent latents
                pick = torch.randint(len(flat), (len(dead),))
                with torch.no_grad():
                    codebook[dead] = flat.detach()[pick] + 0.01 * torch.randn(len(dead), flat.shape[1])
                resets += len(dead)
            usage.zero_()
        if step % config.vq_check_every == 0:
            vq.eval()
            recon_acc = _vq_reconstruction_accuracy(vq, config.seed + 13)
            vq.train()
            history.append({"step": step, "loss": loss.item(), "recon_accuracy": recon_acc})
            log(
                f"vq step {step}: loss {loss.item():.4f}, verifier accuracy on reconstructions {recon_acc:.3f}"
            )
            if recon_acc >= config.vq_target_accuracy:
                break
    vq.eval()
    with torch.no_grad():  # ship the normalised codebook: `decode` normalises it anyway
        codebook.copy_(F.normalize(codebook, dim=-1))
    recon_acc = _vq_reconstruction_accuracy(vq, config.seed + 14, n_per_tag=32)
    metas, seeds = TrainStream(config.seed + 12, config.train_tags).next(256)
    used = encode_image_tokens(vq, render_batch(metas, seeds)).unique().numel()
    log(
        f"vq done: {step} steps ({(time.monotonic() - start) / 60:.1f} min), verifier accuracy on "
        f"reconstructions {recon_acc:.3f}, {used} codes used on 256 renders"
    )
    return {
        "vq_steps": step,
        "vq_minutes": (time.monotonic() - start) / 60,
        "vq_loss": float("nan") if loss is None else loss.item(),
        "vq_recon_accuracy": recon_acc,
        "vq_codes_used": used,
        "vq_dead_code_resets": resets,
        "vq_history": history,
    }


# ----------------------------------------------------------------------------------------------
# Stage 2: language model
# ----------------------------------------------------------------------------------------------


class _Sequences:
    """Token ids of requests and descriptions, cached per prompt."""

    def __init__(self, processor):
        tokenizer = processor.tokenizer
        self.processor = processor
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.boi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
        self._tokenizer = tokenizer
        self._cache: dict[tuple[str, bool], tuple[list[int], list[int]]] = {}

    def parts(self, meta: dict, use_cot: bool) -> tuple[list[int], list[int]]:
        """``(request ids, CoT ids + EOS)``; the CoT is empty without ``use_cot``."""
        key = (meta["prompt"], use_cot)
        if key not in self._cache:
            request = janus_prompt_ids(self.processor, janus_request(meta["prompt"], use_cot), self.bos)
            cot = []
            if use_cot:
                cot = [*self._tokenizer(describe(meta), add_special_tokens=False)["input_ids"], self.eos]
            self._cache[key] = (request, cot)
        return self._cache[key]


def _batch(seqs: _Sequences, metas, image_tokens: torch.Tensor, use_cot, uncond):
    """Right-padded training batch: ids, is_image, attention mask, text and image target masks (B, L)."""
    rows, images, texts = [], [], []
    for meta, tokens, cot_on, drop in zip(metas, image_tokens.tolist(), use_cot, uncond):
        request, cot = seqs.parts(meta, bool(cot_on))
        prefix = [*request, *cot]
        if drop:  # unconditional: everything between BOS and BOI is padding, nothing to say
            prefix = [seqs.bos] + [seqs.pad] * (len(prefix) - 1)
        rows.append([*prefix, seqs.boi, *tokens])
        images.append((len(prefix) + 1, len(tokens)))
        texts.append((len(request), 0 if drop else len(cot)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), seqs.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    is_text_target = torch.zeros_like(is_image)
    for i, (row, (i0, n_img), (t0, n_txt)) in enumerate(zip(rows, images, texts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        is_image[i, i0 : i0 + n_img] = True
        is_text_target[i, t0 : t0 + n_txt] = True
    return ids, is_image, mask, is_text_target


def _lm_loss(model, ids, is_image, mask, is_text_target) -> tuple[torch.Tensor, torch.Tensor]:
    """(text loss on the CoT tokens, image loss on the image tokens), teacher-forced."""
    text_embeds = model.get_input_embeddings()(ids.masked_fill(is_image, 0))
    image_embeds = model.prepare_embeddings_for_image_generation(ids.masked_fill(~is_image, 0))
    embeds = torch.where(is_image[..., None], image_embeds, text_embeds)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).last_hidden_state[:, :-1]
    targets = ids[:, 1:]
    text_at, image_at = is_text_target[:, 1:], is_image[:, 1:]
    text_loss = F.cross_entropy(model.lm_head(hidden[text_at]), targets[text_at])
    image_loss = F.cross_entropy(model.model.generation_head(hidden[image_at]), targets[image_at])
    return text_loss, image_loss


def _train_lm(model, processor, config: JanusPretrainConfig, log, deadline: float) -> dict[str, Any]:
    """Train the language model and generation head/embeddings until ``deadline`` or ``max_steps``."""
    seqs = _Sequences(processor)
    vq = model.model.vqmodel
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("model.vqmodel.", "model.vision_model.", "model.aligner.")))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, config.warmup_steps))
        if config.max_steps is None:
            return warm
        progress = min(1.0, s / max(1, config.max_steps))
        return warm * (
            config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    stream = TrainStream(config.seed + 21, config.train_tags)
    rng = np.random.default_rng(config.seed + 22)
    model.train()
    vq.eval()
    history: list[dict[str, Any]] = []
    start = time.monotonic()
    next_eval = config.eval_every_minutes * 60
    step, running_text, running_image = 0, None, None
    while time.monotonic() < deadline and (config.max_steps is None or step < config.max_steps):
        metas, seeds = stream.next(config.batch_size)
        tokens = encode_image_tokens(vq, render_batch(metas, seeds))
        use_cot = rng.random(len(metas)) < config.cot_share
        uncond = rng.random(len(metas)) < config.uncond_share
        text_loss, image_loss = _lm_loss(model, *_batch(seqs, metas, tokens, use_cot, uncond))
        loss = text_loss + image_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        running_text = (
            text_loss.item() if running_text is None else 0.98 * running_text + 0.02 * text_loss.item()
        )
        running_image = (
            image_loss.item() if running_image is None else 0.98 * running_image + 0.02 * image_loss.item()
        )
        if step % 100 == 0:
            log(f"lm step {step}: text loss {running_text:.3f}, image loss {running_image:.3f}")
        elapsed = time.monotonic() - start
        if config.eval_every_minutes > 0 and elapsed >= next_eval:
            next_eval += config.eval_every_minutes * 60
            entry: dict[str, Any] = {"step": step, "minutes": elapsed / 60}
            entry |= {"text_loss": running_text, "image_loss": running_image}
            for use in (True, False):
                scores = evaluate_janus(
                    model, processor, n_per_tag=config.eval_per_tag, seed=config.seed + 1000, use_cot=use
                )
                entry["cot" if use else "no_cot"] = scores
                log(
                    f"step {step} ({elapsed / 60:.1f} min), {'with' if use else 'without'} CoT: {format_scores(scores)}"
                )
            history.append(entry)
            model.train()
            vq.eval()
    model.eval()
    return {
        "steps": step,
        "train_minutes": (time.monotonic() - start) / 60,
        "text_loss": running_text,
        "image_loss": running_image,
        "history": history,
    }


def _sizes(output_dir: Path) -> float:
    return sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file()) / 2**20


def pretrain_janus(output_dir: str | Path, config: JanusPretrainConfig | None = None) -> dict[str, Any]:
    """Train the toy Janus and save it to ``output_dir`` (fp16 safetensors + processor), with ``metrics.json``.

    Returns:
        The metrics written to ``metrics.json``: config, training statistics, the final test accuracy
        with and without CoT (``"test_accuracy"``: ``{"cot": …, "no_cot": …}``, :func:`evaluate_janus`
        with :data:`JANUS_SAMPLING` and ``config.final_eval_per_tag`` prompts per tag, on the saved
        weights reloaded with :func:`load_toy_janus`), a guidance sweep on the train split and the
        total wall time in minutes.
    """
    config = config or JanusPretrainConfig()
    output_dir = Path(output_dir)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    wall_start = time.monotonic()

    log = timed_log(wall_start)
    model, processor = build_janus(config.seed, **config.text)
    tokenizer = processor.tokenizer
    longest = max(
        len(janus_prompt_ids(processor, janus_request(m["prompt"], True), tokenizer.bos_token_id))
        + len(tokenizer(describe(m), add_special_tokens=False)["input_ids"])
        + 1
        for m in all_prompts()
    )
    longest_cot = max(
        len(tokenizer(describe(m), add_special_tokens=False)["input_ids"]) + 1 for m in all_prompts()
    )
    n_image = int(model.config.vision_config.num_image_tokens)
    if longest + 1 + n_image > model.config.text_config.max_position_embeddings:
        raise ValueError(
            f"the longest sequence ({longest + 1 + n_image} tokens) exceeds max_position_embeddings"
        )
    if longest_cot > JANUS_SAMPLING["max_cot_tokens"]:
        raise ValueError(
            f"the longest description takes {longest_cot} tokens > JANUS_SAMPLING['max_cot_tokens']"
        )
    unknown = [
        t for text in _training_texts() for t in [tokenizer(text)["input_ids"]] if tokenizer.unk_token_id in t
    ]
    if unknown:
        raise ValueError(f"{len(unknown)} toy-world texts contain unknown words")
    counts = {
        "vq": sum(p.numel() for p in model.model.vqmodel.parameters()),
        "all": sum(p.numel() for p in model.parameters()),
    }
    log(
        f"janus: {counts['all'] / 1e6:.2f} M parameters ({counts['vq'] / 1e6:.2f} M VQ), vocabulary "
        f"{len(tokenizer)}, longest sequence {longest + 1 + n_image} tokens (CoT ≤ {longest_cot})"
    )
    metrics: dict[str, Any] = {
        "config": asdict(config),
        "parameters": counts,
        "vocabulary": len(tokenizer),
        "longest_sequence": longest + 1 + n_image,
        "longest_cot": longest_cot,
    }
    deadline = time.monotonic() + config.minutes * 60
    metrics |= _train_vq(model.model.vqmodel, config, log)
    metrics |= _train_lm(model, processor, config, log, deadline)

    # Ship fp16 weights; measure the accuracy of exactly what ships, reloaded.
    output_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    log(f"saved to {output_dir} ({_sizes(output_dir):.1f} MB)")
    shipped, shipped_processor = load_toy_janus(output_dir)
    eval_seed = config.seed + 2000
    final = {}
    for use in (True, False):
        scores = evaluate_janus(
            shipped, shipped_processor, n_per_tag=config.final_eval_per_tag, seed=eval_seed, use_cot=use
        )
        final["cot" if use else "no_cot"] = scores
        log(
            f"final test accuracy {'with' if use else 'without'} CoT ({config.final_eval_per_tag} prompts per tag): "
            f"{format_scores(scores)}"
        )
    sweep = {}
    for weight in config.cfg_sweep:
        scores = evaluate_janus(
            shipped,
            shipped_processor,
            n_per_tag=config.cfg_sweep_per_tag,
            seed=config.seed + 3000,
            split="train",
            cfg_weight=weight,
        )
        sweep[str(weight)] = scores
        log(f"train split, cfg_weight {weight}, with CoT: {format_scores(scores)}")
    metrics["test_accuracy"] = final
    metrics["train_cfg_sweep"] = sweep
    metrics["sampling"] = JANUS_SAMPLING
    metrics["eval_seed"] = eval_seed
    metrics["size_mb"] = _sizes(output_dir)
    metrics["wall_minutes"] = (time.monotonic() - wall_start) / 60
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"done in {metrics['wall_minutes']:.1f} min")
    return metrics
