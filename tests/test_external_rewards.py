import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from trl_intrinsic.rewards import (
    AestheticScore,
    CLIPScore,
    HPSv2,
    ImageReward,
    OCRScore,
    PickScore,
    clip_score,
)
from trl_intrinsic.rewards.external import edit_distance

PROMPTS = ["a red circle", "a blue square on the left", "green", "a photo of a cat"]


def _images(n=4, size=40):
    colours = ["red", "blue", "green", "white", "black", "yellow"]
    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size + 8 * i), colours[i % len(colours)])
        ImageDraw.Draw(im).ellipse((4, 4, 20 + 3 * i, 24), fill=colours[(i + 2) % len(colours)])
        out.append(im)
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel with a byte-level CLIP tokenizer and a PIL image processor, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=24)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
        logit_scale_init_value=math.log(50.0),
    )  # fmt: skip
    model = CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return str(path), model, tokenizer


def _cosines(tiny_clip, prompts, images):
    """Cosine similarity computed by hand, independently of the scorer classes."""
    from transformers import CLIPImageProcessorPil

    path, model, tokenizer = tiny_clip
    processor = CLIPImageProcessorPil.from_pretrained(path)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tokens).pooler_output)
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def test_clip_score_matches_the_definition(tiny_clip):
    images = _images()
    scorer = CLIPScore(tiny_clip[0], device="cpu")
    out = scorer(PROMPTS, images)
    expected = (100 * _cosines(tiny_clip, PROMPTS, images)).clamp_min(0)
    assert out == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(isinstance(s, float) and s >= 0 for s in out)
    # The clamp matters: a prompt/image pair with negative cosine scores 0, not below.
    cos = _cosines(tiny_clip, PROMPTS * 3, _images(12))
    assert (cos < 0).any() and (cos > 0).any()  # the random tiny model gives both signs
    wide = scorer(PROMPTS * 3, _images(12))
    assert wide == pytest.approx((100 * cos).clamp_min(0).tolist(), abs=1e-4) and min(wide) == 0.0


def test_pick_score_is_logit_scale_times_cosine(tiny_clip):
    images = _images()
    out = PickScore(tiny_clip[0], processor_name_or_path=tiny_clip[0], device="cpu")(PROMPTS, images)
    expected = 50.0 * _cosines(tiny_clip, PROMPTS, images)
    assert out == pytest.approx(expected.tolist(), abs=1e-4)
    assert min(out) < 0 or max(out) > 0


def test_batching_does_not_change_scores(tiny_clip):
    images = _images(5)
    prompts = [*PROMPTS, "red"]
    full = CLIPScore(tiny_clip[0], batch_size=32, device="cpu")(prompts, images)
    one = CLIPScore(tiny_clip[0], batch_size=1, device="cpu")(prompts, images)
    two = CLIPScore(tiny_clip[0], batch_size=2, device="cpu")(prompts, images)
    assert one == pytest.approx(full, abs=1e-4) and two == pytest.approx(full, abs=1e-4)


def test_lazy_loading_none_images_and_janus_completions(tiny_clip, tmp_path):
    missing = CLIPScore(str(tmp_path / "no_such_model"))  # nothing is read at construction
    assert not missing.loaded
    assert missing(["a", "b"], [None, None]) == [None, None]  # nothing to score: still not loaded
    assert not missing.loaded
    with pytest.raises(OSError):
        missing(["a"], _images(1))

    scorer = CLIPScore(tiny_clip[0])
    assert not scorer.loaded and scorer.model is None
    images = _images(3)
    out = scorer(PROMPTS[:3], [images[0], None, images[2]], latents=torch.zeros(3, 4, 2, 2))
    assert scorer.loaded and out[1] is None
    full = scorer(PROMPTS[:3], images)
    assert out[0] == pytest.approx(full[0], abs=1e-5) and out[2] == pytest.approx(full[2], abs=1e-5)
    assert scorer.model.device == torch.device("cpu")  # the device of `latents`
    # TRL / Janus calling convention: keyword `completions` holding PIL images.
    assert scorer(prompts=PROMPTS[:3], completions=images, trainer_state=None) == pytest.approx(
        full, abs=1e-5
    )


