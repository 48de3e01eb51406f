"""Tests of the toy world: sampling, rendering, the verifier, scoring and the verifier reward."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from trl_intrinsic import toyworld
from trl_intrinsic.toyworld import (
    HELD_OUT_COUNTS,
    HELD_OUT_PAIRS,
    HELD_OUT_POSITIONS,
    HELD_OUT_SHAPE_ORDERS,
    PALETTE,
    SHAPES,
    TAGS,
    TEST_TAGS,
    evaluate,
    render,
    sample_metadata,
    verifier_reward,
    verify,
)


def _with_seeds(metas, offset=0):
    return [(m, offset + i) for i, m in enumerate(metas)]


# --------------------------------------------------------------------------- sampling


def test_palette_and_shapes():
    assert {"red", "green", "blue", "yellow"} <= set(PALETTE)
    assert SHAPES == ("circle", "square", "triangle")
    for rgb in PALETTE.values():
        assert len(rgb) == 3 and min(rgb) <= 10 and max(rgb) >= 190  # saturated
    assert len(set(PALETTE.values())) == len(PALETTE)


def test_sampling_is_deterministic_and_balanced():
    a = sample_metadata(60, seed=3)
    b = sample_metadata(60, seed=3)
    c = sample_metadata(60, seed=4)
    assert a == b
    assert a != c
    tags = [m["tag"] for m in a]
    assert {t: tags.count(t) for t in TAGS} == dict.fromkeys(TAGS, 10)
    over = sample_metadata(30, seed=0, tags=["position", "position", "color_attr"])
    assert [m["tag"] for m in over].count("position") == 20
    assert sample_metadata(0, seed=0) == []


def test_metadata_schema_and_prompt_length():
    for split in ("train", "test"):
        for meta in sample_metadata(600, seed=1, split=split):
            assert set(meta) <= {"tag", "include", "exclude", "prompt"}
            assert len(meta["prompt"].split()) <= 12
            for clause in meta["include"]:
                assert clause["class"] in SHAPES and clause["count"] >= 1
                assert clause.get("color", "red") in PALETTE
            if meta["tag"] == "counting":
                (inc,), (exc,) = meta["include"], meta["exclude"]
                assert exc == {"class": inc["class"], "count": inc["count"] + 1}
                assert 1 <= inc["count"] <= 4
            if meta["tag"] == "position":
                rel, j = meta["include"][1]["position"]
                assert j == 0 and rel in ("left of", "right of", "above", "below")
                assert f" {rel} " in meta["prompt"]
            if meta["tag"] == "color_attr":
                assert all("color" in c for c in meta["include"])


def _compositions(meta):
    """Held-out compositions, read directly off the clauses (independent of the library helper)."""
    inc = meta["include"]
    found = set()
    for clause in inc + meta.get("exclude", []):
        if (clause.get("color"), clause["class"]) in HELD_OUT_PAIRS:
            found.add("pair")
    if meta["tag"] == "counting" and (inc[0]["class"], inc[0]["count"]) in HELD_OUT_COUNTS:
        found.add("count")
    if meta["tag"] == "two_object" and (inc[0]["class"], inc[1]["class"]) in HELD_OUT_SHAPE_ORDERS:
        found.add("order")
    if (
        meta["tag"] == "position"
        and (inc[1]["class"], inc[1]["position"][0], inc[0]["class"]) in HELD_OUT_POSITIONS
    ):
        found.add("position")
    return found


def test_held_out_split():
    assert len(HELD_OUT_PAIRS) >= 3 and {s for _, s in HELD_OUT_PAIRS} == set(SHAPES)
    train = sample_metadata(3000, seed=0, split="train")
    test = sample_metadata(1000, seed=0, split="test")
    assert all(not _compositions(m) and not toyworld.held_out_compositions(m) for m in train)
    assert all(_compositions(m) and toyworld.held_out_compositions(m) for m in test)
    assert {m["prompt"] for m in train}.isdisjoint({m["prompt"] for m in test})
    # Every held-out colour-shape pairing does show up in the test split.
    test_pairs = {(c.get("color"), c["class"]) for m in test for c in m["include"]}
    assert test_pairs >= HELD_OUT_PAIRS
    assert {m["tag"] for m in test} == set(TEST_TAGS)
    # The exhaustive prompt spaces partition each tag.
    for tag in TEST_TAGS:
        tr = {json.dumps(m) for m in toyworld.prompt_space(tag, "train")}
        te = {json.dumps(m) for m in toyworld.prompt_space(tag, "test")}
        assert tr and te and tr.isdisjoint(te)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": -1}, "n"),
        ({"n": 3, "tags": ["nope"]}, "tags"),
        ({"n": 3, "split": "validation"}, "split"),
        ({"n": 3, "tags": []}, "tags"),
        ({"n": 3, "tags": ["single_object"], "split": "test"}, "tags"),
    ],
)
def test_sampling_rejects_bad_arguments(kwargs, field):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=field):
        sample_metadata(n, seed=0, **kwargs)


# --------------------------------------------------------------------------- render + verify


def test_render_basics():
    meta = sample_metadata(1, seed=0, tags=["color_attr"])[0]
    img = render(meta, seed=5)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert np.array_equal(np.asarray(img), np.asarray(render(json.dumps(meta), seed=5)))
    assert not np.array_equal(np.asarray(img), np.asarray(render(meta, seed=6)))
    assert render(meta, seed=5, size=64).size == (64, 64)
    arr = np.asarray(img).reshape(-1, 3)
    colours = {tuple(p) for p in arr}
    assert colours <= {(255, 255, 255), *PALETTE.values()}  # hard edges, palette only
    assert (arr == 255).all(axis=1).mean() > 0.5  # mostly white background
    with pytest.raises(ValueError, match="size"):
        render(meta, size=4)


def test_verify_accepts_renders():
    cases = _with_seeds(sample_metadata(720, seed=11, split="train"))
    cases += _with_seeds(sample_metadata(400, seed=12, split="test"), offset=10_000)
    failures = [(m["prompt"], verify(render(m, seed=s), m).reason) for m, s in cases]
    failures = [f for f in failures if f[1] != "ok"]
    assert not failures, failures[:5]
    for meta, seed in cases[::10]:
        assert verify(render(meta, seed=seed, size=64), meta).correct, meta["prompt"]


def test_verify_reports_objects():
    meta = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1, "color": "blue"},
            {"class": "triangle", "count": 1, "position": ["right of", 0]},
        ],
        "prompt": "a photo of a triangle right of a blue square",
    }
    result = verify(render(meta, seed=0), meta)
    assert result.correct and result.reason == "ok"
    assert sorted(o.shape for o in result.objects) == ["square", "triangle"]
    square = next(o for o in result.objects if o.shape == "square")
    triangle = next(o for o in result.objects if o.shape == "triangle")
    assert square.color == "blue" and square.area >= 49
    assert triangle.centroid[0] > square.centroid[0]
    assert [c.ok for c in result.clauses] == [True, True]


# --------------------------------------------------------------------------- strictness


_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _requirements(meta):
    """What a metadata dict asks of an image, in a form where equal means 'same requirements'."""
    inc = meta["include"]
    objects = frozenset((c["class"], c.get("color"), c["count"]) for c in inc)
    excluded = frozenset((c["class"], c.get("color"), c["count"]) for c in meta.get("exclude", []))
    relations = set()
    for clause in inc:
        if "position" in clause:
            rel, j = clause["position"]
            a, b = (clause["class"], clause.get("color")), (inc[j]["class"], inc[j].get("color"))
            relations.add(min((a, rel, b), (b, _MIRROR[rel], a)))
    return objects, excluded, frozenset(relations)


def test_verify_rejects_renders_of_other_prompts():
    rng = np.random.default_rng(0)
    compared = rejected = 0
    for split in ("train", "test"):
        metas = sample_metadata(600, seed=21, split=split)
        by_tag = {}
        for m in metas:
            by_tag.setdefault(m["tag"], []).append(m)
        for i, meta in enumerate(metas):
            pool = by_tag[meta["tag"]]
            other = pool[int(rng.integers(len(pool)))]
            if _requirements(other) == _requirements(meta):
                continue  # the render honestly satisfies the other prompt too
            compared += 1
            rejected += not verify(render(meta, seed=i), other).correct
    assert compared >= 800
    assert rejected / compared >= 0.99, (rejected, compared)


def test_exclude_clause_rejects_one_object_too_many():
    for count in (1, 2, 3):
        for shape in SHAPES:
            meta = {
                "tag": "counting",
                "include": [{"class": shape, "count": count}],
                "exclude": [{"class": shape, "count": count + 1}],
                "prompt": f"{count} {shape}",
            }
            too_many = {**meta, "include": [{"class": shape, "count": count + 1}], "exclude": []}
            for seed in range(5):
                assert verify(render(meta, seed=seed), meta).correct
                result = verify(render(too_many, seed=seed), meta)
                assert not result.correct
                assert [c.ok for c in result.clauses] == [True, False]
                assert result.score == 0.5


def test_wrong_colour_shape_and_relation_are_rejected():
    meta = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1, "color": "green"},
            {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
        "prompt": "a photo of a red circle left of a green square",
    }
    img = render(meta, seed=1)
    assert verify(img, meta).correct
    swapped = json.loads(json.dumps(meta))
    swapped["include"][1]["position"] = ["right of", 0]
    assert "not right of" in verify(img, swapped).reason
    recoloured = json.loads(json.dumps(meta))
    recoloured["include"][0]["color"] = "blue"
    assert not verify(img, recoloured).correct
    reshaped = json.loads(json.dumps(meta))
    reshaped["include"][1]["class"] = "triangle"
    assert not verify(img, reshaped).correct
    assert not verify(Image.new("RGB", (32, 32), "white"), meta).correct


def _draw(fn, size=32):
    img = Image.new("RGB", (size, size), "white")
    fn(ImageDraw.Draw(img))
    return img


@pytest.mark.parametrize(
    "draw",
    [
        lambda d: d.ellipse([6, 6, 20, 20], outline=(230, 0, 0), width=2),  # ring
        lambda d: d.polygon([(8, 8), (20, 8), (14, 19)], fill=(230, 0, 0)),  # downward triangle
        lambda d: d.rectangle([4, 10, 25, 19], fill=(230, 0, 0)),  # 2:1 bar
        lambda d: d.polygon([(14, 4), (24, 14), (14, 24), (4, 14)], fill=(230, 0, 0)),  # diamond
    ],
)
def test_non_shapes_match_no_clause(draw):
    objects = toyworld.detect_objects(_draw(draw))
    assert [(o.color, o.shape) for o in objects] == [("red", "unknown")]


def test_specks_are_dropped():
    speck = _draw(lambda d: d.rectangle([6, 6, 7, 8], fill=(230, 0, 0)))  # 6 px
    assert toyworld.detect_objects(speck) == []
    assert toyworld.detect_objects(speck.resize((64, 64), Image.NEAREST)) == []  # threshold scales with size
    small_square = _draw(lambda d: d.rectangle([6, 6, 9, 9], fill=(230, 0, 0)))  # 16 px: small but kept
    assert [o.shape for o in toyworld.detect_objects(small_square)] == ["square"]


@pytest.mark.parametrize("rgb", [(0, 0, 0), (128, 128, 128), (255, 170, 170), (250, 130, 0), (235, 235, 235)])
def test_off_palette_colours_are_background(rgb):
    assert toyworld.detect_objects(_draw(lambda d: d.rectangle([6, 6, 16, 16], fill=rgb))) == []


# --------------------------------------------------------------------------- robustness


def _blur_noise(img, rng):
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.7))), dtype=np.float64)
    arr = arr + rng.normal(0.0, 9.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def _shift_colours(img, rng):
    arr = np.asarray(img).copy()
    for rgb in PALETTE.values():
        mask = (arr == rgb).all(-1)
        arr[mask] = np.clip(np.array(rgb) + rng.integers(-20, 21, 3), 0, 255)
    return Image.fromarray(arr)


def _rounded(meta, seed, rng):
    """Render at 4×, round every corner (blur each colour's mask, re-threshold), downsample with antialiasing."""
    big = np.asarray(render(meta, seed=seed, size=128))
    out = np.full_like(big, 255)
    for rgb in PALETTE.values():
        mask = Image.fromarray(((big == rgb).all(-1) * 255).astype(np.uint8))
        soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 3.5))))
        out[soft >= 128] = rgb
    return Image.fromarray(out).resize((32, 32), Image.LANCZOS)


