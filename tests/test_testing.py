"""The tiny model factories: real classes, seeded, runnable, and save/reload round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_intrinsic import testing

PROMPT = "a red circle above two blue squares"
# Words outside every built-in vocabulary, digits and punctuation: must not produce unknown tokens.
ODD_PROMPT = "Zebrafish juggling 3 quixotic xylophones, naturally!"


def _state_dicts(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [m.state_dict() for m in modules]


def _same_weights(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(a, b))


def _sd3_call(pipe, **kwargs) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


# ----------------------------------------------------------------------------------------------
# SD3
# ----------------------------------------------------------------------------------------------


def _sd3_modules(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]


def test_sd3_pipeline_generates_pil_images():
    from diffusers import StableDiffusion3Pipeline

    pipe = testing.tiny_sd3_pipeline()
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pil").images
    assert len(images) == 1 and images[0].size == (32, 32) and images[0].mode == "RGB"
    # The decode formula z / scaling_factor + shift_factor needs both set.
    assert pipe.vae.config.scaling_factor == 1.0 and pipe.vae.config.shift_factor == 0.0
    assert pipe.transformer.config.pooled_projection_dim == 2 * pipe.text_encoder.config.projection_dim
    assert pipe.scheduler.config.shift == 3.0


def test_sd3_pipeline_is_seeded_and_leaves_caller_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = testing.tiny_sd3_pipeline(0), testing.tiny_sd3_pipeline(0), testing.tiny_sd3_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(_state_dicts(*_sd3_modules(a)), _state_dicts(*_sd3_modules(b)))
    for ma, mc in zip(_sd3_modules(a), _sd3_modules(c)):
        assert not _same_weights([ma.state_dict()], [mc.state_dict()]), type(ma).__name__
    np.testing.assert_array_equal(_sd3_call(a), _sd3_call(b))
    assert not np.array_equal(_sd3_call(a), _sd3_call(c))


def test_sd3_pipeline_save_and_reload(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = testing.tiny_sd3_pipeline(seed=3)
    pipe.save_pretrained(tmp_path)
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    assert _same_weights(_state_dicts(*_sd3_modules(pipe)), _state_dicts(*_sd3_modules(reloaded)))
    assert reloaded.tokenizer(ODD_PROMPT).input_ids == pipe.tokenizer(ODD_PROMPT).input_ids
    np.testing.assert_array_equal(_sd3_call(pipe), _sd3_call(reloaded))


def test_sd3_pipeline_with_t5_save_and_reload(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = testing.tiny_sd3_pipeline(with_t5=True)
    assert pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim
    pipe.save_pretrained(tmp_path)
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path)
    expected = _sd3_call(pipe)
    assert expected.shape == (1, 32, 32, 3) and np.isfinite(expected).all()
    np.testing.assert_array_equal(expected, _sd3_call(reloaded))
    # The T5 prompt really conditions the output (it is not replaced by zeros).
    assert not np.array_equal(expected, _sd3_call(pipe, prompt_3="three green triangles"))


def test_sd3_pipeline_overrides():
    pipe = testing.tiny_sd3_pipeline(num_layers=3)
    assert len(pipe.transformer.transformer_blocks) == 3
    with pytest.raises(TypeError, match="num_layerz"):
        testing.tiny_sd3_pipeline(num_layerz=3)


def test_clip_tokenizer_covers_any_english_prompt():
    pipe = testing.tiny_sd3_pipeline()
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        ids = tokenizer(ODD_PROMPT).input_ids
        assert tokenizer.unk_token_id not in ids[1:-1]
        # CLIP lower-cases and decodes punctuation as separate words.
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == ODD_PROMPT.lower().replace(" ", "")
        # Known words are single tokens, so GenEval-style prompts stay far below the 77-token limit.
        assert tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
        assert tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
