"""Tests of the shipped toy Janus and of ``pretrain janus``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from trl_intrinsic.autoregressive.janus import (
    decode_images,
    janus_prompt_ids,
    janus_request,
    sample_cot,
    sample_image_tokens,
)
from trl_intrinsic.toyworld import TAGS, TEST_TAGS, sample_metadata
from trl_intrinsic.toyworld.evaluation import describe, evaluate_janus
from trl_intrinsic.toyworld.models import JANUS_SAMPLING, TOY_JANUS_DIR, load_toy_janus
from trl_intrinsic.toyworld.pretrain.__main__ import main
from trl_intrinsic.toyworld.pretrain.janus import (
    JanusPretrainConfig,
    build_janus,
    build_janus_tokenizer,
    pretrain_janus,
)


@pytest.fixture(scope="module")
def toy_janus():
    return load_toy_janus()


def test_shipped_janus_files_are_small_safetensors():
    files = [p for p in TOY_JANUS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 8e6
    assert (TOY_JANUS_DIR / "TRAINING.md").is_file()


def test_shipped_janus_writes_a_description_then_an_image(toy_janus):
    from transformers import JanusForConditionalGeneration

    model, processor = toy_janus
    assert isinstance(model, JanusForConditionalGeneration) and model.dtype == torch.float32
    tokenizer = processor.tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    boi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    meta = sample_metadata(1, seed=3, split="train", tags=["two_object"])[0]
    request = janus_prompt_ids(processor, janus_request(meta["prompt"], use_cot=True), bos)
    ids = torch.tensor([request])
    generator = torch.Generator().manual_seed(0)
    cot = sample_cot(
        model,
        ids,
        torch.ones_like(ids),
        max_new_tokens=JANUS_SAMPLING["max_cot_tokens"],
        temperature=1e-4,  # greedy: the description the model believes most
        eos_token_ids=[eos],
        pad_token_id=pad,
        generator=generator,
    )
    text = tokenizer.decode(cot.ids[0][cot.mask[0].bool()], skip_special_tokens=True)
    # A training prompt's description is learned verbatim (the CoT of the toy world is deterministic).
    assert text.strip() == describe(meta), (text, describe(meta))

    prefix = torch.tensor([request + cot.ids[0][cot.mask[0].bool()].tolist() + [boi]])
    sample = sample_image_tokens(
        model,
        prefix,
        torch.ones_like(prefix),
        num_image_tokens=64,
        cfg_weight=JANUS_SAMPLING["cfg_weight"],
        temperature=JANUS_SAMPLING["image_temperature"],
        bos_token_id=bos,
        boi_token_id=boi,
        pad_token_id=pad,
        generator=generator,
    )
    assert sample.ids.shape == (1, 64)
    images = decode_images(model, sample.ids)
    assert [image.size for image in images] == [(32, 32)]


def test_shipped_janus_accuracy_reproduces_the_record(toy_janus):
    model, processor = toy_janus
    metrics = json.loads((TOY_JANUS_DIR / "metrics.json").read_text())
    assert metrics["sampling"] == JANUS_SAMPLING
    n_per_tag = 16
    n = n_per_tag * len(TEST_TAGS)
    for use_cot, key in ((True, "cot"), (False, "no_cot")):
        recorded = metrics["test_accuracy"][key]["overall"]
        assert min(metrics["test_accuracy"][key]["counts"].values()) >= 100
        scores = evaluate_janus(model, processor, n_per_tag=n_per_tag, seed=123, use_cot=use_cot)
        assert set(scores["counts"]) == set(TEST_TAGS)
        # Within 3 binomial standard deviations of the recorded 100-prompts-per-tag accuracy.
        tolerance = 3 * math.sqrt(recorded * (1 - recorded) / n)
        assert abs(scores["overall"] - recorded) <= tolerance, (key, scores, recorded)
        assert 0.05 < scores["overall"] < 0.95, scores  # pretrained, with headroom


def test_tokenizer_covers_every_prompt_and_description_of_both_splits():
    tokenizer = build_janus_tokenizer()
    unk = tokenizer.unk_token_id
    metas = sample_metadata(300, seed=0, split="train", tags=list(TAGS)) + sample_metadata(300, seed=0)
    for meta in metas:
        for text in (janus_request(meta["prompt"], use_cot=True), meta["prompt"], describe(meta)):
            assert unk not in tokenizer(text).input_ids, text
        # Descriptions are written word by word, so a sampled CoT decodes back to the exact text.
        ids = tokenizer(describe(meta)).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == describe(meta)


def test_describe_is_deterministic_and_names_every_object():
    meta = sample_metadata(1, seed=0, split="train", tags=["color_attr"])[0]
    assert describe(meta) == describe(dict(meta))
    text = describe(meta)
    for clause in meta["include"]:
        assert clause["class"] in text and clause["color"] in text


def test_pretrain_janus_smoke(tmp_path):
    init, _ = build_janus(0)
    config = JanusPretrainConfig(
        max_steps=2,
        vq_max_steps=2,
        batch_size=4,
        vq_batch_size=4,
        eval_every_minutes=0,
        final_eval_per_tag=1,
        cfg_sweep=(5.0,),
        cfg_sweep_per_tag=1,
    )
    out = tmp_path / "janus"
    metrics = pretrain_janus(out, config)
    assert metrics["steps"] == 2 and metrics["vq_steps"] == 2
    assert math.isfinite(metrics["text_loss"]) and math.isfinite(metrics["image_loss"])
    for key in ("cot", "no_cot"):
        assert set(metrics["test_accuracy"][key]["counts"]) == set(TEST_TAGS)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))

    saved = load_file(out / "model.safetensors")
    initial = init.state_dict()
    moved = {k for k in saved if not torch.equal(saved[k].float(), initial[k].half().float())}
    assert any(k.startswith("model.language_model.") for k in moved)
    assert any(k.startswith("model.vqmodel.") for k in moved)
    assert not any(k.startswith(("model.vision_model.", "model.aligner.")) for k in moved)
    reloaded, processor = load_toy_janus(out)
    assert processor.tokenizer.vocab == build_janus_tokenizer().vocab
    assert reloaded.generation_config.generation_kwargs[
        "boi_token_id"
    ] == processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.boi_token)


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="cot_share"):
        JanusPretrainConfig(cot_share=1.5)
    with pytest.raises(ValueError, match="vq_batch_size"):
        JanusPretrainConfig(vq_batch_size=0)
    with pytest.raises(ValueError, match=r"processor_config\.json"):
        load_toy_janus(tmp_path / "nothing")
    with pytest.raises(ValueError, match="n_per_tag"):
        evaluate_janus(None, None, n_per_tag=0)
    with pytest.raises(SystemExit):
        main(["janus", "--minutes", "not-a-number"])


def _mean_nsc(model, processor, prompt: str, n: int = 64) -> float:
    """Negative self-certainty over CoT and image tokens of ``n`` seeded rollouts (IRIS's reward, averaged)."""
    tokenizer = processor.tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    boi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    request = janus_prompt_ids(processor, janus_request(prompt, use_cot=True), bos)
    ids = torch.tensor([request] * n)
    generator = torch.Generator().manual_seed(0)
    cot = sample_cot(
        model, ids, torch.ones_like(ids), max_new_tokens=32, temperature=1.0, eos_token_ids=[eos],
        pad_token_id=pad, generator=generator,
    )  # fmt: skip
    rows = [request + row[m.bool()].tolist() + [boi] for row, m in zip(cot.ids, cot.mask)]
    width = max(len(r) for r in rows)
    prefix = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    image = sample_image_tokens(
        model, prefix, (prefix != pad).long(), num_image_tokens=64, cfg_weight=5.0, temperature=1.0,
        bos_token_id=bos, boi_token_id=boi, pad_token_id=pad, generator=generator,
    )  # fmt: skip
    per_rollout = [
        torch.cat([sc[m.bool()], image_sc]).mean()
        for sc, m, image_sc in zip(cot.self_certainty, cot.mask, image.self_certainty)
    ]
    return -float(torch.stack(per_rollout).mean())


@pytest.mark.slow
@pytest.mark.parametrize(("reward", "direction"), [("nsc_reward", 1), ("self_certainty_reward", -1)])
def test_a_short_iris_run_moves_nsc_in_the_direction_of_its_reward(tmp_path, reward, direction):
    """IRIS on the toy Janus (CoT + image tokens, CFG 5, β = 0.01): 20 updates on one prompt raise NSC under
    ``nsc_reward`` and lower it under the opposite reward, ``self_certainty_reward``."""
    from datasets import Dataset

    from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
    from trl_intrinsic.rewards import reward_by_name

    model, processor = load_toy_janus()
    prompt = "a photo of a red circle and a blue square"
    before = _mean_nsc(model, processor, prompt)
    args = IntrinsicGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", seed=0, max_steps=20,
        learning_rate=3e-4, lr_scheduler_type="constant", beta=0.01, num_generations=8,
        per_device_train_batch_size=16, max_completion_length=32, gradient_checkpointing=False,
        save_strategy="no", logging_steps=5,
    )  # fmt: skip
    trainer = IntrinsicGRPOTrainer(
        model=model,
        reward_funcs=[reward_by_name(reward)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [prompt] * 64}),
        processing_class=processor,
    )
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model).get_base_model()  # LoRA layers active
    after = _mean_nsc(policy, processor, prompt)
    assert direction * (after - before) > 1.0, (reward, before, after)