@pytest.mark.parametrize("degradation", ["blur_noise", "shifted_colours", "rounded", "downsampled"])
def test_verify_is_robust_to_mild_degradations(degradation):
    rng = np.random.default_rng(5)
    metas = sample_metadata(300, seed=31) + sample_metadata(100, seed=32, split="test")
    accepted = 0
    for i, meta in enumerate(metas):
        if degradation == "blur_noise":
            img = _blur_noise(render(meta, seed=i), rng)
        elif degradation == "shifted_colours":
            img = _shift_colours(render(meta, seed=i), rng)
        elif degradation == "rounded":
            img = _rounded(meta, i, rng)
        else:
            img = render(meta, seed=i, size=128).resize((32, 32), Image.BOX)
        accepted += verify(img, meta).correct
    assert accepted / len(metas) >= 0.97, accepted / len(metas)


def test_rounded_triangles_stay_triangles():
    rng = np.random.default_rng(0)
    meta = {"tag": "counting", "include": [{"class": "triangle", "count": 3}], "prompt": "three triangles"}
    shapes = [o.shape for seed in range(20) for o in verify(_rounded(meta, seed, rng), meta).objects]
    assert shapes.count("triangle") >= 0.97 * len(shapes) and len(shapes) >= 57


# --------------------------------------------------------------------------- metadata forms, evaluate, reward


