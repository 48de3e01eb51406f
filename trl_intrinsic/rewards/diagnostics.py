"""Does a reward track a reference metric? Within-group statistics of scores against a reference.

GRPO uses a reward only *within* a prompt group: the advantage of an image is its reward minus the mean of
its group. What matters is therefore whether, among the images of one prompt, the reward ranks the better
images (by a reference: the toy verifier, CLIPScore, a human label) above the worse ones. For scores
``s``, reference values ``r`` and prompt groups ``g``, one value per sample:

* **within-group AUROC** (binary reference) — over every pair ``(i, j)`` of one group with ``r_i > r_j``,
  the share where ``s_i > s_j``, ties in ``s`` counting ½; the pairs of all groups are pooled. For a
  continuous reference the same number is the within-group **pairwise concordance** (Harrell's C). 0.5 is
  no signal; below 0.5 the score prefers the worse images (anti-aligned);
* **mean within-group Spearman** — the rank correlation of ``s`` and ``r`` inside each group (average
  ranks for ties; 0 when ``s`` is constant in the group), averaged over groups;
* **informative groups and pairs** — a group whose reference is constant (every image correct, or every
  image wrong) says nothing about the ranking and is left out of both statistics;
* **bootstrap standard errors over groups** — informative groups are resampled with replacement (a
  group's images share a prompt and are not independent), with a seeded generator.

:func:`alignment` computes these for one score (and per tag), :func:`diagnose` for several,
:func:`format_table` prints them. :class:`ScoreRecorder` wraps reward functions so that a trainer's own
rollouts can be scored (``examples/reward_diagnostics.py`` drives ``FlowGRPOTrainer`` and
``IntrinsicGRPOTrainer`` this way), and :func:`brightness`, :func:`ink_share`, :func:`latent_std` and
:class:`RandomScore` are calibration baselines. :func:`mean_pairwise_similarity` gives the jackknife
standard error of a mean pairwise cosine (``examples/gradient_snr.py``).

Pure numpy/scipy: no model code, no torch import.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "INK_CHROMA",
    "RandomScore",
    "ScoreRecorder",
    "alignment",
    "brightness",
    "diagnose",
    "format_table",
    "group_statistics",
    "ink_share",
    "is_binary",
    "latent_std",
    "mean_pairwise_similarity",
]

INK_CHROMA = 0.25
"""A pixel is *coloured* (ink) when ``max(rgb) − min(rgb)`` is at least this share of 255: saturated
colours and their blends with a white background count, white, grey and black do not."""


# ---------------------------------------------------------------------------------------------- statistics
def is_binary(reference: Sequence[float] | np.ndarray) -> bool:
    """Whether every finite reference value is 0 or 1 (then the pair statistic is an AUROC)."""
    values = np.asarray(reference, dtype=np.float64)
    values = values[np.isfinite(values)]
    return bool(np.isin(values, (0.0, 1.0)).all())


def _rank_correlation(scores: np.ndarray, reference: np.ndarray) -> float:
    """Spearman's ρ with average ranks; 0 when the scores are constant (no ranking to compare)."""
    a, b = rankdata(scores), rankdata(reference)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def group_statistics(
    scores: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable],
) -> dict[str, np.ndarray]:
    """Per-group ingredients of the statistics, one entry per group with at least two valid samples.

    Samples where the score or the reference is NaN (a reward that returned ``None``) are dropped first.

    Returns:
        ``{"group": ids, "wins": (G,), "pairs": (G,), "spearman": (G,)}``: ``pairs`` counts the unordered
        pairs of the group whose reference values differ, ``wins`` those the score orders the same way (ties
        in the score count ½), ``spearman`` the group's rank correlation (NaN for an uninformative group,
        ``pairs == 0``). Groups appear in the order of their first sample.
    """
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if s.shape != r.shape or s.ndim != 1 or len(groups) != len(s):
        raise ValueError(
            f"scores, reference and groups must be 1-D and of equal length, got {s.shape}, {r.shape} and "
            f"{len(groups)}."
        )
    ids, wins, pairs, rhos = [], [], [], []
    order: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        order.setdefault(group, []).append(i)
    for group, rows in order.items():
        rows = np.asarray(rows)
        rows = rows[np.isfinite(s[rows]) & np.isfinite(r[rows])]
        if len(rows) < 2:
            continue
        gs, gr = s[rows], r[rows]
        higher = gr[:, None] > gr[None, :]  # (i, j): i has the better reference
        n_pairs = int(higher.sum())
        concordant = (gs[:, None] > gs[None, :]) & higher
        tied = (gs[:, None] == gs[None, :]) & higher
        ids.append(group)
        pairs.append(n_pairs)
        wins.append(float(concordant.sum()) + 0.5 * float(tied.sum()))
        rhos.append(_rank_correlation(gs, gr) if n_pairs else math.nan)
    return {
        "group": np.asarray(ids, dtype=object),
        "wins": np.asarray(wins, dtype=np.float64),
        "pairs": np.asarray(pairs, dtype=np.int64),
        "spearman": np.asarray(rhos, dtype=np.float64),
    }