def test_aesthetic_score_applies_the_head_to_the_normalised_image_embedding(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    mlp = {
        "layers.0.weight": torch.randn(8, 16, generator=g), "layers.0.bias": torch.randn(8, generator=g),
        "layers.2.weight": torch.randn(4, 8, generator=g), "layers.2.bias": torch.randn(4, generator=g),
        "layers.10.weight": torch.randn(1, 4, generator=g), "layers.10.bias": torch.randn(1, generator=g),
    }  # fmt: skip
    save_file(mlp, tmp_path / "model.safetensors")
    images = _images()
    scorer = AestheticScore(str(tmp_path), clip_model_name_or_path=tiny_clip[0], device="cpu")
    assert not scorer.loaded
    out = scorer(PROMPTS, images)

    path, model, _ = tiny_clip
    from transformers import CLIPImageProcessorPil

    with torch.no_grad():
        pixels = CLIPImageProcessorPil.from_pretrained(path)(images=images, return_tensors="pt")[
            "pixel_values"
        ]
        x = torch.nn.functional.normalize(
            model.visual_projection(model.vision_model(pixels).pooler_output), dim=-1
        )
        for i in (0, 2, 10):  # numeric order of the layer indices, not lexicographic
            x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
    assert out == pytest.approx(x[:, 0].tolist(), abs=1e-4)
    # The score ignores the prompt.
    assert scorer(["x"] * 4, images) == pytest.approx(out, abs=1e-6)

    # The linear (v1) head format, given as a file path.
    save_file({"weight": torch.ones(1, 16), "bias": torch.tensor([2.0])}, tmp_path / "linear.safetensors")
    linear = AestheticScore(str(tmp_path / "linear.safetensors"), tiny_clip[0], device="cpu")
    emb = torch.nn.functional.normalize(
        model.visual_projection(model.vision_model(pixels).pooler_output), dim=-1
    )
    assert linear(PROMPTS, images) == pytest.approx((emb.sum(-1) + 2).tolist(), abs=1e-4)

    save_file({"weight": torch.ones(1, 768), "bias": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="768"):
        AestheticScore(str(tmp_path / "wrong.safetensors"), tiny_clip[0])(PROMPTS[:1], images[:1])
    save_file({"proj": torch.ones(1, 16)}, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="weight"):
        AestheticScore(str(tmp_path / "junk.safetensors"), tiny_clip[0])(PROMPTS[:1], images[:1])


def test_scorers_are_plain_callables_with_names():
    for scorer in (
        clip_score,
        CLIPScore("x"),
        PickScore(),
        AestheticScore("head"),
        OCRScore(),
        HPSv2("c"),
        ImageReward("c"),
    ):
        assert not isinstance(scorer, torch.nn.Module)
        assert scorer.requires_images is True
        assert isinstance(scorer.__name__, str) and scorer.__name__
    assert (
        clip_score.__name__ == "clip_score"
        and clip_score.model_name_or_path == "openai/clip-vit-large-patch14"
    )
    assert not clip_score.loaded


def test_bad_calls_raise(tiny_clip):
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScore("x", batch_size=0)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(["a", "b"], _images(1))
    with pytest.raises(ValueError, match="images"):
        clip_score(["a"])
    with pytest.raises(TypeError, match="PIL"):
        CLIPScore(tiny_clip[0])(["a"], [torch.zeros(3, 8, 8)])


def test_importing_the_rewards_namespace_stays_light():
    code = (
        "import sys; import trl_intrinsic.rewards as r; from trl_intrinsic.rewards import clip_score, ocr_score; "
        "assert 'transformers' not in sys.modules and 'rapidocr_onnxruntime' not in sys.modules, 'eager import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("cls", "args", "package", "extra"),
    [(HPSv2, ("ckpt",), "hpsv2", "hpsv2"), (ImageReward, ("ckpt",), "ImageReward", "imagereward")],
)
def test_missing_optional_packages_name_the_extra(cls, args, package, extra):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ImportError, match=rf'pip install "trl-intrinsic\[{extra}\]"'):
        cls(*args, device="cpu")(["a"], _images(1))


# ---------------------------------------------------------------------------------------------- OCR


def test_edit_distance_and_target_extraction():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("flaw", "lawn") == 2
    assert OCRScore.target_text('A neon sign that says "Open 24h" on a wall') == "Open 24h"
    assert OCRScore.target_text('A sign saying “SALE” and "50% off"') == "SALE 50% off"
    assert OCRScore.target_text("no text here") is None


def test_ocr_formula_and_variants():
    ocr = OCRScore()
    assert ocr.score_text("Hello World", "hello world") == 1.0
    assert ocr.score_text("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr.score_text("hello there everyone", "hello") == pytest.approx(1 - 13 / 18)  # spaces dropped
    assert ocr.score_text("", "hello") == 0.0
    assert OCRScore(ignore_case=False).score_text("HELLO", "hello") == 0.0
    flow = OCRScore(variant="flow_grpo")
    assert flow.score_text("hello there everyone", "hello") == 1.0
    assert flow.score_text("hxllo", "hello") == pytest.approx(0.8)
    assert flow.score_text("abc xyz", "hi") == 0.0
    with pytest.raises(ValueError, match="variant"):
        OCRScore(variant="cer")


def test_ocr_missing_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "trl-intrinsic\[ocr\]"'):
        OCRScore()(['a sign "HI"'], _images(1))


def _text_image(text):
    image = Image.new("RGB", (360, 96), "white")
    ImageDraw.Draw(image).text((16, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return image


def test_ocr_reads_rendered_text_and_ranks_the_matching_prompt_first():
    pytest.importorskip(
        "rapidocr_onnxruntime", reason='OCR engine not installed: pip install "trl-intrinsic[ocr]"'
    )
    fast = {"det_limit_side_len": 96, "intra_op_num_threads": 1}  # no upscaling of the small test image
    scorer = OCRScore(engine_kwargs=fast)
    image = _text_image("HELLO 2025")
    prompts = ['a sign that says "Hello 2025"', 'a sign that says "GOODBYE"', "a sign", 'a "HELLO 2O25" sign']
    out = scorer(prompts, [image] * 3 + [None])
    assert scorer.loaded
    assert out[0] == 1.0
    assert out[1] < 0.5 and out[2] is None and out[3] is None
    # A dataset column can carry the target instead of the prompt.
    by_column = OCRScore(target_column="text", engine_kwargs=fast)(
        ["x", "y"], [image, None], text=["HELL", "A"]
    )
    assert by_column == [pytest.approx(1 - 5 / 9), None]


def test_hybrid_rewards_take_the_same_flow_call(tiny_clip):
    """`reward_funcs=[solace_reward, clip_score]`: both accept the flow trainer's call unchanged."""
    from trl_intrinsic.rewards import solace_reward

    z0 = torch.randn(4, 4, 2, 2)
    kwargs = dict(
        latents=z0,
        velocity_fn=lambda x_t, sigma, rows: (x_t - z0[rows]) / sigma.view(-1, 1, 1, 1) + 0.1,
        reference_velocity_fn=lambda x_t, sigma, rows: torch.zeros_like(x_t),
        sigmas=torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
        train_sigmas=torch.tensor([0.5, 0.25]),
        group_ids=[0, 0, 1, 1],
        trainer_state=None,
        prompt=PROMPTS,  # a dataset column
    )
    images = _images()
    intrinsic = solace_reward(PROMPTS, images, **kwargs)
    external = CLIPScore(tiny_clip[0])(PROMPTS, images, **kwargs)
    assert intrinsic == pytest.approx([-math.log(0.01 + 1e-6)] * 4, rel=1e-4)
    assert external == pytest.approx(CLIPScore(tiny_clip[0], device="cpu")(PROMPTS, images), abs=1e-5)
    assert (solace_reward.requires_images, clip_score.requires_images) == (False, True)
