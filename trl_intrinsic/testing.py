"""Tiny, seeded, offline models for tests, examples and debugging.

Every factory here builds real ``transformers`` / ``diffusers`` classes from small configs — no
download, no hub id — so the result behaves exactly like a pretrained checkpoint of the same
family: it runs the real forward, ``save_pretrained`` writes the usual files, and the normal
``from_pretrained(local_dir)`` reloads it offline. The weights are random (seeded), so outputs
are meaningless but deterministic.

Tokenizers are built locally too. Each one has whole-word tokens for a small built-in word list
(the words of GenEval-style prompts) and a character- or byte-level fallback, so any English
prompt tokenizes without unknown tokens.

Factories never touch the caller's random state: weights are drawn inside
``torch.random.fork_rng``. The pieces shared with the pretraining of the toy models (the CLIP
tokenizer, the ``AutoencoderKL``, the SD3 pipeline, the Janus model) are built by
:mod:`trl_intrinsic.toyworld.pretrain.components`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trl_intrinsic.autoregressive.janus import restore_janus_generation_config
from trl_intrinsic.toyworld.pretrain.components import WORDS as _WORDS
from trl_intrinsic.toyworld.pretrain.components import autoencoder_kl as _tiny_autoencoder_kl
from trl_intrinsic.toyworld.pretrain.components import clip_text_config as _tiny_clip_text_config
from trl_intrinsic.toyworld.pretrain.components import clip_tokenizer as _clip_tokenizer
from trl_intrinsic.toyworld.pretrain.components import janus_model, sd3_pipeline
from trl_intrinsic.toyworld.pretrain.components import merged_config as _merged_config
from trl_intrinsic.toyworld.pretrain.components import seeded as _seeded
from trl_intrinsic.toyworld.pretrain.components import word_merges as _word_merges

__all__ = [
    "restore_janus_generation_config",
    "tiny_causal_lm",
    "tiny_flux_pipeline",
    "tiny_janus",
    "tiny_sana_pipeline",
    "tiny_sd3_pipeline",
]

# Printable ASCII: the character-level fallback of the sentencepiece-style tokenizers.
_ASCII_CHARS: tuple[str, ...] = tuple(chr(c) for c in range(33, 127))
_METASPACE = "▁"


# ----------------------------------------------------------------------------------------------
# Tokenizers: one small builder per family, sharing the merge-table construction.
# ----------------------------------------------------------------------------------------------


def _t5_tokenizer():
    """A ``T5Tokenizer`` (Unigram): whole words beat spelling them out, ASCII characters as fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_METASPACE, -5.0)]
    pieces += [(c, -10.0) for c in _ASCII_CHARS]
    pieces += [(_METASPACE + c, -10.0) for c in _ASCII_CHARS]
    pieces += [(_METASPACE + w, -1.0) for w in _WORDS if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _tiny_t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _metaspace_bpe_vocab(special_tokens: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a sentencepiece-style BPE with byte fallback (Llama, Gemma).

    Layout: special tokens, the 256 byte tokens ``<0x00>``…``<0xFF>``, ``▁``, printable ASCII, then
    the ``▁word`` and ``word`` tokens of the built-in word list (Gemma adds no ``▁`` before the
    first word of a text).
    """
    words, merges = _word_merges([*(_METASPACE + w for w in _WORDS), *_WORDS], list)
    bytes_ = (f"<0x{b:02X}>" for b in range(256))
    pieces = [*special_tokens, *bytes_, _METASPACE, *_ASCII_CHARS, *words]
    return {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}, merges


def _llama_tokenizer(chat_template: str | None = None, **named_special_tokens: str):
    """A ``LlamaTokenizer`` (fast, byte fallback) that prepends BOS; ``<pad>`` is the padding token.

    ``named_special_tokens`` (e.g. ``image_token="<image_placeholder>"``) become attributes of the
    tokenizer and single, never-split tokens.
    """
    from transformers import LlamaTokenizer

    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    vocab, merges = _metaspace_bpe_vocab([*specials.values(), *named_special_tokens.values()])
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        chat_template=chat_template,
        **specials,
        **named_special_tokens,
    )


def _gemma_tokenizer():
    """A ``GemmaTokenizer`` (fast, byte fallback) that prepends ``<bos>``, as Gemma 2 checkpoints do."""
    from transformers import GemmaTokenizer

    specials = {
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "bos_token": "<bos>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }
    vocab, merges = _metaspace_bpe_vocab(specials.values())
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, **specials)


def _tiny_llama_config(tokenizer, hidden_size: int, **overrides: Any):
    """A 2-layer ``LlamaConfig`` sized to ``tokenizer``; ``overrides`` replace any default."""
    from transformers import LlamaConfig

    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaConfig(**_merged_config(defaults, overrides, LlamaConfig, "LlamaConfig"))


# ----------------------------------------------------------------------------------------------
# Diffusers pipelines
# ----------------------------------------------------------------------------------------------


def tiny_sd3_pipeline(seed: int = 0, *, with_t5: bool = False, **overrides: Any):
    """A tiny random ``StableDiffusion3Pipeline`` (about 0.2 M parameters) that runs at 32×32 px.

    Components: ``SD3Transformer2DModel`` (2 layers, 4 heads × 8, patch 2 on 16×16×4 latents,
    i.e. 64 image tokens), a tiny ``AutoencoderKL`` (×2 downsampling, ``scaling_factor=1``,
    ``shift_factor=0``), two ``CLIPTextModelWithProjection`` (hidden 32, projection 32, so the
    pooled embedding has 64 = 2 × 32 dims) with locally built ``CLIPTokenizer``s
    (``model_max_length=77``), by default no T5 (``text_encoder_3=None``), and a
    ``FlowMatchEulerDiscreteScheduler`` with ``shift=3.0``.

    Without T5 the pipeline appends ``max_sequence_length`` (default 256) all-zero tokens to the
    77 CLIP tokens; pass ``max_sequence_length=1`` (or any small number) to keep calls cheap. The
    outputs are valid either way. diffusers does not record absent components as optional, so a
    T5-less pipeline saved with ``save_pretrained`` reloads with
    ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``.

    Args:
        seed: seeds the weights; the caller's RNG state is left untouched.
        with_t5: add a tiny ``T5EncoderModel`` (d_model = ``joint_attention_dim``) and a locally
            built ``T5Tokenizer`` as the third text encoder, like the released SD3 checkpoints.
        **overrides: ``SD3Transformer2DModel`` config values replacing the defaults, e.g.
            ``num_layers=4``. ``joint_attention_dim`` must stay ≥ 64 (the two CLIP hidden states
            are concatenated) and ``pooled_projection_dim`` must stay 64.

    Returns:
        A ``StableDiffusion3Pipeline`` in fp32 on CPU. ``pipe("a red circle", num_inference_steps=2,
        height=32, width=32)`` returns 32×32 PIL images.
    """

    def t5(d_model: int):
        tokenizer = _t5_tokenizer()
        return tokenizer, _tiny_t5_encoder(tokenizer, d_model)

    return sd3_pipeline(seed, third_text_encoder=t5 if with_t5 else None, **overrides)


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = True, **overrides: Any):
    """A tiny random ``FluxPipeline`` that runs at 32×32 px.

    Components: ``FluxTransformer2DModel`` (1 double-stream + 1 single-stream block, 4 heads × 8,
    RoPE axes (2, 2, 4)) on 16-channel latents packed 2×2 into 64-channel tokens (64 tokens at
    32 px), a tiny ``AutoencoderKL`` with 16 latent channels (×2 downsampling, ``scaling_factor=1``,
    ``shift_factor=0``), a ``CLIPTextModel`` (hidden 32 = ``pooled_projection_dim``) with a locally
    built ``CLIPTokenizer``, a ``T5EncoderModel`` (d_model 32 = ``joint_attention_dim``) with a
    locally built ``T5Tokenizer``, and a ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's
    resolution-dependent shift (``use_dynamic_shifting=True``, base/max shift 0.5/1.15).

    Args:
        seed: seeds the weights; the caller's RNG state is left untouched.
        guidance_embeds: embed the guidance scale like FLUX.1-dev (``True``) or not, like
            FLUX.1-schnell (``False``).
        **overrides: ``FluxTransformer2DModel`` config values replacing the defaults. Keep
            ``sum(axes_dims_rope) == attention_head_dim``.

    Returns:
        A ``FluxPipeline`` in fp32. ``pipe("a red circle", num_inference_steps=2, height=32,
        width=32, max_sequence_length=16)`` returns 32×32 PIL images.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    config = _merged_config(
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        ),
        overrides,
        FluxTransformer2DModel,
        "FluxTransformer2DModel",
    )
    with _seeded(seed):
        tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
        clip_config = _tiny_clip_text_config(tokenizer, hidden_size=config["pooled_projection_dim"])
        text_encoder = CLIPTextModel(clip_config).eval()
        text_encoder_2 = _tiny_t5_encoder(tokenizer_2, d_model=config["joint_attention_dim"])
        transformer = FluxTransformer2DModel(**config)
        vae = _tiny_autoencoder_kl(latent_channels=config["in_channels"] // 4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_sana_pipeline(seed: int = 0, **overrides: Any):
    """A tiny random ``SanaPipeline`` that runs at 32×32 px.

    Components: ``SanaTransformer2DModel`` (1 layer, 2 heads × 16 for self- and cross-attention,
    patch 1 on 8×8×8 latents, i.e. 64 image tokens), a tiny ``AutoencoderDC`` (3 stages, ×4
    downsampling, 8 latent channels, ``scaling_factor=1``), a ``Gemma2Model`` text encoder
    (hidden 32 = ``caption_channels``, 2 layers) with a locally built ``GemmaTokenizer`` (BOS
    prepended; the pipeline itself sets right padding), and a ``FlowMatchEulerDiscreteScheduler``
    with ``shift=3.0`` (Sana ships a flow-prediction DPM-Solver; Euler gives the explicit
    ``sigmas`` flow-GRPO needs).

    Sana's ``__call__`` defaults suit 1024 px checkpoints: at 32 px pass
    ``use_resolution_binning=False`` (otherwise the size is snapped to a 512–4096 px bucket), and
    ``complex_human_instruction=None`` plus a small ``max_sequence_length`` keep the text encoder
    cheap (the long default instruction is still valid, just slower).

    Args:
        seed: seeds the weights; the caller's RNG state is left untouched.
        **overrides: ``SanaTransformer2DModel`` config values replacing the defaults.

    Returns:
        A ``SanaPipeline`` in fp32. ``pipe("a red circle", num_inference_steps=2, height=32,
        width=32, use_resolution_binning=False)`` returns 32×32 PIL images.
    """
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    latent_channels, text_hidden = 8, 32
    config = _merged_config(
        dict(
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=1,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=text_hidden,
            mlp_ratio=2.0,
            sample_size=8,
            patch_size=1,
        ),
        overrides,
        SanaTransformer2DModel,
        "SanaTransformer2DModel",
    )
    tokenizer = _gemma_tokenizer()
    text_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        sliding_window=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        text_encoder = Gemma2Model(text_config).eval()
        transformer = SanaTransformer2DModel(**config)
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=latent_channels,
            attention_head_dim=8,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=(8, 16, 16),
            decoder_block_out_channels=(8, 16, 16),
            encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), ()),
            decoder_qkv_multiscales=((), (), ()),
            scaling_factor=1.0,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# ----------------------------------------------------------------------------------------------
