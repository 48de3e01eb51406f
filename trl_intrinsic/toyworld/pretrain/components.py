"""Building blocks of small, seeded, offline ``transformers`` / ``diffusers`` models.

The toy models are pretrained from these (:mod:`~trl_intrinsic.toyworld.pretrain.flow`,
:mod:`~trl_intrinsic.toyworld.pretrain.janus`), and :mod:`trl_intrinsic.testing` builds its tiny test
models from the same pieces: word-level BPE tokenizers built locally, a small ``AutoencoderKL``, a T5-less
``StableDiffusion3Pipeline`` and a ``JanusForConditionalGeneration`` from small configs. Weights are drawn
inside :func:`seeded`, so builders never touch the caller's random state.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import pairwise
from typing import Any

import torch

__all__ = [
    "WORDS",
    "autoencoder_kl",
    "clip_text_config",
    "clip_tokenizer",
    "janus_model",
    "merged_config",
    "sd3_pipeline",
    "seeded",
    "word_merges",
]

# Words that get a single token in every tokenizer built here: enough for toy-world and
# GenEval-style prompts. Anything else falls back to characters or bytes.
WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "photo", "image", "picture", "with", "on", "in", "to", "is",
    "left", "right", "above", "below", "top", "bottom", "next", "side",
    "one", "two", "three", "four", "five", "six",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "brown", "gray",
    "circle", "circles", "square", "squares", "triangle", "triangles", "shape", "shapes",
    "cat", "dog", "car", "tree", "house", "person", "background", "small", "large", "big",
)  # fmt: skip


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's state afterwards."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def merged_config(
    defaults: dict[str, Any], overrides: dict[str, Any], cls: type, what: str
) -> dict[str, Any]:
    """``defaults`` updated with ``overrides``; unknown override names raise a ``TypeError``."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(
            f"Unknown {what} config override(s) {unknown}; valid names are the arguments of "
            f"{cls.__name__}: {sorted(accepted)}."
        )
    return {**defaults, **overrides}


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def word_merges(
    words: Iterable[str], split: Callable[[str], list[str]]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE merges on ``words`` until each word is a single token.

    ``split(word)`` gives the word's initial symbols (which must already be in the vocabulary).
    This is BPE training on a corpus holding each word once: repeatedly merge the most frequent
    adjacent pair everywhere, ties broken by the pair itself so the result does not depend on the
    process (``tokenizers``' own trainer breaks ties by hash order). Because encoding replays the
    merges in rank order, every word of the list encodes as one token.

    Returns:
        The merge results (new vocabulary entries, in merge order) and the merges.
    """
    corpus = [split(word) for word in dict.fromkeys(words)]
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in corpus for pair in pairwise(symbols))
        if not counts:
            return tokens, merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        tokens.append(best[0] + best[1])
        corpus = [_apply_merge(symbols, best) for symbols in corpus]


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer``: byte-level alphabet (with and without ``</w>``) plus whole-word tokens for :data:`WORDS`."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words, merges = word_merges(WORDS, lambda w: [*w[:-1], w[-1] + "</w>"])
    pieces = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet), *words]
    return CLIPTokenizer(
        vocab={piece: i for i, piece in enumerate(dict.fromkeys(pieces))},
        merges=merges,
        model_max_length=model_max_length,
    )


def clip_text_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    """A 2-layer ``CLIPTextConfig`` sized to ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ----------------------------------------------------------------------------------------------
# Diffusers
# ----------------------------------------------------------------------------------------------


def autoencoder_kl(
    latent_channels: int, block_out_channels: tuple[int, int] = (16, 16), norm_num_groups: int = 8
):
    """An ``AutoencoderKL`` with one ×2 downsampling (32×32×3 px ↔ 16×16×``latent_channels``) and identity
    latent scaling (``scaling_factor=1``, ``shift_factor=0``: the SD3/Flux decode formula
    ``z / scaling_factor + shift_factor`` is an identity until a trained VAE sets them)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=False,
    )


def sd3_pipeline(
    seed: int = 0, *, third_text_encoder: Callable[[int], tuple[Any, Any]] | None = None, **overrides
):
    """A small random ``StableDiffusion3Pipeline`` at 32×32 px (see :func:`trl_intrinsic.testing.tiny_sd3_pipeline`).

    Two ``CLIPTextModelWithProjection`` (hidden 32, projection 32) with :func:`clip_tokenizer`, an
    ``SD3Transformer2DModel`` (2 layers, 4 heads × 8, patch 2 on 16×16×4 latents; ``overrides`` replace any
    config value), :func:`autoencoder_kl` and a ``FlowMatchEulerDiscreteScheduler`` with ``shift=3.0``.

    Args:
        seed: seeds the weights; the caller's RNG state is left untouched.
        third_text_encoder: ``f(joint_attention_dim) -> (tokenizer_3, text_encoder_3)`` called last under the
            same seed (a T5 encoder); default none.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    defaults = dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        qk_norm="rms_norm",
    )
    config = merged_config(defaults, overrides, SD3Transformer2DModel, "SD3Transformer2DModel")
    with seeded(seed):
        tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
        text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2))
        transformer = SD3Transformer2DModel(**config)
        vae = autoencoder_kl(latent_channels=config["in_channels"])
        tokenizer_3, text_encoder_3 = (None, None)
        if third_text_encoder is not None:
            tokenizer_3, text_encoder_3 = third_text_encoder(config["joint_attention_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# ----------------------------------------------------------------------------------------------
# Transformers
# ----------------------------------------------------------------------------------------------


def janus_model(
    tokenizer,
    text_config,
    *,
    image_size: int,
    patch_size: int,
    vision: dict[str, Any],
    vq: dict[str, Any],
    seed: int,
):
    """A random ``JanusForConditionalGeneration`` and its ``JanusProcessor`` (``JanusImageProcessorPil``, so no
    torchvision), with the generation config ready for both modes.

    Args:
        tokenizer: a tokenizer with Janus's ``image_token`` and ``boi_token``.
        text_config: the language model's ``LlamaConfig``.
        image_size, patch_size: of the understanding tower; ``(image_size // patch_size)²`` image tokens.
        vision, vq: ``vision_config`` / ``vq_config`` values (their projection sizes follow the language model).
        seed: seeds the weights; the caller's RNG state is left untouched.
    """
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from trl_intrinsic.autoregressive.janus import restore_janus_generation_config

    hidden = text_config.hidden_size
    num_image_tokens = (image_size // patch_size) ** 2
    config = JanusConfig(
        text_config=text_config.to_dict(),
        vision_config=dict(
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=hidden,
            num_image_tokens=num_image_tokens,
            **vision,
        ),
        vq_config=dict(projection_dim=hidden, image_token_embed_dim=hidden, **vq),
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
    )
    image_processor = JanusImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=num_image_tokens
    )
    with seeded(seed):
        model = JanusForConditionalGeneration(config)
    restore_janus_generation_config(model, processor)
    return model, processor