def test_metadata_as_json_and_with_none_keys():
    meta = sample_metadata(1, seed=2, tags=["colors"])[0]
    img = render(meta, seed=0)
    arrow_like = {
        "tag": meta["tag"],
        "prompt": meta["prompt"],
        "exclude": None,
        "include": [{**c, "position": None} for c in meta["include"]],
    }
    assert verify(img, json.dumps(meta)).correct
    assert verify(img, arrow_like).correct
    assert verify(np.asarray(img), meta).correct
    with pytest.raises(ValueError, match="metadata"):
        verify(img, "{not json")
    with pytest.raises(ValueError, match="include"):
        verify(img, {"tag": "colors", "prompt": "x"})


def test_evaluate_is_the_mean_of_tag_accuracies():
    metas = sample_metadata(12, seed=4, tags=["colors", "colors", "counting"])
    images = [render(m, seed=i) for i, m in enumerate(metas)]
    colour_rows = [i for i, m in enumerate(metas) if m["tag"] == "colors"]
    images[colour_rows[0]] = None  # a failed sample counts as wrong
    images[colour_rows[1]] = Image.new("RGB", (32, 32), "white")
    scores = evaluate(images, metas)
    assert scores["counts"] == {"counting": 4, "colors": 8}
    assert scores["counting"] == 1.0
    assert scores["colors"] == pytest.approx(6 / 8)
    assert scores["overall"] == pytest.approx((1.0 + 6 / 8) / 2)
    with pytest.raises(ValueError, match="lengths"):
        evaluate(images[:3], metas)