def _summary(
    wins: np.ndarray, pairs: np.ndarray, rhos: np.ndarray, n_total: int, n_bootstrap: int, seed: int
):
    """The statistics of the informative groups given (``pairs > 0``), with bootstrap SEs over them."""
    n = len(pairs)
    result: dict[str, Any] = {
        "auroc": float(wins.sum() / pairs.sum()) if n else None,
        "auroc_se": None,
        "spearman": float(rhos.mean()) if n else None,
        "spearman_se": None,
        "n_groups": int(n),
        "n_pairs": int(pairs.sum()),
        "n_groups_total": int(n_total),
    }
    if n >= 2 and n_bootstrap >= 2:
        picks = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
        result["auroc_se"] = float((wins[picks].sum(1) / pairs[picks].sum(1)).std(ddof=1))
        result["spearman_se"] = float(rhos[picks].mean(1).std(ddof=1))
    return result


def alignment(
    scores: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable],
    tags: Sequence[str | None] | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How well ``scores`` rank the samples of each group by ``reference`` (see the module docstring).

    Args:
        scores: one score per sample (NaN: the score does not apply; the sample is dropped).
        reference: one reference value per sample: binary (0/1: the pair statistic is the AUROC) or
            continuous (the pairwise concordance); NaN drops the sample.
        groups: the prompt group of each sample (any hashable ids; equal ids = one group).
        tags: the tag of each sample (constant within a group), for a per-tag breakdown; ``None`` for none.
        n_bootstrap: bootstrap resamples of the informative groups for the standard errors.
        seed: seeds the bootstrap: equal arguments give equal results.

    Returns:
        ``{"auroc", "auroc_se", "spearman", "spearman_se", "n_groups", "n_pairs", "n_groups_total",
        "by_tag"}``: ``n_groups`` counts the informative groups (reference not constant), ``n_pairs`` their
        pairs with different reference values, ``n_groups_total`` the groups with at least two valid
        samples. Statistics are ``None`` without an informative group, standard errors with fewer than two.
        ``by_tag`` maps each tag (sorted) to the same entries without ``by_tag``; ``{}`` without tags.
    """
    stats = group_statistics(scores, reference, groups)
    informative = stats["pairs"] > 0
    result = _summary(
        stats["wins"][informative],
        stats["pairs"][informative],
        stats["spearman"][informative],
        len(stats["pairs"]),
        n_bootstrap,
        seed,
    )
    result["by_tag"] = {}
    if tags is None:
        return result
    if len(tags) != len(groups):
        raise ValueError(f"tags: {len(tags)} tags for {len(groups)} samples.")
    tag_of: dict[Hashable, str | None] = {}
    for group, tag in zip(groups, tags, strict=True):
        if tag_of.setdefault(group, tag) != tag:
            raise ValueError(f"tags: group {group!r} has samples tagged {tag_of[group]!r} and {tag!r}.")
    group_tags = np.asarray([tag_of[g] for g in stats["group"]], dtype=object)
    for tag in sorted({t for t in tag_of.values() if t is not None}):
        mine = group_tags == tag
        keep = mine & informative
        result["by_tag"][tag] = _summary(
            stats["wins"][keep],
            stats["pairs"][keep],
            stats["spearman"][keep],
            int(mine.sum()),
            n_bootstrap,
            seed,
        )
    return result


def diagnose(
    scores: Mapping[str, Sequence[float] | np.ndarray],
    reference: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable],
    tags: Sequence[str | None] | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`alignment` of every score in ``scores`` (``{name: one value per sample}``) against one
    reference; ``{name: result}`` in the order given. Every score uses the same bootstrap resamples."""
    return {
        name: alignment(values, reference, groups, tags, n_bootstrap=n_bootstrap, seed=seed)
        for name, values in scores.items()
    }


