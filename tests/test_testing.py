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
    # Equal weights; equal outputs up to float rounding (weights loaded from safetensors are not 64-byte
    # aligned, so the CPU matmul kernels may sum in another order).
    np.testing.assert_allclose(_sd3_call(pipe), _sd3_call(reloaded), rtol=0, atol=1e-5)


def test_sd3_pipeline_with_t5_save_and_reload(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = testing.tiny_sd3_pipeline(with_t5=True)
    assert pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim
    pipe.save_pretrained(tmp_path)
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path)
    expected = _sd3_call(pipe)
    assert expected.shape == (1, 32, 32, 3) and np.isfinite(expected).all()
    np.testing.assert_allclose(expected, _sd3_call(reloaded), rtol=0, atol=1e-5)  # see above: rounding only
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


# ----------------------------------------------------------------------------------------------
# Causal LM
# ----------------------------------------------------------------------------------------------


def _lm_generate(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0)


def test_causal_lm_generates_and_chats():
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model, tokenizer = testing.tiny_causal_lm()
    assert isinstance(model, LlamaForCausalLM) and isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer(ODD_PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == ODD_PROMPT
    out = _lm_generate(model, tokenizer, [PROMPT, "hi"])
    assert out.shape[0] == 2 and out.shape[1] > len(tokenizer(PROMPT).input_ids)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\nBe brief.</s>\n<|user|>\n" + PROMPT) and text.endswith(
        "<|assistant|>\n"
    )
    chat = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert chat["input_ids"][0, 0] == tokenizer.bos_token_id
    assert (chat["input_ids"] == tokenizer.bos_token_id).sum() == 1  # the template's BOS is not doubled
    assert model(**chat).logits.shape == (*chat["input_ids"].shape, len(tokenizer))


