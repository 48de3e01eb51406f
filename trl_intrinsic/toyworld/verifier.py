"""Rule-based verifier of toy-world images against GenEval-style metadata, and GenEval-style scoring.

Pipeline (all vectorised; one call of ``scipy.ndimage.label`` per image):

1. **Colour segmentation.** For each pixel, its *absorbance* ``a = 255 − rgb`` is compared with each
   palette colour's absorbance ``p``. Blending a colour with the white background scales ``a``
   without turning it, so the pixel takes the palette colour whose direction is nearest (within
   ``max_angle``), provided its strength ``⟨a, p̂⟩ / |p|`` — the share of colour in the blend — is at
   least ``min_strength``. Pale, grey, black and off-palette pixels are background.
2. **Objects.** Connected components (8-connected) within each colour; components smaller than
   ``min_area`` (8 px at 32 px, scaled with the image area) are dropped as specks.
3. **Shapes** from three scale-free features of the component in its bounding box: ``fill`` (area /
   box area: square ≈ 1, circle ≈ π/4, triangle ≈ 1/2), ``top`` (share of the pixels in the top half:
   an upward triangle ≈ 1/4, circles and squares ≈ 1/2) and ``corners`` (how full the four corner
   cells of the box are: square ≈ 1, circle ≈ 0). ``top`` keeps rounded triangles apart from circles
   where ``fill`` alone would not; ``corners`` separates rounded squares from circles.
   Elongated or sparse components are ``"unknown"`` and match no clause.
4. **Clauses** with GenEval's semantics: an include clause needs at least ``count`` objects of its
   class (and colour); an exclude clause with count ``c`` needs fewer than ``c``; a position clause
   ``[relation, j]`` needs its objects to stand in ``relation`` to those of clause ``j``, judged from
   pixel centroids with GenEval's rule (offset shrunk by 0.1 × the two objects' extents, then the
   relation's component must exceed half of the offset's length).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from trl_intrinsic.toyworld.scenes import PALETTE, TAGS, normalize_metadata

__all__ = ["ClauseResult", "DetectedObject", "VerifyResult", "detect_objects", "evaluate", "verify"]

_COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
_ABSORBANCE = 255.0 - np.asarray([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)  # (K, 3)
_NORMS = np.linalg.norm(_ABSORBANCE, axis=1)  # (K,)
_UNIT = (_ABSORBANCE / _NORMS[:, None]).astype(np.float32)  # (K, 3)

# Per-colour 2-D 8-connectivity on a (K, H, W) stack: components never cross colour planes.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True

MAX_ANGLE_DEG = 16.0
MIN_STRENGTH = 0.5
MIN_AREA_32 = 8.0
POSITION_THRESHOLD = 0.1

_COS_MIN = float(np.cos(np.deg2rad(MAX_ANGLE_DEG)))


@dataclass(frozen=True)
class DetectedObject:
    """A detected object: palette colour, shape (or ``"unknown"``), pixel centroid ``(x, y)``,
    area in pixels, bounding box ``(x0, y0, x1, y1)`` (exclusive ends) and the shape features."""

    color: str
    shape: str
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]
    features: dict[str, float] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ClauseResult:
    """The outcome of one include/exclude clause: ``found`` counts the matching objects."""

    kind: str
    index: int
    expected: dict
    found: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class VerifyResult:
    """Whether an image satisfies its metadata, with the evidence."""

    correct: bool
    objects: list[DetectedObject]
    clauses: list[ClauseResult]
    reason: str

    @property
    def score(self) -> float:
        """Share of satisfied clauses (include and exclude), in [0, 1]."""
        return sum(c.ok for c in self.clauses) / max(len(self.clauses), 1)


def _to_array(image: Any) -> np.ndarray:
    """An (H, W, 3) float32 array in [0, 255] from a PIL image or an (H, W, 3|4) uint8/float array."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.float32)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image: expected an (H, W, 3) array, got shape {image.shape}")
        arr = image[..., :3]
        if arr.dtype == np.uint8:
            return arr.astype(np.float32)
        arr = arr.astype(np.float32)
        return arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    raise TypeError(f"image: expected a PIL image or a numpy array, got {type(image).__name__}")


# Shape prototypes in feature space (fill, top, corners) and the feature scales of the distance:
# a component takes the nearest prototype, or "unknown" if even that one is far.
_PROTOTYPES = {
    "circle": (0.79, 0.50, 0.15),
    "square": (1.00, 0.50, 1.00),
    "triangle": (0.55, 0.28, 0.42),
}
_PROTO = np.asarray(list(_PROTOTYPES.values()))  # (3, 3)
_PROTO_NAMES = (*_PROTOTYPES, "unknown")
_FEATURE_SCALE = np.asarray([0.1, 0.05, 0.3])
MAX_SHAPE_DISTANCE = 4.0
MAX_ASPECT = 1.6


