"""Tests of the shipped toy models and of the script that pretrains them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from trl_intrinsic.toyworld import TEST_TAGS, sample_metadata
from trl_intrinsic.toyworld.evaluation import blank_share, evaluate_flow_pipeline
from trl_intrinsic.toyworld.models import FLOW_SAMPLING, TOY_FLOW_DIR, load_toy_pipeline
from trl_intrinsic.toyworld.pretrain.__main__ import main
from trl_intrinsic.toyworld.pretrain.flow import FlowPretrainConfig, build_flow_pipeline, pretrain_flow

shipped = pytest.mark.skipif(
    not (TOY_FLOW_DIR / "model_index.json").is_file(),
    reason="no shipped toy flow weights yet: `python -m trl_intrinsic.toyworld.pretrain flow`",
)


@pytest.fixture(scope="module")
def toy_pipe():
    return load_toy_pipeline()


@shipped
def test_shipped_flow_files_are_small_safetensors():
    files = [p for p in TOY_FLOW_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 8e6
    assert (TOY_FLOW_DIR / "TRAINING.md").is_file()


@shipped
def test_shipped_flow_pipeline_loads_offline_and_generates(toy_pipe):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(toy_pipe, StableDiffusion3Pipeline)
    assert toy_pipe.text_encoder_3 is None and toy_pipe.tokenizer_3 is None
    assert toy_pipe.transformer.dtype == torch.float32
    # Every toy-world prompt fits the shortened CLIP context (no silent truncation).
    assert toy_pipe.tokenizer_max_length == 24
    longest = max(len(toy_pipe.tokenizer(m["prompt"]).input_ids) for m in sample_metadata(300, seed=0))
    assert longest <= toy_pipe.tokenizer_max_length

    generator = torch.Generator().manual_seed(0)
    out = toy_pipe(
        ["a photo of a red circle", "a photo of two squares"], generator=generator, **FLOW_SAMPLING
    )
    assert [im.size for im in out.images] == [(32, 32), (32, 32)]
    # Seeded sampling is reproducible.
    again = toy_pipe(
        ["a photo of a red circle", "a photo of two squares"],
        generator=torch.Generator().manual_seed(0),
        **FLOW_SAMPLING,
    )
    assert [im.tobytes() for im in out.images] == [im.tobytes() for im in again.images]


@shipped
def test_shipped_flow_accuracy_reproduces_the_record(toy_pipe):
    recorded = json.loads((TOY_FLOW_DIR / "metrics.json").read_text())["test_accuracy"]["overall"]
    n_per_tag = 24
    scores = evaluate_flow_pipeline(toy_pipe, n_per_tag=n_per_tag, seed=123)  # other prompts and noise
    assert set(scores["counts"]) == set(TEST_TAGS)
    # Within 3 binomial standard deviations of the recorded 1,000-prompt accuracy.
    n = n_per_tag * len(TEST_TAGS)
    tolerance = 3 * math.sqrt(recorded * (1 - recorded) / n)
    assert abs(scores["overall"] - recorded) <= tolerance, (scores, recorded)
    # Pretrained: far above an untrained model (which scores 0), yet leaving headroom.
    assert 0.05 < scores["overall"] < 0.95, scores
    assert scores["blank"] < 0.1  # the base model draws something in nearly every sample


def test_blank_share_counts_images_without_content():
    from PIL import Image

    from trl_intrinsic.toyworld import render, sample_metadata

    drawn = [render(m, seed=0) for m in sample_metadata(3, seed=0)]
    white, grey = Image.new("RGB", (32, 32), "white"), Image.new("RGB", (32, 32), (128, 128, 128))
    assert blank_share(drawn) == 0.0
    assert blank_share([*drawn, white, grey]) == pytest.approx(0.4)


@shipped
def test_recorded_metrics_match_shipped_sampling():
    metrics = json.loads((TOY_FLOW_DIR / "metrics.json").read_text())
    assert metrics["sampling"] == FLOW_SAMPLING
    assert set(metrics["test_accuracy"]["counts"]) == set(TEST_TAGS)
    assert min(metrics["test_accuracy"]["counts"].values()) >= 100


def test_pretrain_flow_smoke(tmp_path):
    init = build_flow_pipeline(0, **FlowPretrainConfig().transformer)
    out = tmp_path / "flow"
    metrics = main(
        [
            "flow",
            "--seed",
            "0",
            "--max-steps",
            "2",
            "--vae-max-steps",
            "2",
            "--batch-size",
            "4",
            "--eval-every-minutes",
            "0",
            "--final-eval-per-tag",
            "1",
            "--output",
            str(out),
        ]
    )
    assert metrics["steps"] == 2 and metrics["vae_steps"] == 2
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert set(metrics["test_accuracy"]["counts"]) == set(TEST_TAGS)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not list(out.rglob("*.bin"))

    # The saved transformer moved away from its initialisation, and the VAE got latent statistics.
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    initial = init.transformer.state_dict()
    assert any(not torch.equal(saved[k].float(), initial[k].half().float()) for k in saved)
    reloaded = load_toy_pipeline(out)
    assert reloaded.vae.config.scaling_factor != 1.0
    assert reloaded.tokenizer_max_length == 24

    # A continuation keeps the VAE and text encoders, trains the transformer further and counts steps on.
    more = tmp_path / "more"
    args = [
        "flow",
        "--init-from",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--eval-every-minutes",
        "0",
    ]
    continued = main([*args, "--final-eval-per-tag", "1", "--output", str(more)])
    assert continued["steps"] == 3 and continued["continued_from"]["steps"] == 2
    assert continued["vae_scaling_factor"] == metrics["vae_scaling_factor"]
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert all(torch.equal(v, load_file(more / vae)[k]) for k, v in load_file(out / vae).items())
    after = load_file(more / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(after[k], saved[k]) for k in saved)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="caption_dropout"):
        FlowPretrainConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        FlowPretrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        build_flow_pipeline(0, max_prompt_tokens=8)
    with pytest.raises(ValueError, match=r"model_index\.json"):
        load_toy_pipeline("/nonexistent/toy")
    with pytest.raises(ValueError, match="init_from"):
        pretrain_flow("/nonexistent/out", FlowPretrainConfig(init_from="/nonexistent/toy"))
    with pytest.raises(SystemExit):
        main(["janus-not-a-model"])