# Transformers models
# ----------------------------------------------------------------------------------------------

# A minimal role-tagged chat format: ``<s><|user|>\n…</s>\n<|assistant|>\n…</s>\n``.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def tiny_causal_lm(seed: int = 0, **overrides: Any):
    """A tiny random ``LlamaForCausalLM`` (about 50 k parameters) and its fast tokenizer.

    The tokenizer (about 560 tokens: whole words for a small built-in list, ASCII characters and
    a byte fallback, so any text round-trips) prepends BOS, pads with ``<pad>`` and has a chat
    template with ``system``/``user``/``assistant`` roles, so TRL's ``GRPOTrainer`` accepts both
    standard and conversational prompts.

    Args:
        seed: seeds the weights; the caller's RNG state is left untouched.
        **overrides: ``LlamaConfig`` values replacing the defaults (hidden 32, 2 layers, 4 heads,
            2 key/value heads), e.g. ``num_hidden_layers=4``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in fp32 whose ``generation_config`` carries the
        tokenizer's BOS/EOS/PAD ids, and a ``PreTrainedTokenizerFast`` (``LlamaTokenizer``).
    """
    from transformers import LlamaForCausalLM

    roles = {f"{r}_role_token": f"<|{r}|>" for r in ("system", "user", "assistant")}
    tokenizer = _llama_tokenizer(chat_template=_CHAT_TEMPLATE, **roles)
    config = _tiny_llama_config(tokenizer, hidden_size=overrides.pop("hidden_size", 32), **overrides)
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    _set_special_token_ids(model.generation_config, tokenizer)
    return model, tokenizer