def _classify(features: np.ndarray, aspect: np.ndarray) -> list[str]:
    """Shape names for ``features`` (N, 3) = (fill, top, corners) and box aspect ratios (N,)."""
    dist = np.sqrt((((features[:, None, :] - _PROTO[None]) / _FEATURE_SCALE) ** 2).sum(-1))  # (N, 3)
    idx = dist.argmin(axis=1)
    idx[(dist.min(axis=1) > MAX_SHAPE_DISTANCE) | (aspect > MAX_ASPECT)] = len(_PROTOTYPES)
    return [_PROTO_NAMES[i] for i in idx.tolist()]


def detect_objects(
    image: Any,
    *,
    max_angle: float = MAX_ANGLE_DEG,
    min_strength: float = MIN_STRENGTH,
    min_area: float | None = None,
) -> list[DetectedObject]:
    """Segment ``image`` into palette-coloured objects and classify their shapes (see module doc)."""
    arr = _to_array(image)
    height, width = arr.shape[:2]
    absorb = 255.0 - arr  # (H, W, 3)
    proj = absorb @ _UNIT.T  # (H, W, K): length of each pixel's absorbance along each palette direction
    best = proj.argmax(axis=-1)  # (H, W)
    along = np.take_along_axis(proj, best[..., None], axis=-1)[..., 0]
    length = np.sqrt((absorb * absorb).sum(axis=-1))
    cos_min = _COS_MIN if max_angle == MAX_ANGLE_DEG else float(np.cos(np.deg2rad(max_angle)))
    keep = (along >= cos_min * length) & (along >= min_strength * _NORMS[best]) & (length > 0)

    planes = np.zeros((len(_COLOR_NAMES), height, width), dtype=bool)
    ys, xs = np.nonzero(keep)
    planes[best[ys, xs], ys, xs] = True
    labels, n = ndimage.label(planes, structure=_STRUCTURE)
    if n == 0:
        return []
    kk, ys, xs = np.nonzero(labels)
    lab = labels[kk, ys, xs]
    area = np.bincount(lab, minlength=n + 1)
    if min_area is None:
        min_area = MIN_AREA_32 * (height * width) / (32.0 * 32.0)
    boxes = ndimage.find_objects(labels)
    bounds = np.array([(s[1].start, s[1].stop, s[2].start, s[2].stop) for s in boxes])  # (n, 4) y0 y1 x0 x1
    bounds = np.concatenate([np.zeros((1, 4), dtype=bounds.dtype), bounds])
    y0, y1, x0, x1 = bounds.T
    h, w = y1 - y0, x1 - x0
    colour = np.zeros(n + 1, dtype=np.intp)
    colour[lab] = kk

    # Per-pixel positions inside the box of their component, in integer half-pixel units.
    dy2 = 2 * (ys - y0[lab]) + 1  # in (0, 2h)
    dx2 = 2 * (xs - x0[lab]) + 1
    hh, ww = h[lab], w[lab]
    top_w = (dy2 < hh) + 0.5 * (dy2 == hh)
    corner_y = (5 * dy2 < 2 * hh) | (5 * dy2 > 8 * hh)  # outer fifths of the box
    corner_x = (5 * dx2 < 2 * ww) | (5 * dx2 > 8 * ww)
    top = np.bincount(lab, weights=top_w, minlength=n + 1)
    corner_px = np.bincount(lab, weights=corner_y & corner_x, minlength=n + 1)
    corner_cells = _corner_cells(h, w)
    sum_x = np.bincount(lab, weights=xs, minlength=n + 1)
    sum_y = np.bincount(lab, weights=ys, minlength=n + 1)

    ids = np.nonzero(area >= min_area)[0]
    ids = ids[ids > 0]
    if ids.size == 0:
        return []
    a = area[ids].astype(np.float64)
    fill = a / (h[ids] * w[ids])
    top_share = top[ids] / a
    corners = corner_px[ids] / np.maximum(corner_cells[ids], 1)
    aspect = np.maximum(h[ids], w[ids]) / np.minimum(h[ids], w[ids])
    shapes = _classify(np.stack([fill, top_share, corners], axis=1), aspect)
    objects = []
    for m, i in enumerate(ids.tolist()):
        objects.append(
            DetectedObject(
                color=_COLOR_NAMES[colour[i]],
                shape=shapes[m],
                centroid=(float(sum_x[i] / area[i] + 0.5), float(sum_y[i] / area[i] + 0.5)),
                area=int(area[i]),
                bbox=(int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])),
                features={
                    "fill": float(fill[m]),
                    "top": float(top_share[m]),
                    "corners": float(corners[m]),
                    "aspect": float(aspect[m]),
                },
            )
        )
    # Reading order (top-left first) for stable reports.
    objects.sort(key=lambda o: (o.bbox[1], o.bbox[0]))
    return objects


