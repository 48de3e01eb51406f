"""Rule-based verifier of toy-world images against GenEval-style metadata, and GenEval-style scoring.

Pipeline (vectorised numpy; two calls of ``scipy.ndimage.label`` per image, whatever its content):

1. **Colour segmentation.** For each pixel, its *absorbance* ``a = 255 − rgb`` is compared with each
   palette colour's absorbance ``p``. Blending a colour with the white background scales ``a``
   without turning it, so the pixel takes the palette colour whose direction is nearest (within
   ``max_angle``), provided its strength ``⟨a, p̂⟩ / |p|`` — the share of colour in the blend — is at
   least ``min_strength``. Pale, grey, black and off-palette pixels are background.
2. **Objects.** Connected components (8-connected) within each colour; components smaller than
   ``min_area`` (8 px at 32 px, scaled with the image area) are dropped as specks.
3. **Shapes** from scale-free features of each component's *soft mass* (the colour strength of its
   pixels and of the faint pixels around it, so partly covered edge rows count partly): ``fill`` =
   mass / (largest column sum × largest row sum) (square 1, circle π/4, triangle 1/2), ``skew`` of
   the vertical mass distribution (an upward triangle is bottom-heavy, −0.57; circles and squares 0)
   and ``diagonal`` = largest diagonal sum / largest column sum (square 1, circle 1/√2). ``skew`` keeps
   rounded triangles apart from circles where fill alone does not. The nearest prototype wins;
   components far from every prototype, elongated, or with holes (rings, outlines) are ``"unknown"``
   and match no clause.
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
_STRUCTURE_4 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_4[1] = ndimage.generate_binary_structure(2, 1)

MAX_ANGLE_DEG = 16.0
MIN_STRENGTH = 0.5
MIN_AREA_32 = 8.0
POSITION_THRESHOLD = 0.1

_COS_MIN = float(np.cos(np.deg2rad(MAX_ANGLE_DEG)))
_COS_FAINT = float(np.cos(np.deg2rad(30.0)))
_MIN_FAINT = 0.1


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


def _shape_features(
    lab: np.ndarray, ys: np.ndarray, xs: np.ndarray, mass: np.ndarray, n: int, height: int, width: int
) -> dict[str, np.ndarray]:
    """Scale-free shape features of components 1..n from their soft pixel masses.

    Args:
        lab, ys, xs, mass: (P,) component id, row, column and colour strength in [0, 1] of every pixel
            assigned to a component (its core pixels and the faint pixels around them).
        n: number of components; outputs are indexed 0..n (0 unused).

    Returns:
        ``mass``; ``centroid_x``/``centroid_y`` (pixels); ``fill`` = mass / (largest column sum ×
        largest row sum): square 1, circle π/4, triangle 1/2, insensitive to partly covered edge rows;
        ``skew``: skewness of the vertical mass distribution (upward triangle −0.57, circle and square
        0); ``diagonal`` = largest diagonal sum / largest column sum (square 1, circle 1/√2);
        ``aspect`` ≥ 1: ratio of the largest column and row sums.
    """
    total = np.bincount(lab, weights=mass, minlength=n + 1)
    safe = np.maximum(total, 1e-9)
    cols = np.bincount(lab * width + xs, weights=mass, minlength=(n + 1) * width).reshape(n + 1, width).max(1)
    rows = (
        np.bincount(lab * height + ys, weights=mass, minlength=(n + 1) * height).reshape(n + 1, height).max(1)
    )
    span = height + width
    diag = np.maximum(
        np.bincount(lab * span + xs + ys, weights=mass, minlength=(n + 1) * span).reshape(n + 1, span).max(1),
        np.bincount(lab * span + xs - ys + height, weights=mass, minlength=(n + 1) * span)
        .reshape(n + 1, span)
        .max(1),
    )
    cx = np.bincount(lab, weights=mass * xs, minlength=n + 1) / safe
    cy = np.bincount(lab, weights=mass * ys, minlength=n + 1) / safe
    dy = ys - cy[lab]
    var = np.bincount(lab, weights=mass * dy * dy, minlength=n + 1) / safe
    third = np.bincount(lab, weights=mass * dy * dy * dy, minlength=n + 1) / safe
    peak = np.maximum(np.maximum(cols, rows), 1e-9)
    return {
        "mass": total,
        "centroid_x": cx + 0.5,
        "centroid_y": cy + 0.5,
        "fill": total / np.maximum(cols * rows, 1e-9),
        "skew": third / np.maximum(var, 1e-9) ** 1.5,
        "diagonal": diag / np.maximum(cols, 1e-9),
        "aspect": peak / np.maximum(np.minimum(cols, rows), 1e-9),
    }


# Each shape is a prototype in feature space (fill, skew, diagonal) with a per-feature spread, measured
# on renders at 32–128 px, blurred and noisy renders, antialiased downsamples and rounded shapes.
# A component takes the shape with the smallest scaled distance, or "unknown" if even that distance
# exceeds MAX_SHAPE_DISTANCE or the component is elongated. Skew is what separates rounded triangles
# from circles: blur pulls a small triangle's fill towards π/4 but leaves it bottom-heavy.
_PROTOTYPES = {
    #            fill   skew   diagonal      spreads
    "circle": ((0.795, 0.00, 0.73), (0.035, 0.04, 0.035)),
    "square": ((0.99, 0.00, 0.95), (0.03, 0.04, 0.04)),
    "triangle": ((0.60, -0.54, 0.69), (0.07, 0.08, 0.05)),
}
_PROTO = np.asarray([c for c, _ in _PROTOTYPES.values()])  # (3, 3)
_SPREAD = np.asarray([s for _, s in _PROTOTYPES.values()])  # (3, 3)
_PROTO_NAMES = (*_PROTOTYPES, "unknown")
_FEATURE_KEYS = ("fill", "skew", "diagonal")
MAX_SHAPE_DISTANCE = 5.0
MAX_ASPECT = 1.3
MAX_HOLES = 0.2


def _classify(features: np.ndarray, aspect: np.ndarray, holes: np.ndarray) -> list[str]:
    """Shape names for ``features`` (N, 3) = (fill, skew, diagonal), aspect ratios (N,) and hole
    shares (N,): 0 for solid shapes, large for rings and outlines."""
    dist = np.sqrt((((features[:, None, :] - _PROTO[None]) / _SPREAD[None]) ** 2).sum(-1))  # (N, 3)
    idx = dist.argmin(axis=1)
    odd = (dist.min(axis=1) > MAX_SHAPE_DISTANCE) | (aspect > MAX_ASPECT) | (holes > MAX_HOLES)
    idx[odd] = len(_PROTOTYPES)
    return [_PROTO_NAMES[i] for i in idx.tolist()]


def _hole_share(planes: np.ndarray, boxes: list, core_area: np.ndarray) -> np.ndarray:
    """Share of each component's filled area that is enclosed background, indexed 0..n.

    Holes are counted inside each component's bounding box with a summed-area table of the hole mask.
    """
    # Background regions of each colour plane (4-connected) that do not touch the image border.
    background, count = ndimage.label(~planes, structure=_STRUCTURE_4)
    outside = np.zeros(count + 1, dtype=bool)
    outside[0] = True  # object pixels
    for edge in (background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]):
        outside[edge] = True
    holes = ~outside[background]
    table = np.zeros((planes.shape[0], planes.shape[1] + 1, planes.shape[2] + 1), dtype=np.int32)
    table[:, 1:, 1:] = holes.cumsum(1).cumsum(2)
    box = np.array(
        [(b[0].start, b[1].start, b[1].stop, b[2].start, b[2].stop) for b in boxes]
    )  # k y0 y1 x0 x1
    k, y0, y1, x0, x1 = box.T
    inside = table[k, y1, x1] - table[k, y0, x1] - table[k, y1, x0] + table[k, y0, x0]
    inside = np.concatenate([[0], inside]).astype(np.float64)
    return inside / np.maximum(inside + core_area, 1.0)


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
    strength = along / _NORMS[best]
    cos_min = _COS_MIN if max_angle == MAX_ANGLE_DEG else float(np.cos(np.deg2rad(max_angle)))
    core = (along >= cos_min * length) & (strength >= min_strength) & (length > 0)
    # Faint pixels (blurred or antialiased edges) only add mass to a neighbouring core component.
    faint = (along >= _COS_FAINT * length) & (strength >= _MIN_FAINT) & ~core

    planes = np.zeros((len(_COLOR_NAMES), height, width), dtype=bool)
    ys, xs = np.nonzero(core)
    planes[best[ys, xs], ys, xs] = True
    labels, n = ndimage.label(planes, structure=_STRUCTURE)
    if n == 0:
        return []
    lab = labels[best[ys, xs], ys, xs]
    core_area = np.bincount(lab, minlength=n + 1)
    if min_area is None:
        min_area = MIN_AREA_32 * (height * width) / (32.0 * 32.0)
    colour = np.zeros(n + 1, dtype=np.intp)
    colour[lab] = best[ys, xs]
    fy, fx = np.nonzero(faint)
    if fy.size:
        # A faint pixel joins a core component of its own colour among its 8 neighbours.
        flat = labels.max(axis=0)  # (H, W): each core pixel has one colour, so one label
        near = ndimage.maximum_filter(flat, size=3)[fy, fx]
        attached = (near > 0) & (colour[near] == best[fy, fx])
        ys, xs = np.concatenate([ys, fy[attached]]), np.concatenate([xs, fx[attached]])
        lab = np.concatenate([lab, near[attached]])
    mass = np.minimum(strength[ys, xs], 1.0)
    feats = _shape_features(lab, ys, xs, mass, n, height, width)

    ids = np.nonzero(core_area >= min_area)[0]
    ids = ids[ids > 0]
    if ids.size == 0:
        return []
    boxes = ndimage.find_objects(labels)
    feats["holes"] = _hole_share(planes, boxes, core_area)
    shapes = _classify(
        np.stack([feats[k][ids] for k in _FEATURE_KEYS], axis=1), feats["aspect"][ids], feats["holes"][ids]
    )
    objects = []
    for m, i in enumerate(ids.tolist()):
        box = boxes[i - 1]
        objects.append(
            DetectedObject(
                color=_COLOR_NAMES[colour[i]],
                shape=shapes[m],
                centroid=(float(feats["centroid_x"][i]), float(feats["centroid_y"][i])),
                area=int(core_area[i]),
                bbox=(box[2].start, box[1].start, box[2].stop, box[1].stop),
                features={k: float(feats[k][i]) for k in (*_FEATURE_KEYS, "aspect", "holes", "mass")},
            )
        )
    # Reading order (top-left first) for stable reports.
    objects.sort(key=lambda o: (o.bbox[1], o.bbox[0]))
    return objects


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
    return clause["class"] if "color" not in clause else f"{clause['color']} {clause['class']}"


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
                    if all(o is not t for t in chosen) and all(_relation_holds(o, t, rel) for t in chosen)
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