def _cell(value: float | None, se: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"


def format_table(results: Mapping[str, Mapping[str, Any]], statistic: str = "AUROC") -> str:
    """A Markdown table of :func:`diagnose` results: one row per score, then, when there are tags, one table
    of the pair statistic per tag (``n`` = informative groups). ``statistic`` names the pair statistic
    (``"AUROC"`` for a binary reference, ``"concordance"`` for a continuous one)."""
    lines = [
        f"| score | {statistic} | Spearman | informative groups | pairs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_cell(r['auroc'], r['auroc_se'])} | {_cell(r['spearman'], r['spearman_se'])} | "
            f"{r['n_groups']} / {r['n_groups_total']} | {r['n_pairs']} |"
        )
    tags = sorted({tag for r in results.values() for tag in r.get("by_tag", {})})
    if tags:
        lines += ["", f"| {statistic} by tag | " + " | ".join(tags) + " |", "|---|" + "---:|" * len(tags)]
        for name, r in results.items():
            cells = []
            for tag in tags:
                t = r["by_tag"].get(tag)
                cells.append("—" if t is None else f"{_cell(t['auroc'], t['auroc_se'])} (n={t['n_groups']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_pairwise_similarity(similarity: np.ndarray) -> tuple[float, float | None]:
    """Mean of the off-diagonal entries of a symmetric ``(K, K)`` similarity matrix of ``K`` estimates
    (e.g. cosines of independent gradient estimates), and its jackknife standard error over the estimates.

    The ``K(K−1)/2`` pairs share estimates, so their spread understates the uncertainty; the jackknife
    leaves out one *estimate* at a time: with ``m_k`` the mean over the pairs without estimate ``k`` and
    ``m̄`` the mean of the ``m_k``, ``SE = sqrt((K−1)/K · Σ_k (m_k − m̄)²)``. ``None`` for ``K < 3``.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    k = sim.shape[0]
    if sim.shape != (k, k) or k < 2:
        raise ValueError(f"similarity must be a (K, K) matrix with K ≥ 2, got shape {sim.shape}.")
    upper = np.triu_indices(k, 1)
    mean = float(sim[upper].mean())
    if k < 3:
        return mean, None
    off = sim.copy()
    np.fill_diagonal(off, 0.0)
    total, row = sim[upper].sum(), off.sum(axis=1)  # row[k]: the sum of the pairs holding estimate k
    leave_out = (total - row) / ((k - 1) * (k - 2) / 2)
    se = math.sqrt((k - 1) / k * float(((leave_out - leave_out.mean()) ** 2).sum()))
    return mean, se


# ---------------------------------------------------------------------------------------------- baselines
def _images(images: Sequence[Any] | None, completions: Sequence[Any] | None) -> list[np.ndarray]:
    """(H, W, 3) float arrays in [0, 1] from flow ``images`` or autoregressive ``completions``."""
    items = images if images is not None else completions
    if items is None:
        raise ValueError("images: this baseline needs images (flow trainers) or completions (Janus).")
    arrays = []
    for item in items:
        if isinstance(item, list | tuple):  # an autoregressive completion may hold its image in a list
            item = item[0]
        if hasattr(item, "convert"):
            item = item.convert("RGB")
        array = np.asarray(item, dtype=np.float32)[..., :3]
        arrays.append(array / 255.0 if array.max(initial=0.0) > 1.0 else array)
    return arrays


def brightness(prompts=None, images=None, completions=None, **kwargs) -> list[float]:
    """Calibration baseline: the mean pixel value of each image, in [0, 1] (on a white canvas: emptiness)."""
    return [float(a.mean()) for a in _images(images, completions)]


def ink_share(prompts=None, images=None, completions=None, **kwargs) -> list[float]:
    """Calibration baseline: the share of coloured pixels of each image (chroma ≥ :data:`INK_CHROMA`)."""
    return [float(((a.max(-1) - a.min(-1)) >= INK_CHROMA).mean()) for a in _images(images, completions)]


def latent_std(prompts=None, images=None, latents=None, **kwargs) -> list[float | None]:
    """Calibration baseline (flow trainers): the spatial standard deviation of each final latent, averaged
    over channels (``collapse/latent_std``). ``None`` for every row without a ``latents`` kwarg."""
    if latents is None:
        n = len(prompts) if prompts is not None else len(images or kwargs.get("completions") or ())
        return [None] * n
    if hasattr(latents, "detach"):  # a torch tensor
        latents = latents.detach().float().cpu().numpy()
    x = np.asarray(latents, dtype=np.float64)
    return [float(v) for v in x.reshape(x.shape[0], x.shape[1], -1).std(axis=-1).mean(axis=1)]


latent_std.requires_images = False  # type: ignore[attr-defined]


class RandomScore:
    """Calibration baseline: independent uniform scores, from a generator seeded once (its AUROC is 0.5 in
    expectation; the measured one shows the noise of the statistic at this number of groups)."""

    __name__ = "random"
    requires_images = False

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def __call__(self, prompts=None, images=None, completions=None, **kwargs) -> list[float]:
        n = len(prompts if prompts is not None else images if images is not None else completions)
        return self._rng.random(n).tolist()


# ---------------------------------------------------------------------------------------------- recording
def _is_async(func: Callable) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _tag(metadata: Any) -> str | None:
    if isinstance(metadata, str):
        import json

        try:
            metadata = json.loads(metadata)
        except ValueError:
            return None
    return metadata.get("tag") if isinstance(metadata, Mapping) else None


class ScoreRecorder:
    """Records the values reward functions return inside a trainer, with the prompt group and tag of each
    sample, so the trainer's own rollouts can be diagnosed.

    ``wrap(func, name)`` returns a reward function that calls ``func`` unchanged (sync or async; its
    ``requires_images`` is kept) and records its values (``None`` → NaN). The first wrapped function also
    records, on each call, the prompt group of every row — the ``group_ids`` kwarg of the flow trainers, or,
    without it, the order (TRL's sampler puts each prompt ``num_generations`` times in a row) — and its tag
    (a ``tag`` column, else the ``"tag"`` of a ``metadata`` column). Groups of successive calls never share
    an id. Pass every wrapped function to one trainer; each call of the trainer's rewards is one batch.
    """

    def __init__(self, num_generations: int):
        if num_generations < 1:
            raise ValueError(f"num_generations must be ≥ 1, got {num_generations}.")
        self.num_generations = num_generations
        self.values: dict[str, list[float]] = {}
        self.groups: list[int] = []
        self.tags: list[str | None] = []
        self.prompts: list[str] = []

    def _record(self, name: str, values: Any, prompts: Sequence[Any] | None, kwargs: dict[str, Any]) -> None:
        values = values.tolist() if hasattr(values, "tolist") else values
        values = [math.nan if v is None else float(v) for v in values]
        if name == next(iter(self.values)):  # the first wrapped function records the rows' groups and tags
            n = len(values)
            group_ids = kwargs.get("group_ids")
            if group_ids is None:
                local = [i // self.num_generations for i in range(n)]
            else:
                local = [int(g) for g in group_ids]
            offset, base = (max(self.groups) + 1 if self.groups else 0), (min(local) if local else 0)
            self.groups += [offset + g - base for g in local]
            if kwargs.get("tag") is not None:
                self.tags += [None if t is None else str(t) for t in kwargs["tag"]]
            elif kwargs.get("metadata") is not None:
                self.tags += [_tag(m) for m in kwargs["metadata"]]
            else:
                self.tags += [None] * n
            self.prompts += [str(p) for p in prompts] if prompts is not None else [""] * n
        self.values[name] += values

    def wrap(self, func: Callable, name: str) -> Callable:
        """``func`` as a reward function named ``name`` that records what it returns."""
        if name in self.values:
            raise ValueError(f"A score named {name!r} is already recorded.")
        self.values[name] = []

        if _is_async(func):

            async def recorded(*args, **kwargs):
                values = await func(*args, **kwargs)
                self._record(name, values, args[0] if args else kwargs.get("prompts"), kwargs)
                return values

        else:

            def recorded(*args, **kwargs):
                values = func(*args, **kwargs)
                self._record(name, values, args[0] if args else kwargs.get("prompts"), kwargs)
                return values

        recorded.__name__ = recorded.__qualname__ = name
        recorded.requires_images = getattr(func, "requires_images", True)
        return recorded

    def table(self) -> dict[str, Any]:
        """``{"scores": {name: (N,) array}, "groups": [...], "tags": [...] or None, "prompts": [...]}`` over
        every recorded sample; ``tags`` is ``None`` when no sample has one."""
        n = len(self.groups)
        for name, values in self.values.items():
            if len(values) != n:
                raise RuntimeError(f"{name!r} recorded {len(values)} values for {n} samples.")
        has_tags = any(t is not None for t in self.tags)
        return {
            "scores": {name: np.asarray(v, dtype=np.float64) for name, v in self.values.items()},
            "groups": list(self.groups),
            "tags": list(self.tags) if has_tags else None,
            "prompts": list(self.prompts),
        }