def _corner_cells(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Number of pixels in the four corner cells (outer fifths in both axes) of an h×w box."""
    d2h = 2 * np.arange(int(h.max(initial=0))) + 1
    d2w = 2 * np.arange(int(w.max(initial=0))) + 1
    out = np.zeros(h.shape, dtype=np.float64)
    for i, (hi, wi) in enumerate(zip(h.tolist(), w.tolist())):
        if hi == 0:
            continue
        ry = np.count_nonzero((5 * d2h[:hi] < 2 * hi) | (5 * d2h[:hi] > 8 * hi))
        rx = np.count_nonzero((5 * d2w[:wi] < 2 * wi) | (5 * d2w[:wi] > 8 * wi))
        out[i] = ry * rx
    return out


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """GenEval's rule on centroids: shrink the offset a − b by 0.1 × (extent a + extent b) per axis,
    then the relation's component must exceed half of the unshrunk offset's length."""
    ax, ay = a.centroid
    bx, by = b.centroid
    off = np.array([ax - bx, ay - by])
    dims = np.array(
        [a.bbox[2] - a.bbox[0] + b.bbox[2] - b.bbox[0], a.bbox[3] - a.bbox[1] + b.bbox[3] - b.bbox[1]],
        dtype=np.float64,
    )
    norm = float(np.hypot(*off))
    revised = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0.0) * np.sign(off)
    if norm == 0.0 or np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / norm
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def _matches(obj: DetectedObject, clause: Mapping[str, Any]) -> bool:
    return obj.shape == clause["class"] and ("color" not in clause or obj.color == clause["color"])


def _describe(clause: Mapping[str, Any]) -> str:
    noun = clause["class"] if "color" not in clause else f"{clause['color']} {clause['class']}"
    return f"{noun}"


def _check(objects: list[DetectedObject], meta: dict) -> tuple[list[ClauseResult], bool]:
    include = meta["include"]
    candidates = [[o for o in objects if _matches(o, clause)] for clause in include]
    results: list[ClauseResult] = []
    for i, clause in enumerate(include):
        found = len(candidates[i])
        need = clause["count"]
        if found < need:
            results.append(
                ClauseResult(
                    "include", i, clause, found, False, f"expected ≥{need} {_describe(clause)}, found {found}"
                )
            )
            continue
        if "position" in clause:
            rel, j = clause["position"]
            target = include[j]
            if len(candidates[j]) < target["count"]:
                results.append(
                    ClauseResult("include", i, clause, found, False, f"no {_describe(target)} to be {rel}")
                )
                continue
            # Some choice of the target clause's objects must have ≥ count objects of this clause in
            # the relation to all of them (GenEval takes its detector's top-scoring objects instead).
            ok = False
            for chosen in itertools.islice(itertools.combinations(candidates[j], target["count"]), 256):
                placed = [
                    o
                    for o in candidates[i]
                    if o not in chosen and all(_relation_holds(o, t, rel) for t in chosen)
                ]
                if len(placed) >= need:
                    ok = True
                    break
            if not ok:
                results.append(
                    ClauseResult(
                        "include",
                        i,
                        clause,
                        found,
                        False,
                        f"{_describe(clause)} not {rel} {_describe(target)}",
                    )
                )
                continue
        results.append(ClauseResult("include", i, clause, found, True))
    for i, clause in enumerate(meta.get("exclude", [])):
        found = sum(_matches(o, clause) for o in objects)
        ok = found < clause["count"]
        reason = "" if ok else f"expected <{clause['count']} {_describe(clause)}, found {found}"
        results.append(ClauseResult("exclude", i, clause, found, ok, reason))
    return results, all(r.ok for r in results)


def verify(image: Any, metadata: Mapping[str, Any] | str) -> VerifyResult:
    """Check that ``image`` (PIL image or (H, W, 3) array) satisfies ``metadata`` (dict or JSON).

    Returns a :class:`VerifyResult`; ``reason`` is ``"ok"`` or the failed clauses joined by ``"; "``.
    """
    meta = normalize_metadata(metadata)
    objects = detect_objects(image)
    clauses, correct = _check(objects, meta)
    reason = "ok" if correct else "; ".join(c.reason for c in clauses if not c.ok)
    return VerifyResult(correct=correct, objects=objects, clauses=clauses, reason=reason)


def evaluate(images: Sequence[Any], metadatas: Sequence[Mapping[str, Any] | str]) -> dict[str, Any]:
    """GenEval-style scores: accuracy per tag, ``"overall"`` = mean of the tag accuracies, and
    ``"counts"`` = number of images per tag. A ``None`` image counts as wrong."""
    if len(images) != len(metadatas):
        raise ValueError(f"images/metadatas: lengths differ ({len(images)} vs {len(metadatas)})")
    hits: dict[str, list[bool]] = {}
    for image, metadata in zip(images, metadatas):
        meta = normalize_metadata(metadata)
        ok = image is not None and verify(image, meta).correct
        hits.setdefault(meta["tag"], []).append(ok)
    order = [t for t in TAGS if t in hits] + sorted(t for t in hits if t not in TAGS)
    out: dict[str, Any] = {tag: float(np.mean(hits[tag])) for tag in order}
    out["overall"] = float(np.mean([out[tag] for tag in order])) if order else float("nan")
    out["counts"] = {tag: len(hits[tag]) for tag in order}
    return out