def _set_special_token_ids(generation_config, tokenizer) -> None:
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id


def tiny_janus(seed: int = 0):
    """A tiny random ``JanusForConditionalGeneration`` (about 0.56 M parameters) and its ``JanusProcessor``.

    * language model: Llama, hidden 64, 2 layers; vocabulary of about 560 tokens (see
      :func:`tiny_causal_lm`) plus ``<image_placeholder>``, ``<begin_of_image>``, ``<end_of_image>``;
    * understanding: SigLIP-style vision tower on 64×64 px images, patch 16 → 16 image tokens;
    * generation: ``JanusVQVAE`` with 64 codes (``embed_dim=8``), 16 image tokens per image on a
      4×4 grid decoded to 32×32 px (three ×2 upsamplings), generation head over the 64 codes;
    * processor: ``JanusImageProcessorPil`` (no torchvision needed) at 64 px and
      ``num_image_tokens=16``.

    ``model.generation_config`` is ready for both modes (see
    :func:`restore_janus_generation_config`, which must be called again after a reload).
    ``model.generate(**processor(text=[...], generation_mode="image"), generation_mode="image",
    guidance_scale=…, do_sample=True)`` returns ``(B, 16)`` image tokens;
    ``model.decode_image_tokens(tokens)`` returns ``(B, 32, 32, 3)`` channels-last pixels, nominally
    in [-1, 1] (random weights overshoot). Convert them to images yourself:
    ``JanusImageProcessorPil.postprocess`` expects channels-first input and fails on them.

    Args:
        seed: seeds the weights; the caller's RNG state is left untouched.

    Returns:
        ``(model, processor)`` in fp32.
    """
    tokenizer = _llama_tokenizer(
        image_token="<image_placeholder>", boi_token="<begin_of_image>", eoi_token="<end_of_image>"
    )
    return janus_model(
        tokenizer,
        _tiny_llama_config(tokenizer, hidden_size=64),
        image_size=64,
        patch_size=16,
        vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2.0),
        vq=dict(
            embed_dim=8,
            num_embeddings=64,
            latent_channels=32,
            base_channels=32,  # GroupNorm uses 32 groups
            channel_multiplier=[1, 1, 1, 1],  # 3 downsamplings: 32 px <-> 4×4 tokens
            num_res_blocks=1,
        ),
        seed=seed,
    )