def test_causal_lm_is_seeded_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = torch.random.get_rng_state()
    (a, tokenizer), (b, _), (c, _) = (
        testing.tiny_causal_lm(0),
        testing.tiny_causal_lm(0),
        testing.tiny_causal_lm(1),
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights([a.state_dict()], [b.state_dict()])
    assert not _same_weights([a.state_dict()], [c.state_dict()])

    a.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = (
        AutoModelForCausalLM.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    )
    assert _same_weights([a.state_dict()], [reloaded.state_dict()])
    assert reloaded_tokenizer(ODD_PROMPT).input_ids == tokenizer(ODD_PROMPT).input_ids
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert torch.equal(
        _lm_generate(a, tokenizer, [PROMPT]), _lm_generate(reloaded, reloaded_tokenizer, [PROMPT])
    )


def test_causal_lm_overrides():
    model, _ = testing.tiny_causal_lm(num_hidden_layers=3)
    assert len(model.model.layers) == 3
    with pytest.raises(TypeError, match="hiden_size"):
        testing.tiny_causal_lm(hiden_size=3)


def test_causal_lm_trains_with_trl_grpo_on_conversational_prompts(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = testing.tiny_causal_lm()
    seen: list = []

    def length_reward(prompts, completions, **kwargs):
        seen.extend(completions)
        return [float(len(c[0]["content"])) for c in completions]

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": PROMPT}]] * 4})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        report_to="none",
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert len(seen) == 4 and all(c[0]["role"] == "assistant" for c in seen)
    assert trainer.state.global_step == 1


# ----------------------------------------------------------------------------------------------
# Janus
# ----------------------------------------------------------------------------------------------


def _janus_image_tokens(model, processor, prompts: list[str]) -> torch.Tensor:
    inputs = processor(text=prompts, generation_mode="image", padding=True, return_tensors="pt")
    torch.manual_seed(0)
    return model.generate(**inputs, generation_mode="image", guidance_scale=4.0, do_sample=True)


def test_janus_generates_images_and_text():
    from PIL import Image
    from transformers import JanusForConditionalGeneration, JanusProcessor

    model, processor = testing.tiny_janus()
    assert isinstance(model, JanusForConditionalGeneration) and isinstance(processor, JanusProcessor)
    tokenizer = processor.tokenizer
    assert model.generation_config.generation_kwargs["boi_token_id"] == tokenizer.boi_token_id
    assert model.config.image_token_id == tokenizer.image_token_id

    inputs = processor(text=[PROMPT, "a cat"], generation_mode="image", padding=True, return_tensors="pt")
    assert (inputs["input_ids"][:, -1] == tokenizer.boi_token_id).all()
    tokens = _janus_image_tokens(model, processor, [PROMPT, "a cat"])
    num_codes = model.config.vq_config.num_embeddings
    assert tokens.shape == (2, 16) and tokens.min() >= 0 and tokens.max() < num_codes
    pixels = model.decode_image_tokens(tokens)
    assert pixels.shape == (2, 32, 32, 3) and torch.isfinite(pixels).all()

    text_inputs = processor(text=[PROMPT], return_tensors="pt")
    assert text_inputs["input_ids"][0, 0] == tokenizer.bos_token_id
    text_out = model.generate(**text_inputs, max_new_tokens=5, do_sample=False)
    assert text_out.shape[0] == 1 and text_out.shape[1] > text_inputs["input_ids"].shape[1]
    assert torch.equal(text_out[:, : text_inputs["input_ids"].shape[1]], text_inputs["input_ids"])

    # Understanding: an image placeholder is expanded to 16 image tokens and the image is encoded.
    image = Image.new("RGB", (40, 24), (255, 0, 0))
    und = processor(text=["<image_placeholder> what is this?"], images=[image], return_tensors="pt")
    assert und["pixel_values"].shape == (1, 3, 64, 64)
    assert (und["input_ids"] == tokenizer.image_token_id).sum() == 16
    assert model(**und).logits.shape[-1] == len(tokenizer)


def test_janus_is_seeded_and_reloads(tmp_path):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    state = torch.random.get_rng_state()
    (a, processor), (b, _), (c, _) = testing.tiny_janus(0), testing.tiny_janus(0), testing.tiny_janus(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights([a.state_dict()], [b.state_dict()])
    assert not _same_weights([a.state_dict()], [c.state_dict()])
    expected = _janus_image_tokens(a, processor, [PROMPT])
    assert not torch.equal(expected, _janus_image_tokens(c, processor, [PROMPT]))

    a.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = JanusForConditionalGeneration.from_pretrained(tmp_path)
    reloaded_processor = JanusProcessor.from_pretrained(tmp_path)
    assert _same_weights([a.state_dict()], [reloaded.state_dict()])
    assert reloaded_processor.num_image_tokens == 16
    assert reloaded_processor.image_processor.size.height == 64
    restored = testing.restore_janus_generation_config(reloaded, reloaded_processor)
    assert restored is reloaded
    assert reloaded.generation_config.generation_kwargs == {"boi_token_id": processor.tokenizer.boi_token_id}
    assert torch.equal(expected, _janus_image_tokens(reloaded, reloaded_processor, [PROMPT]))
    torch.testing.assert_close(a.decode_image_tokens(expected), reloaded.decode_image_tokens(expected))


def test_restore_janus_generation_config_needs_a_janus_tokenizer():
    model, _ = testing.tiny_janus()
    _, llama_tokenizer = testing.tiny_causal_lm()
    with pytest.raises(ValueError, match="boi_token"):
        testing.restore_janus_generation_config(model, llama_tokenizer)


# ----------------------------------------------------------------------------------------------
# Flux
# ----------------------------------------------------------------------------------------------


def _flux_modules(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]


def _flux_call(pipe, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_flux_pipeline_generates_pil_images():
    from diffusers import FluxPipeline

    pipe = testing.tiny_flux_pipeline()
    assert isinstance(pipe, FluxPipeline)
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=16).images
    assert len(images) == 1 and images[0].size == (32, 32)
    assert pipe.vae.config.latent_channels * 4 == pipe.transformer.config.in_channels == 64
    assert pipe.scheduler.config.use_dynamic_shifting
    # Guidance is embedded (FLUX.1-dev style), so the guidance scale changes the output.
    assert pipe.transformer.config.guidance_embeds
    assert not np.array_equal(_flux_call(pipe, guidance_scale=1.0), _flux_call(pipe, guidance_scale=7.0))
    # The T5 prompt conditions the output, and T5 tokenizes any English without unknown tokens.
    assert not np.array_equal(_flux_call(pipe), _flux_call(pipe, prompt_2="three green triangles"))
    ids = pipe.tokenizer_2(ODD_PROMPT).input_ids
    assert pipe.tokenizer_2.unk_token_id not in ids and ids[-1] == pipe.tokenizer_2.eos_token_id
    assert pipe.tokenizer_2.decode(ids, skip_special_tokens=True) == ODD_PROMPT
    assert len(pipe.tokenizer_2(PROMPT).input_ids) == len(PROMPT.split()) + 1  # known words: one token each

    schnell = testing.tiny_flux_pipeline(guidance_embeds=False)
    assert _flux_call(schnell).shape == (1, 32, 32, 3)


def test_flux_pipeline_is_seeded_and_reloads(tmp_path):
    from diffusers import FluxPipeline

    state = torch.random.get_rng_state()
    a, b, c = testing.tiny_flux_pipeline(0), testing.tiny_flux_pipeline(0), testing.tiny_flux_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(_state_dicts(*_flux_modules(a)), _state_dicts(*_flux_modules(b)))
    for ma, mc in zip(_flux_modules(a), _flux_modules(c)):
        assert not _same_weights([ma.state_dict()], [mc.state_dict()]), type(ma).__name__
    expected = _flux_call(a)
    assert not np.array_equal(expected, _flux_call(c))

    a.save_pretrained(tmp_path)
    reloaded = FluxPipeline.from_pretrained(tmp_path)
    assert _same_weights(_state_dicts(*_flux_modules(a)), _state_dicts(*_flux_modules(reloaded)))
    assert reloaded.tokenizer_2(ODD_PROMPT).input_ids == a.tokenizer_2(ODD_PROMPT).input_ids
    np.testing.assert_array_equal(expected, _flux_call(reloaded))


# ----------------------------------------------------------------------------------------------
# Sana
# ----------------------------------------------------------------------------------------------


def _sana_modules(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.vae, pipe.text_encoder]


def _sana_call(pipe, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        use_resolution_binning=False,
        complex_human_instruction=None,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_sana_pipeline_generates_pil_images():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    pipe = testing.tiny_sana_pipeline()
    assert isinstance(pipe, SanaPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    images = pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, use_resolution_binning=False
    ).images
    assert len(images) == 1 and images[0].size == (32, 32)
    assert (
        pipe.vae_scale_factor == 4
        and pipe.transformer.config.caption_channels == pipe.text_encoder.config.hidden_size
    )
    assert not np.array_equal(_sana_call(pipe), _sana_call(pipe, prompt="three green triangles"))
    ids = pipe.tokenizer(ODD_PROMPT).input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and pipe.tokenizer.unk_token_id not in ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == ODD_PROMPT


def test_sana_pipeline_is_seeded_and_reloads(tmp_path):
    from diffusers import SanaPipeline

    state = torch.random.get_rng_state()
    a, b, c = testing.tiny_sana_pipeline(0), testing.tiny_sana_pipeline(0), testing.tiny_sana_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(_state_dicts(*_sana_modules(a)), _state_dicts(*_sana_modules(b)))
    for ma, mc in zip(_sana_modules(a), _sana_modules(c)):
        assert not _same_weights([ma.state_dict()], [mc.state_dict()]), type(ma).__name__
    expected = _sana_call(a)
    assert not np.array_equal(expected, _sana_call(c))

    a.save_pretrained(tmp_path)
    reloaded = SanaPipeline.from_pretrained(tmp_path)
    assert _same_weights(_state_dicts(*_sana_modules(a)), _state_dicts(*_sana_modules(reloaded)))
    np.testing.assert_array_equal(expected, _sana_call(reloaded))


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def test_every_built_in_word_is_one_token_in_every_tokenizer():
    # BPE merges interfere across words (e.g. "re" from "red" inside "squares"); the merge table
    # is learned like BPE training so that each listed word still ends as a single token.
    tokenizers = {
        "clip": testing._clip_tokenizer(),
        "t5": testing._t5_tokenizer(),
        "llama": testing._llama_tokenizer(),
        "gemma": testing._gemma_tokenizer(),
    }
    for name, tokenizer in tokenizers.items():
        for word in testing._WORDS:
            pieces = tokenizer.tokenize(f"{word} {word}")
            assert len(pieces) == 2, (name, word, pieces)
        assert tokenizer.unk_token_id not in tokenizer(ODD_PROMPT, add_special_tokens=False).input_ids, name


def test_tokenizers_are_identical_across_builds():
    assert testing._clip_tokenizer().get_vocab() == testing._clip_tokenizer().get_vocab()
    assert testing._word_merges(["squares", "red"], list) == testing._word_merges(["squares", "red"], list)
    tokens, merges = testing._word_merges(["red", "squares"], list)
    assert tokens[-1] in ("squares", "red") and all(a + b in tokens for a, b in merges)