def test_verifier_reward():
    metas = sample_metadata(6, seed=9)
    images = [render(m, seed=i) for i, m in enumerate(metas)]
    images[1] = None
    images[2] = (
        render(metas[3], seed=0)
        if metas[2]["tag"] != metas[3]["tag"]
        else Image.new("RGB", (32, 32), "white")
    )
    prompts = [m["prompt"] for m in metas]
    expected = [1.0, None, 0.0, 1.0, 1.0, 1.0]
    assert verifier_reward(prompts, images, metadata=metas) == expected
    assert (
        verifier_reward(prompts, images, metadata=[json.dumps(m) for m in metas], trainer_state=None)
        == expected
    )
    assert (
        verifier_reward(prompts=prompts, completions=images, metadata=metas) == expected
    )  # autoregressive form
    assert verifier_reward(prompts=prompts, completions=[[im] for im in images], metadata=metas) == expected
    assert verifier_reward.requires_images is True and verifier_reward.__name__ == "verifier_reward"
    partial = toyworld.verifier_reward_partial
    assert partial.__name__ == "verifier_reward_partial" and partial.requires_images
    counting = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
        "prompt": "two circles",
    }
    three = render({**counting, "include": [{"class": "circle", "count": 3}], "exclude": []}, seed=0)
    assert verifier_reward([""], [three], metadata=[counting]) == [0.0]
    assert verifier_reward([""], [three], metadata=[counting], partial_credit=True) == [0.5]
    assert partial([""], [three], metadata=[counting]) == [0.5]
    with pytest.raises(ValueError, match="metadata"):
        verifier_reward(prompts, images, metadata=metas[:2])
    with pytest.raises(ValueError, match="images"):
        verifier_reward(prompts, metadata=metas)


