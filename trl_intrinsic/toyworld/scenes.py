"""The toy world's vocabulary, its GenEval-style prompts and metadata, and the held-out split.

Metadata follows GenEval's schema::

    {"tag": "position",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a circle right of a square"}

An ``include`` clause asks for at least ``count`` objects of ``class`` (with ``color`` if given);
``"position": [relation, j]`` asks that they stand in ``relation`` to the objects of clause ``j``.
An ``exclude`` clause with count ``c`` asks for fewer than ``c`` such objects (counting prompts use
it to make the count exact, as GenEval does).

Every tag has a finite prompt space (:func:`prompt_space`). The ``"test"`` split holds the prompts
that contain at least one *held-out composition*, and the ``"train"`` split all the others:

- colour–shape pairings :data:`HELD_OUT_PAIRS` (one colour per shape; tags ``colors``, ``color_attr``),
- shape–count pairings :data:`HELD_OUT_COUNTS` (tag ``counting``: the count the prompt names),
- mention orders of two shapes :data:`HELD_OUT_SHAPE_ORDERS` (tag ``two_object``),
- spatial arrangements :data:`HELD_OUT_POSITIONS` (tag ``position``; an arrangement is held out under
  both of its phrasings, "a circle left of a square" and "a square right of a circle").

``single_object`` prompts ("a photo of a circle") carry no composition, so the test split has none
of them: :data:`TEST_TAGS` lists the tags it covers.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "COUNT_WORDS",
    "HELD_OUT_COUNTS",
    "HELD_OUT_PAIRS",
    "HELD_OUT_POSITIONS",
    "HELD_OUT_SHAPE_ORDERS",
    "MAX_PROMPT_WORDS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "TAGS",
    "TEST_TAGS",
    "held_out_compositions",
    "normalize_metadata",
    "prompt_space",
    "sample_metadata",
]

# Saturated colours chosen so that their directions away from white ("absorbance" 255 − rgb) are at
# least 37° apart: a colour blended with the white background (antialiasing, blur) keeps its
# direction, which is what the verifier classifies.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "green": (0, 190, 0),
    "blue": (0, 0, 240),
    "yellow": (250, 230, 0),
    "magenta": (230, 0, 230),
    "cyan": (0, 220, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TEST_TAGS: tuple[str, ...] = tuple(tag for tag in TAGS if tag != "single_object")
SPLITS: tuple[str, ...] = ("train", "test")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_PROMPT_WORDS = 12

_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square")}
)
"""(colour, shape) pairings that only test prompts mention."""

HELD_OUT_COUNTS: frozenset[tuple[str, int]] = frozenset({("circle", 4), ("square", 2), ("triangle", 3)})
"""(shape, count) pairings that only test counting prompts name (the include clause's count)."""

HELD_OUT_SHAPE_ORDERS: frozenset[tuple[str, str]] = frozenset(
    {("triangle", "circle"), ("square", "triangle")}
)
"""Ordered (first, second) shape mentions that only test ``two_object`` prompts use."""

_HELD_OUT_ARRANGEMENTS = (
    ("circle", "left of", "square"),
    ("triangle", "above", "circle"),
    ("square", "below", "triangle"),
)
HELD_OUT_POSITIONS: frozenset[tuple[str, str, str]] = frozenset(
    itertools.chain.from_iterable(((a, rel, b), (b, _MIRROR[rel], a)) for a, rel, b in _HELD_OUT_ARRANGEMENTS)
)
"""(shape A, relation, shape B) = "A relation B", both phrasings of each held-out arrangement."""


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _mention(shape: str, color: str | None = None) -> str:
    noun = shape if color is None else f"{color} {shape}"
    return f"{_article(noun)} {noun}"


def _clause(shape: str, count: int = 1, color: str | None = None, position: list | None = None) -> dict:
    clause: dict[str, Any] = {"class": shape, "count": count}
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = position
    return clause


def _enumerate(tag: str) -> list[dict]:
    """Every metadata dict of ``tag``, in a fixed order."""
    out: list[dict] = []
    if tag == "single_object":
        for shape in SHAPES:
            out.append({"include": [_clause(shape)], "prompt": f"a photo of {_mention(shape)}"})
    elif tag == "two_object":
        for a, b in itertools.permutations(SHAPES, 2):
            out.append(
                {"include": [_clause(a), _clause(b)], "prompt": f"a photo of {_mention(a)} and {_mention(b)}"}
            )
    elif tag == "counting":
        for shape, count in itertools.product(SHAPES, COUNT_WORDS):
            noun = shape if count == 1 else _plural(shape)
            out.append(
                {
                    "include": [_clause(shape, count)],
                    "exclude": [_clause(shape, count + 1)],
                    "prompt": f"a photo of {COUNT_WORDS[count]} {noun}",
                }
            )
    elif tag == "colors":
        for shape, color in itertools.product(SHAPES, PALETTE):
            out.append(
                {"include": [_clause(shape, color=color)], "prompt": f"a photo of {_mention(shape, color)}"}
            )
    elif tag == "position":
        # GenEval's form: the reference object is clause 0, the placed object clause 1.
        for (a, b), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
            out.append(
                {
                    "include": [_clause(b), _clause(a, position=[rel, 0])],
                    "prompt": f"a photo of {_mention(a)} {rel} {_mention(b)}",
                }
            )
    elif tag == "color_attr":
        for (a, b), (ca, cb) in itertools.product(
            itertools.permutations(SHAPES, 2), itertools.permutations(PALETTE, 2)
        ):
            out.append(
                {
                    "include": [_clause(a, color=ca), _clause(b, color=cb)],
                    "prompt": f"a photo of {_mention(a, ca)} and {_mention(b, cb)}",
                }
            )
    else:  # pragma: no cover - guarded by callers
        raise ValueError(f"tag: unknown tag {tag!r}; expected one of {TAGS}")
    return [{"tag": tag, **meta} for meta in out]


def held_out_compositions(metadata: Mapping[str, Any] | str) -> set[tuple]:
    """The held-out compositions that ``metadata`` mentions (empty for every train prompt).

    Returns a set of tuples tagged by kind: ``("pair", colour, shape)``, ``("count", shape, count)``,
    ``("order", first, second)``, ``("position", a, relation, b)``.
    """
    meta = normalize_metadata(metadata)
    found: set[tuple] = set()
    include = meta["include"]
    for clause in [*include, *meta.get("exclude", [])]:
        if "color" in clause and (clause["color"], clause["class"]) in HELD_OUT_PAIRS:
            found.add(("pair", clause["color"], clause["class"]))
    if meta["tag"] == "counting":
        for clause in include:
            if (clause["class"], clause["count"]) in HELD_OUT_COUNTS:
                found.add(("count", clause["class"], clause["count"]))
    if meta["tag"] == "two_object" and len(include) == 2:
        order = (include[0]["class"], include[1]["class"])
        if order in HELD_OUT_SHAPE_ORDERS:
            found.add(("order", *order))
    for clause in include:
        if "position" in clause:
            rel, j = clause["position"]
            phrase = (clause["class"], rel, include[j]["class"])
            if phrase in HELD_OUT_POSITIONS:
                found.add(("position", *phrase))
    return found


@functools.cache
def _space(tag: str, split: str) -> tuple[str, ...]:
    keep = []
    for meta in _enumerate(tag):
        held_out = bool(held_out_compositions(meta))
        if held_out == (split == "test"):
            keep.append(json.dumps(meta))
    return tuple(keep)


def _check_tag_split(tag: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; expected one of {SPLITS}")
    if tag not in TAGS:
        raise ValueError(f"tags: unknown tag {tag!r}; expected tags from {TAGS}")
    if split == "test" and tag not in TEST_TAGS:
        raise ValueError(
            f"tags: {tag!r} prompts mention no composition, so the test split has none; "
            f"use tags from {TEST_TAGS} with split='test'"
        )


def prompt_space(tag: str, split: str = "train") -> list[dict]:
    """All metadata dicts of ``tag`` in ``split`` (fresh copies, in a fixed order)."""
    _check_tag_split(tag, split)
    return [json.loads(s) for s in _space(tag, split)]


def sample_metadata(
    n: int, *, seed: int, tags: Sequence[str] | None = None, split: str = "train"
) -> list[dict]:
    """Sample ``n`` GenEval-style metadata dicts, deterministically given ``seed``.

    Args:
        n: number of dicts (≥ 0).
        seed: seed of the sampler.
        tags: the tags to draw from, balanced: tag ``k`` gets ``n / len(tags)`` dicts (±1). Repeat a
            tag to oversample it. ``None``: every tag of the split (:data:`TAGS` for train,
            :data:`TEST_TAGS` for test).
        split: ``"train"`` or ``"test"`` (prompts with at least one held-out composition).

    Returns:
        A list of ``{"tag", "include", "exclude"?, "prompt"}`` dicts in random order; prompts are
        drawn uniformly, with replacement, from the tag's prompt space.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: must be ≥ 0, got {n}")
    if split not in SPLITS:
        raise ValueError(f"split: unknown split {split!r}; expected one of {SPLITS}")
    if tags is None:
        tags = TAGS if split == "train" else TEST_TAGS
    elif isinstance(tags, str):
        tags = [tags]
    tags = list(tags)
    if not tags:
        raise ValueError("tags: must name at least one tag (or be None for all)")
    for tag in tags:
        _check_tag_split(tag, split)

    rng = np.random.default_rng(seed)
    per_row = [tags[i % len(tags)] for i in range(n)]
    order = rng.permutation(n)
    out = []
    for i in order:
        space = _space(per_row[i], split)
        out.append(json.loads(space[int(rng.integers(len(space)))]))
    return out


def normalize_metadata(metadata: Mapping[str, Any] | str) -> dict:
    """Parse and validate one metadata item (a dict or a JSON string).

    Keys whose value is ``None`` are dropped, at the top level and inside clauses: ``datasets`` fills
    the missing keys of a struct column with ``None``.
    """
    if isinstance(metadata, (str, bytes)):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as err:
            raise ValueError(f"metadata: not valid JSON ({err})") from None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a dict or a JSON string, got {type(metadata).__name__}")
    meta = {k: v for k, v in metadata.items() if v is not None}
    if "include" not in meta:
        raise ValueError("metadata: missing the 'include' list of clauses")
    meta.setdefault("tag", "unknown")
    for key in ("include", "exclude"):
        if key not in meta:
            continue
        clauses = []
        for clause in meta[key]:
            if not isinstance(clause, Mapping):
                raise TypeError(f"metadata[{key!r}]: clauses must be dicts, got {type(clause).__name__}")
            clause = {k: v for k, v in clause.items() if v is not None}
            if "class" not in clause:
                raise ValueError(f"metadata[{key!r}]: clause {clause} has no 'class'")
            clause["count"] = int(clause.get("count", 1))
            if "position" in clause:
                rel, j = clause["position"]
                if rel not in _MIRROR:
                    raise ValueError(
                        f"metadata[{key!r}]: unknown relation {rel!r}; expected one of {RELATIONS}"
                    )
                clause["position"] = [rel, int(j)]
            clauses.append(clause)
        meta[key] = clauses
    for i, clause in enumerate(meta["include"]):
        if "position" in clause and not 0 <= clause["position"][1] < len(meta["include"]):
            raise ValueError(
                f"metadata['include'][{i}]: position index {clause['position'][1]} is out of range"
            )
    return meta
