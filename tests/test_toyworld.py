"""Tests of the toy world: sampling, rendering, the verifier, scoring and the verifier reward."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    render,
    sample_metadata,
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
        if meta["tag"] == "counting" and (clause["class"], clause["count"]) in HELD_OUT_COUNTS:
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