def test_toyworld_import_is_light():
    import subprocess
    import sys

    code = "import sys, trl_intrinsic.toyworld; print(sorted(m for m in ('torch', 'trl', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imported_modules(path) -> set[str]:
    """The ``trl_intrinsic`` modules a source file imports anywhere, inside functions included."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("trl_intrinsic")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl_intrinsic"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_runtime_imports_neither_pretraining_nor_testing_nor_trainers():
    """The toy world's runtime and the autoregressive adapter sit below the trainers; the pretraining scripts
    and the test models sit above the runtime. `autoregressive` does not reach up into `rewards` either."""
    from pathlib import Path

    package = Path(toyworld.__file__).parent.parent
    runtime = [p for p in (package / "toyworld").glob("*.py")] + list(
        (package / "autoregressive").glob("*.py")
    )
    banned = ("trl_intrinsic.toyworld.pretrain", "trl_intrinsic.testing", "trl_intrinsic.trainers")
    for path in runtime:
        bad = {m for m in _imported_modules(path) if m.startswith(banned)}
        if path.parent.name == "autoregressive":
            bad |= {m for m in _imported_modules(path) if m.startswith("trl_intrinsic.rewards")}
        assert not bad, (path.name, bad)
    for path in (package / "toyworld" / "pretrain").glob("*.py"):
        assert not {m for m in _imported_modules(path) if m.startswith(banned[1:])}, path.name


def test_evaluators_load_lazily_from_the_toyworld():
    import subprocess
    import sys

    code = (
        "import sys; from trl_intrinsic import toyworld; from trl_intrinsic.toyworld import evaluation; "
        "assert toyworld.evaluate_janus is evaluation.evaluate_janus and 'describe' in dir(toyworld); "
        "print(sorted(m for m in sys.modules if m.startswith(('trl_intrinsic.toyworld.pretrain', "
        "'trl_intrinsic.testing', 'trl_intrinsic.trainers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _two_squares(dx, dy):
    """A red square at the centre-left and a blue one offset by (dx, dy) pixels, drawn at 64 px."""
    x0, y0 = 20, 24

    def draw(d):
        d.rectangle([x0, y0, x0 + 9, y0 + 9], fill=PALETTE["red"])
        d.rectangle([x0 + dx, y0 + dy, x0 + dx + 9, y0 + dy + 9], fill=PALETTE["blue"])

    return _draw(draw, size=64)


@pytest.mark.parametrize(
    ("dx", "dy", "holds"),
    [
        (16, 0, {"right of"}),
        (-16, 2, {"left of"}),
        (3, 20, {"below"}),
        (0, -18, {"above"}),
        (16, 16, {"right of", "below"}),  # diagonal: both, as in GenEval
        (12, 30, {"below"}),
    ],
)
def test_relations_follow_geneval_rule(dx, dy, holds):
    img = _two_squares(dx, dy)
    for rel in ("left of", "right of", "above", "below"):
        meta = {
            "tag": "position",
            "include": [
                {"class": "square", "count": 1, "color": "red"},
                {"class": "square", "count": 1, "color": "blue", "position": [rel, 0]},
            ],
            "prompt": f"a blue square {rel} a red square",
        }
        assert verify(img, meta).correct == (rel in holds), rel


@pytest.mark.parametrize("size", [24, 48, 128])
def test_verify_accepts_renders_at_other_sizes(size):
    metas = sample_metadata(36, seed=size) + sample_metadata(10, seed=size, split="test")
    assert all(verify(render(m, seed=i, size=size), m).correct for i, m in enumerate(metas))


def test_plot_curves_writes_a_png_of_the_requested_size_and_skips_non_finite_points(tmp_path):
    from trl_intrinsic.toyworld.report import plot_curves

    curves = {"colors": [(0, 0.6), (10, float("nan")), (20, 0.7)], "overall": [(0, 0.2), (20, 0.3)]}
    drawn = plot_curves(curves, tmp_path / "curve.png", title="accuracy", size=(480, 300))
    empty = plot_curves({"overall": [(0, float("nan"))]}, tmp_path / "empty.png", size=(480, 300))
    with Image.open(drawn) as a, Image.open(empty) as b:
        assert a.size == b.size == (480, 300)
        ink = [sum(1 for p in im.convert("L").getdata() if p < 128) for im in (a, b)]
    assert ink[0] > ink[1]  # the curves and their legend are drawn; the empty plot only says "no data"


def test_before_after_grid_shows_whole_prompts(tmp_path):
    from PIL import Image

    from trl_intrinsic.toyworld.report import _wrap, before_after_grid

    long = "a photo of a magenta triangle right of a yellow square"
    lines = _wrap(long, 16)
    assert " ".join(lines) == long and len(lines) == 4 and all(len(line) <= 16 for line in lines)
    tiles = [Image.new("RGB", (32, 32), "white")] * 2
    short_grid = Image.open(before_after_grid(["a circle", "a square"], tiles, tiles, tmp_path / "a.png"))
    long_grid = Image.open(before_after_grid(["a circle", long], tiles, tiles, tmp_path / "b.png"))
    assert long_grid.size[1] - short_grid.size[1] == 10 * 3  # three more lines of text, none cut off


def test_running_mean_and_smoothed_curves(tmp_path):
    from trl_intrinsic.toyworld.report import plot_curves, running_mean

    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    noisy = {"reward": [(i, float(i % 2)) for i in range(40)]}
    assert plot_curves(noisy, tmp_path / "smooth.png", smooth=["reward"]).is_file()
