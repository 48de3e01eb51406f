"""Toy-world accuracy of text-to-image models, and the one evaluation protocol every report uses.

**The evaluators.** :func:`evaluate_flow_pipeline` samples a diffusers pipeline; :func:`evaluate_janus` samples a
Janus model with :func:`~trl_intrinsic.autoregressive.janus.janus_rollout`, the rollout ``IntrinsicGRPOTrainer``
trains on, so an evaluation sees exactly what training samples. Both verify every image and return
:func:`~trl_intrinsic.toyworld.evaluate`'s scores (accuracy per tag, ``"overall"``, ``"counts"``).

**The protocol** (:class:`EvalProtocol`; pass ``protocol=`` to an evaluator). Evaluation prompts are every
distinct prompt of each tag of the split, up to ``max_prompts_per_tag`` (a fixed, evenly spaced selection above
it), each sampled ``samples_per_prompt(tag) = ⌈min_samples_per_tag / prompts of the tag⌉`` times. Every sample
is identified by ``(prompt, tag, eval_seed, sample_index)``; a flow sample's noise is derived from exactly that
(a Janus batch's from the evaluation seed and the batch's place in the protocol's fixed order), so two
evaluations with the same protocol see the same prompts and the same noise and can be **paired**
(:func:`paired_difference`). Evaluation seeds are ``≥`` :data:`EVAL_SEED_BASE` (10 000); training seeds stay
below it, and :meth:`EvalProtocol.check_training_seeds` refuses a run whose training seed is one of its
evaluation seeds. With the defaults (at most 80 distinct prompts and at least 80 samples per tag) today's
held-out split gives 434 samples over all its 68 distinct prompts of the 5 test tags (two_object 2 × 40,
counting 3 × 27, colors 3 × 27, position 6 × 14, color_attr 54 × 2); once every tag has ≥ 80 held-out prompts
it gives 400 samples over 400 distinct prompts (≥ 50 per tag: ≥ 250 distinct prompts, 2 samples each).

**The statistics.** :func:`paired_difference` gives, per tag and overall, the change of accuracy between two
evaluations on the same samples, its paired standard error for clustered samples (the samples of one prompt are
correlated: the SE comes from the per-prompt mean differences), and the flips (wrong → right, right → wrong)
with an exact two-sided binomial p-value (:func:`flip_test`). :func:`noise_floor` measures the evaluation noise
floor: the standard deviation of the overall accuracy of one model over several evaluation seeds.

**The sampler** is named in every protocol result (``"sampler"``): ``"deterministic"`` is the pipeline's own ODE
sampler (the flow evaluation default); ``"rollout"`` is the training-rollout sampler: for a flow pipeline the
SDE window and noise level of Flow-GRPO (:data:`FLOW_ROLLOUT`, sampled with :mod:`trl_intrinsic.flow.rollout`),
for Janus the IRIS rollout (the only Janus sampler).

Importing this module loads torch; ``from trl_intrinsic.toyworld import evaluate_janus`` does so on first use.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from trl_intrinsic.seeding import derived_seed
from trl_intrinsic.toyworld.models import FLOW_SAMPLING, JANUS_SAMPLING
from trl_intrinsic.toyworld.scenes import COUNT_WORDS, SPLITS, TAGS, TEST_TAGS, prompt_space, sample_metadata
from trl_intrinsic.toyworld.verifier import verify

__all__ = [
    "DEFAULT_MAX_PROMPTS_PER_TAG",
    "DEFAULT_MIN_SAMPLES_PER_TAG",
    "EVAL_SEED_BASE",
    "FLOW_ROLLOUT",
    "SAMPLERS",
    "EvalProtocol",
    "SampleResult",
    "blank_share",
    "describe",
    "evaluate_flow_pipeline",
    "evaluate_janus",
    "flip_test",
    "noise_floor",
    "paired_difference",
    "paired_mean_difference",
    "scores_from_records",
]

EVAL_SEED_BASE = 10_000
"""Evaluation seeds are ``≥ EVAL_SEED_BASE``; training seeds must stay below it (or at least never be one of
the evaluation seeds a run uses: :meth:`EvalProtocol.check_training_seeds`)."""

DEFAULT_MAX_PROMPTS_PER_TAG = 80
"""Default cap on the distinct prompts per tag (all of them while the split has fewer)."""

DEFAULT_MIN_SAMPLES_PER_TAG = 80
"""Default number of samples per tag, at least: with the 5 test tags ≥ 400 samples per evaluation."""

SAMPLERS: tuple[str, ...] = ("deterministic", "rollout")
"""``"deterministic"``: the pipeline's ODE sampler; ``"rollout"``: the training-rollout sampler."""

FLOW_ROLLOUT: dict[str, Any] = {
    "noise_level": 0.7,
    "sde_type": "flow_sde",
    "sde_window_size": 0,
    "sde_window_range": None,
}
"""Defaults of the flow rollout sampler (``FlowGRPOConfig``'s): SDE noise level and type, and the SDE window
(``0``: every step but the last is stochastic; else a window of that many steps drawn per sample within
``sde_window_range``). ``noise_level=0`` is DiffusionNFT's rollout: the ODE at the training step count."""

_NOISE_KEY = "toyworld-eval"


class SampleResult(NamedTuple):
    """One verified evaluation sample: its prompt and tag, the evaluation seed and its index among the samples
    of that prompt (together they fix its noise), and whether the verifier accepted the image."""

    prompt: str
    tag: str
    eval_seed: int
    sample_index: int
    correct: bool


@dataclass(frozen=True)
class EvalProtocol:
    """Which samples an evaluation draws: prompts, samples per prompt and the evaluation seed.

    Args:
        split: ``"test"`` (held-out compositions, the tags of :data:`TEST_TAGS`) or ``"train"`` (:data:`TAGS`).
        max_prompts_per_tag: at most this many distinct prompts per tag: all of
            ``prompt_space(tag, split)`` if it has no more, else that many evenly spaced over it (a fixed choice).
        min_samples_per_tag: each prompt of a tag is sampled ``⌈min_samples_per_tag / distinct prompts⌉`` times.
        seed: the evaluation seed, ``≥`` :data:`EVAL_SEED_BASE`. :func:`noise_floor` uses ``seed, seed + 1, …``.
        tags: the tags to evaluate; default every tag of the split.

    The noise of sample ``i`` of prompt ``p`` of a flow pipeline is drawn from ``derived_seed(seed, "toyworld-eval",
    p, i)``: it depends on nothing else (not on the batch, the other prompts or the cap), so two evaluations with
    equal protocols are paired sample by sample. A Janus rollout draws a whole batch from one generator: its
    batches are seeded from ``(seed, batch index)`` over the fixed order of :meth:`samples` (pair Janus
    evaluations with equal ``batch_size`` too).
    """

    split: str = "test"
    max_prompts_per_tag: int = DEFAULT_MAX_PROMPTS_PER_TAG
    min_samples_per_tag: int = DEFAULT_MIN_SAMPLES_PER_TAG
    seed: int = EVAL_SEED_BASE
    tags: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split: unknown split {self.split!r}; expected one of {SPLITS}")
        for name in ("max_prompts_per_tag", "min_samples_per_tag"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: must be an int ≥ 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__}")
        if self.seed < EVAL_SEED_BASE:
            raise ValueError(
                f"seed: evaluation seeds are ≥ {EVAL_SEED_BASE} so that they never coincide with a training seed "
                f"(keep those below {EVAL_SEED_BASE}); got {self.seed}. Use {EVAL_SEED_BASE} + i."
            )
        if self.tags is not None:
            tags = (self.tags,) if isinstance(self.tags, str) else tuple(self.tags)
            if not tags:
                raise ValueError("tags: must name at least one tag (or be None for every tag of the split)")
            for tag in tags:
                prompt_space(tag, self.split)  # raises on an unknown tag or a tag the split lacks
            object.__setattr__(self, "tags", tags)

    @property
    def tag_list(self) -> tuple[str, ...]:
        """The evaluated tags, in order."""
        if self.tags is not None:
            return self.tags
        return TEST_TAGS if self.split == "test" else TAGS

    def prompts(self, tag: str) -> list[dict]:
        """The metadata of the distinct prompts evaluated for ``tag`` (a fixed, seed-independent choice)."""
        space = prompt_space(tag, self.split)
        if len(space) <= self.max_prompts_per_tag:
            return space
        picks = np.linspace(0, len(space) - 1, self.max_prompts_per_tag).round().astype(int)
        return [space[i] for i in picks]

    def samples_per_prompt(self, tag: str) -> int:
        """How many times each prompt of ``tag`` is sampled."""
        return math.ceil(self.min_samples_per_tag / len(self.prompts(tag)))

    def samples(self) -> list[tuple[dict, int]]:
        """Every sample as ``(metadata, sample_index)``, tag by tag, prompt by prompt."""
        out = []
        for tag in self.tag_list:
            k = self.samples_per_prompt(tag)
            out += [(meta, i) for meta in self.prompts(tag) for i in range(k)]
        return out

    @property
    def n_samples(self) -> int:
        """Samples per evaluation."""
        return sum(len(self.prompts(t)) * self.samples_per_prompt(t) for t in self.tag_list)

    @property
    def n_prompts(self) -> int:
        """Distinct prompts per evaluation."""
        return sum(len(self.prompts(t)) for t in self.tag_list)

    def with_seed(self, seed: int) -> EvalProtocol:
        """The same protocol with another evaluation seed."""
        return replace(self, seed=seed)

    def eval_seeds(self, n: int = 1) -> list[int]:
        """The ``n`` evaluation seeds ``seed, seed + 1, …`` (the first is this protocol's)."""
        return [self.seed + i for i in range(max(1, n))]

    def sample_seed(self, prompt: str, sample_index: int) -> int:
        """The seed of the noise of sample ``sample_index`` of ``prompt``."""
        return derived_seed(self.seed, _NOISE_KEY, prompt, sample_index)

    def check_training_seeds(self, *training_seeds: int | None, n_eval_seeds: int = 1) -> None:
        """Raise ``ValueError`` if a training seed (``None`` is skipped) is one of the ``n_eval_seeds``
        evaluation seeds this protocol uses (:meth:`eval_seeds`)."""
        used = set(self.eval_seeds(n_eval_seeds))
        clash = sorted({int(s) for s in training_seeds if s is not None} & used)
        if clash:
            raise ValueError(
                f"training seed {clash[0]} is also an evaluation seed ({min(used)}–{max(used)}): evaluation seeds "
                f"must never coincide with training seeds. Train with a seed below {EVAL_SEED_BASE}."
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: the settings, and per tag the distinct prompts and samples per prompt."""
        return {
            "split": self.split,
            "seed": self.seed,
            "max_prompts_per_tag": self.max_prompts_per_tag,
            "min_samples_per_tag": self.min_samples_per_tag,
            "n_samples": self.n_samples,
            "n_prompts": self.n_prompts,
            "prompts": {t: len(self.prompts(t)) for t in self.tag_list},
            "samples_per_prompt": {t: self.samples_per_prompt(t) for t in self.tag_list},
        }


# ---------------------------------------------------------------------------------------------- scores
def scores_from_records(records: Sequence[SampleResult]) -> dict[str, Any]:
    """:func:`trl_intrinsic.toyworld.evaluate`'s scores from per-sample results (accuracy per tag,
    ``"overall"`` = mean of the tag accuracies, ``"counts"``), plus ``"prompts"``: distinct prompts per tag."""
    hits: dict[str, list[bool]] = {}
    prompts: dict[str, set[str]] = {}
    for record in records:
        hits.setdefault(record.tag, []).append(bool(record.correct))
        prompts.setdefault(record.tag, set()).add(record.prompt)
    order = [t for t in TAGS if t in hits] + sorted(t for t in hits if t not in TAGS)
    out: dict[str, Any] = {tag: float(np.mean(hits[tag])) for tag in order}
    out["overall"] = float(np.mean([out[tag] for tag in order])) if order else float("nan")
    out["counts"] = {tag: len(hits[tag]) for tag in order}
    out["prompts"] = {tag: len(prompts[tag]) for tag in order}
    return out


def _verified(
    images: Sequence[Any], samples: Sequence[tuple[dict, int]], eval_seed: int
) -> list[SampleResult]:
    return [
        SampleResult(
            meta["prompt"], meta["tag"], eval_seed, index, image is not None and verify(image, meta).correct
        )
        for image, (meta, index) in zip(images, samples, strict=True)
    ]


def _legacy_samples(n_per_tag: int, seed: int, split: str) -> list[tuple[dict, int]]:
    """``n_per_tag`` prompts per tag of ``split`` drawn with replacement with ``seed`` (the pre-protocol
    evaluation), each with its occurrence index among equal prompts."""
    if n_per_tag < 1:
        raise ValueError(f"n_per_tag: must be ≥ 1, got {n_per_tag}")
    tags = None if split == "test" else list(TAGS)
    n_tags = len(TEST_TAGS) if tags is None else len(tags)
    metas = sample_metadata(n_per_tag * n_tags, seed=seed, split=split, tags=tags)
    seen: dict[str, int] = {}
    out = []
    for meta in metas:
        out.append((meta, seen.get(meta["prompt"], 0)))
        seen[meta["prompt"]] = out[-1][1] + 1
    return out


def _resolve(protocol, n_per_tag, seed, split, default_n: int):
    """``(samples, eval_seed, protocol)`` of an evaluator call: the protocol's, or the legacy draw."""
    if protocol is not None:
        if not isinstance(protocol, EvalProtocol):
            raise TypeError(f"protocol: expected an EvalProtocol, got {type(protocol).__name__}")
        given = [
            name for name, v in (("n_per_tag", n_per_tag), ("seed", seed), ("split", split)) if v is not None
        ]
        if given:
            raise ValueError(
                f"pass either `protocol` or {', '.join(given)}, not both (the protocol sets them)"
            )
        return protocol.samples(), protocol.seed, protocol
    seed = 0 if seed is None else seed
    samples = _legacy_samples(default_n if n_per_tag is None else n_per_tag, seed, split or "test")
    return samples, seed, None


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")


def _finish(scores: dict, records: list[SampleResult], sampler: str, keep_records: bool) -> dict:
    scores["sampler"] = sampler
    if keep_records:
        scores["records"] = records
    return scores


# ---------------------------------------------------------------------------------------------- flow
@torch.no_grad()
def evaluate_flow_pipeline(
    pipe,
    *,
    protocol: EvalProtocol | None = None,
    sampler: str = "deterministic",
    rollout: Mapping[str, Any] | None = None,
    n_per_tag: int | None = None,
    seed: int | None = None,
    split: str | None = None,
    batch_size: int = 100,
    return_records: bool = False,
    **sampling: Any,
) -> dict[str, Any]:
    """Toy accuracy of a text-to-image pipeline: generate images of toy prompts and verify them.

    Args:
        pipe: a diffusers pipeline called as ``pipe(prompts, generator=..., **sampling)``.
        protocol: the evaluation protocol (:class:`EvalProtocol`): its prompts, samples and seed, each sample's
            noise derived from ``(seed, prompt, sample_index)``. Without it, the pre-protocol evaluation:
            ``n_per_tag`` prompts per tag (default 200) drawn with replacement with ``seed`` (default 0) from
            ``split`` (default ``"test"``), one noise stream for all (kept for the pretraining records).
        sampler: ``"deterministic"`` (the pipeline's ODE sampler) or ``"rollout"`` (the Flow-GRPO rollout
            sampler: SDE steps of :mod:`trl_intrinsic.flow.rollout`, settings :data:`FLOW_ROLLOUT` overridden by
            ``rollout``; needs a ``protocol``). A sample starts from the same noise under both.
        rollout: overrides of :data:`FLOW_ROLLOUT` (``"rollout"`` sampler only).
        n_per_tag, seed, split: the pre-protocol evaluation (see ``protocol``).
        batch_size: images per pipeline call.
        return_records: also return the per-sample ``"records"`` without a protocol (always with one).
        **sampling: overrides of :data:`FLOW_SAMPLING` (``num_inference_steps``, ``guidance_scale``,
            ``height``, ``width``, ``max_sequence_length``).

    Returns:
        :func:`trl_intrinsic.toyworld.evaluate`'s dict (accuracy per tag, ``"overall"``, ``"counts"``), plus
        ``"prompts"`` (distinct prompts per tag), ``"blank"`` (the share of images without content,
        :func:`blank_share`: the failure an intrinsic reward can drift to), ``"sampler"``, and ``"records"``:
        one :class:`SampleResult` per image.
    """
    _check_sampler(sampler)
    if sampler == "deterministic" and rollout:
        raise ValueError("rollout: settings of the rollout sampler; pass sampler='rollout' to use them")
    samples, eval_seed, protocol = _resolve(protocol, n_per_tag, seed, split, default_n=200)
    if sampler == "rollout" and protocol is None:
        raise ValueError("sampler='rollout' needs a `protocol` (per-sample noise); pass EvalProtocol()")
    settings = {**FLOW_SAMPLING, **sampling}
    prompts = [meta["prompt"] for meta, _ in samples]
    if protocol is None:
        generator = torch.Generator().manual_seed(eval_seed)
        images = []
        for i in range(0, len(prompts), batch_size):
            images += pipe(
                prompts[i : i + batch_size], generator=generator, output_type="pil", **settings
            ).images
    else:
        seeds = [protocol.sample_seed(meta["prompt"], index) for meta, index in samples]
        if sampler == "deterministic":
            images = []
            for i in range(0, len(prompts), batch_size):
                generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
                images += pipe(
                    prompts[i : i + batch_size], generator=generators, output_type="pil", **settings
                ).images
        else:
            images = _flow_rollout_images(
                pipe, prompts, seeds, settings, {**FLOW_ROLLOUT, **(rollout or {})}, batch_size
            )
    records = _verified(images, samples, eval_seed)
    scores = {**scores_from_records(records), "blank": blank_share(images)}
    return _finish(scores, records, sampler, protocol is not None or return_records)


def _flow_rollout_images(
    pipe, prompts: list[str], seeds: list[int], settings: dict, rollout: dict, batch_size: int
) -> list:
    """Images sampled as Flow-GRPO's rollouts are: the SDE inside each sample's window, Euler steps elsewhere.

    Sample ``i`` starts from the noise ``torch.Generator().manual_seed(seeds[i])`` draws (as the
    deterministic sampler does), continues that generator for its SDE noise, and draws its window from
    ``derived_seed(seeds[i], "window")``; samples with equal windows share transformer batches.
    """
    from trl_intrinsic.flow.pipelines import get_flow_adapter
    from trl_intrinsic.flow.rollout import sample_trajectories, sde_window

    unknown = set(rollout) - set(FLOW_ROLLOUT)
    if unknown:
        raise ValueError(
            f"rollout: unknown settings {sorted(unknown)}; expected keys of {sorted(FLOW_ROLLOUT)}"
        )
    adapter = get_flow_adapter(pipe)
    steps, height, width = settings["num_inference_steps"], settings["height"], settings["width"]
    guidance = settings["guidance_scale"]
    sigmas, timesteps = adapter.set_timesteps(steps, height, width)
    unique = list(dict.fromkeys(prompts))
    embeddings = adapter.encode_prompts(
        unique,
        negative_prompt=settings.get("negative_prompt", "") if guidance > 1.0 else None,
        max_sequence_length=settings.get("max_sequence_length"),
    )
    rows = torch.tensor([unique.index(p) for p in prompts], device=adapter.device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seeds):
        window = sde_window(
            steps,
            window_size=rollout["sde_window_size"],
            window_range=rollout["sde_window_range"],
            generator=torch.Generator().manual_seed(derived_seed(s, "window")),
        )
        groups.setdefault(tuple(window), []).append(i)
    images: list = [None] * len(prompts)
    for window, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seeds[i]) for i in chunk]
            noise = adapter.prepare_latents(len(chunk), height, width, generators)
            trajectories = sample_trajectories(
                adapter,
                embeddings,
                rows[chunk],
                noise,
                sigmas,
                timesteps,
                sde_steps=list(window),
                guidance_scale=guidance,
                noise_level=float(rollout["noise_level"]),
                sde_type=rollout["sde_type"],
                generator=generators,
            )
            for i, image in zip(
                chunk, adapter.decode(trajectories.final_latents, height, width), strict=True
            ):
                images[i] = image
    return images


def blank_share(images: Sequence[Any]) -> float:
    """Share of PIL images whose pixel standard deviation (0–1 units, mean over RGB) is below
    :data:`~trl_intrinsic.flow.diagnostics.BLANK_IMAGE_STD`."""
    from trl_intrinsic.flow.diagnostics import BLANK_IMAGE_STD, image_std

    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
    return float((image_std(pixels.permute(0, 3, 1, 2).float() / 255) < BLANK_IMAGE_STD).float().mean())


def _noun(clause: dict) -> str:
    shape = clause["class"] + ("s" if clause["count"] > 1 else "")
    return shape if clause.get("color") is None else f"{clause['color']} {shape}"


def describe(metadata: dict) -> str:
    """The chain-of-thought the toy Janus learns for ``metadata``: objects, colours, counts, positions.

    Deterministic, e.g. ``"one red circle and one green square ; the circle is right of the square ;
    white background ."``; an IRIS rollout's CoT is this text followed by EOS.
    """
    include = metadata["include"]
    parts = [" and ".join(f"{COUNT_WORDS[c['count']]} {_noun(c)}" for c in include)]
    for clause in include:
        if clause.get("position"):
            relation, index = clause["position"]
            parts.append(f"the {clause['class']} is {relation} the {include[index]['class']}")
    parts.append("white background .")
    return " ; ".join(parts)


# ---------------------------------------------------------------------------------------------- Janus
@torch.no_grad()
def evaluate_janus(
    model,
    processor,
    *,
    protocol: EvalProtocol | None = None,
    sampler: str = "rollout",
    n_per_tag: int | None = None,
    seed: int | None = None,
    split: str | None = None,
    use_cot: bool = True,
    batch_size: int = 50,
    cot_template: str | None = None,
    return_samples: bool = False,
    return_records: bool = False,
    **sampling: Any,
) -> dict[str, Any]:
    """Toy accuracy of a Janus model sampled as IRIS rollouts are, each image verified.

    Each batch of samples is one :func:`~trl_intrinsic.autoregressive.janus.janus_rollout` (the CoT request
    from ``cot_template`` with ``use_cot``, else the bare prompt; the CoT up to EOS; the image tokens under
    guidance). ``janus_rollout`` draws a batch from one generator, so with a ``protocol`` batch ``b`` uses
    ``derived_seed(seed, "toyworld-eval-janus", b)`` over the protocol's fixed sample order: evaluations are
    paired when they use the same protocol and ``batch_size``.

    Args:
        model, processor: a ``JanusForConditionalGeneration`` and its processor.
        protocol: the evaluation protocol (:class:`EvalProtocol`). Without it, the pre-protocol evaluation:
            ``n_per_tag`` prompts per tag (default 100) drawn with replacement with ``seed`` (default 0) from
            ``split`` (default ``"test"``), one generator for all batches.
        sampler: ``"rollout"``, the only one: the IRIS rollout is how a Janus model samples.
        n_per_tag, seed, split: the pre-protocol evaluation (see ``protocol``).
        use_cot: sample a chain-of-thought before the image.
        batch_size: samples per rollout.
        cot_template: the CoT request; default the trainer's
            (:data:`~trl_intrinsic.autoregressive.janus.DEFAULT_COT_TEMPLATE`).
        return_samples: also return ``"samples"``: the metadata, CoT texts and PIL images.
        return_records: also return the per-sample ``"records"`` without a protocol (always with one).
        **sampling: overrides of :data:`JANUS_SAMPLING` (``cfg_weight``, ``image_temperature``,
            ``temperature``, ``max_cot_tokens``).

    Returns:
        :func:`trl_intrinsic.toyworld.evaluate`'s dict (accuracy per tag, ``"overall"``, ``"counts"``), plus
        ``"prompts"`` (distinct prompts per tag), ``"sampler"`` and ``"records"`` (one :class:`SampleResult` per
        image); with ``use_cot`` also ``"cot_exact"``: the share of CoTs equal to :func:`describe` of their
        metadata.
    """
    from trl_intrinsic.autoregressive.janus import janus_rollout

    if sampler != "rollout":
        raise ValueError(
            f"sampler: a Janus model samples with its rollout only (sampler='rollout'), got {sampler!r}"
        )
    samples, eval_seed, protocol = _resolve(protocol, n_per_tag, seed, split, default_n=100)
    metas = [meta for meta, _ in samples]
    settings = {**JANUS_SAMPLING, **sampling}
    generator = torch.Generator().manual_seed(eval_seed)
    images, cots = [], []
    for b, i in enumerate(range(0, len(metas), batch_size)):
        if protocol is not None:
            generator = torch.Generator().manual_seed(derived_seed(eval_seed, "toyworld-eval-janus", b))
        rollout = janus_rollout(
            model,
            processor,
            [m["prompt"] for m in metas[i : i + batch_size]],
            max_cot_tokens=settings["max_cot_tokens"],
            use_cot=use_cot,
            cot_template=cot_template,
            temperature=settings["temperature"],
            cfg_weight=settings["cfg_weight"],
            image_temperature=settings["image_temperature"],
            generator=generator,
        )
        images += rollout.images
        cots += rollout.cot_text
    records = _verified(images, samples, eval_seed)
    scores = scores_from_records(records)
    if use_cot:
        scores["cot_exact"] = float(np.mean([c.strip() == describe(m) for c, m in zip(cots, metas)]))
    if return_samples:
        scores["samples"] = {"metadata": metas, "cot": cots, "images": images}
    return _finish(scores, records, "rollout", protocol is not None or return_records)


# ---------------------------------------------------------------------------------------------- statistics
def flip_test(wrong_to_right: int, right_to_wrong: int) -> float:
    """Exact two-sided binomial p-value of McNemar's test: under "no change" a flip is equally likely to go
    either way, so ``wrong_to_right ~ Binomial(flips, 1/2)``; ``p = min(1, 2 P(X ≤ min(b, c)))``.

    It treats every sample as independent; the samples of one prompt are correlated, so read it beside the
    paired SE of :func:`paired_difference`, which accounts for that.
    """
    b, c = int(wrong_to_right), int(right_to_wrong)
    if b < 0 or c < 0:
        raise ValueError(f"flip counts must be ≥ 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_mean_difference(pairs: Sequence[tuple[Any, float, float]]) -> tuple[float, float]:
    """Mean of ``after − before`` over ``(cluster, before, after)`` pairs and its paired SE, clustered (the cluster
    is the prompt: its samples are correlated).

    With ``m`` clusters, ``N`` pairs and ``e_c`` the sum over cluster ``c`` of the deviations of its differences
    from the mean, the cluster-robust SE is ``√(m / (m − 1) · Σ_c e_c²) / N``; with equal cluster sizes it is
    ``sd(cluster mean differences) / √m``. It is never taken below the SE that treats the pairs as independent,
    ``sd(differences) / √N``: with few clusters the clustered estimate is itself noisy and can come out 0 (two
    prompts that each gained one sample). With a single cluster it is that per-sample SE (the change on that
    prompt); NaN with a single pair.
    """
    if not pairs:
        raise ValueError("pairs: no (cluster, before, after) pairs")
    diffs = np.array([a - b for _, b, a in pairs], dtype=float)
    mean = float(diffs.mean())
    n = len(diffs)
    independent = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    sums: dict[Any, float] = {}
    for (cluster, _, _), d in zip(pairs, diffs, strict=True):
        sums[cluster] = sums.get(cluster, 0.0) + (d - mean)
    m = len(sums)
    if m < 2:
        return mean, independent
    e = np.array(list(sums.values()))
    return mean, max(float(math.sqrt(m / (m - 1) * float((e**2).sum())) / n), independent)


def _keyed(records: Iterable[SampleResult], name: str) -> dict[tuple, SampleResult]:
    out = {}
    for record in records:
        record = SampleResult(*record)
        key = (record.tag, record.prompt, record.eval_seed, record.sample_index)
        if key in out:
            raise ValueError(f"{name}: sample {key} appears twice")
        out[key] = record
    return out


def paired_difference(
    before: Iterable[SampleResult], after: Iterable[SampleResult]
) -> dict[str, dict[str, Any]]:
    """The change of accuracy from ``before`` to ``after``, two evaluations of the same samples.

    Args:
        before, after: the ``"records"`` of two evaluations with the same protocol (same prompts, evaluation
            seed and sample indices; :class:`SampleResult` or equal tuples).

    Returns:
        ``{tag: entry, …, "overall": entry}``, each entry with ``"value"`` (accuracy after − before),
        ``"paired_se"``, ``"before"``, ``"after"``, ``"n"`` (paired samples), ``"prompts"`` (distinct prompts),
        ``"wrong_to_right"``, ``"right_to_wrong"`` and ``"flip_p_value"`` (:func:`flip_test`). Per tag the SE is
        the cluster-robust SE over prompts (samples of one prompt are correlated; with equal samples per prompt
        it is the SD of the per-prompt mean differences over √prompts), never below the per-sample paired SE
        (:func:`paired_mean_difference`). ``"overall"``
        is the mean of the tag changes, as the overall accuracy is the mean of the tag accuracies; its SE is
        ``√(Σ SE_tag²) / tags`` (the tags are disjoint sets of prompts), its flips the sums.

    Raises:
        ValueError: if the two evaluations do not cover exactly the same samples.
    """
    b, a = _keyed(before, "before"), _keyed(after, "after")
    if b.keys() != a.keys():
        only_b, only_a = len(b.keys() - a.keys()), len(a.keys() - b.keys())
        raise ValueError(
            f"before/after: not the same samples ({only_b} only before, {only_a} only after); evaluate both "
            "with the same EvalProtocol (prompts, evaluation seed, samples per prompt)"
        )
    if not b:
        raise ValueError("before/after: no samples")
    by_tag: dict[str, list[tuple]] = {}
    for key in b:
        by_tag.setdefault(key[0], []).append(key)
    order = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
    out: dict[str, dict[str, Any]] = {}
    for tag in order:
        keys = by_tag[tag]
        pairs = [(k[1], float(b[k].correct), float(a[k].correct)) for k in keys]
        value, se = paired_mean_difference(pairs)
        up = sum(1 for _, x, y in pairs if y > x)
        down = sum(1 for _, x, y in pairs if y < x)
        out[tag] = {
            "value": value,
            "paired_se": se,
            "before": float(np.mean([x for _, x, _ in pairs])),
            "after": float(np.mean([y for _, _, y in pairs])),
            "n": len(pairs),
            "prompts": len({k[1] for k in keys}),
            "wrong_to_right": up,
            "right_to_wrong": down,
            "flip_p_value": flip_test(up, down),
        }
    entries = [out[t] for t in order]
    up, down = sum(e["wrong_to_right"] for e in entries), sum(e["right_to_wrong"] for e in entries)
    out["overall"] = {
        "value": float(np.mean([e["value"] for e in entries])),
        "paired_se": math.sqrt(sum(e["paired_se"] ** 2 for e in entries)) / len(entries),
        "before": float(np.mean([e["before"] for e in entries])),
        "after": float(np.mean([e["after"] for e in entries])),
        "n": sum(e["n"] for e in entries),
        "prompts": sum(e["prompts"] for e in entries),
        "wrong_to_right": up,
        "right_to_wrong": down,
        "flip_p_value": flip_test(up, down),
    }
    return out


def noise_floor(
    evaluate_fn: Callable[[EvalProtocol], Mapping[str, Any]],
    protocol: EvalProtocol,
    n_seeds: int = 5,
    *,
    known: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The evaluation noise floor of one model: the SD of its overall accuracy over ``n_seeds`` evaluation seeds.

    Args:
        evaluate_fn: evaluates the model under a protocol and returns the evaluator's scores, e.g.
            ``lambda p: evaluate_flow_pipeline(pipe, protocol=p)``.
        protocol: the protocol; the seeds are ``protocol.eval_seeds(n_seeds)`` = ``seed, seed + 1, …`` (the
            prompts stay the same: what varies is the sampling noise, as between two evaluations of a model).
        n_seeds: at least 2; 5 or more for a usable SD.
        known: scores already measured, by evaluation seed (e.g. the report's own evaluation at ``seed``), reused
            instead of sampled again.

    Returns:
        ``{"sd", "mean", "n_seeds", "seeds", "overall": [per seed], "per_tag_sd": {tag: SD}, "n_samples",
        "prompts"}`` (``n_samples`` and ``prompts`` per evaluation).
    """
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 2:
        raise ValueError(
            f"n_seeds: the SD needs at least 2 evaluation seeds (5 or more advised), got {n_seeds!r}"
        )
    seeds = protocol.eval_seeds(n_seeds)
    known = known or {}
    runs = [known[s] if s in known else evaluate_fn(protocol.with_seed(s)) for s in seeds]
    tags = list(runs[0].get("counts", {}))
    overall = [float(r["overall"]) for r in runs]
    return {
        "sd": statistics.stdev(overall),
        "mean": statistics.fmean(overall),
        "n_seeds": n_seeds,
        "seeds": seeds,
        "overall": overall,
        "per_tag_sd": {t: statistics.stdev([float(r[t]) for r in runs]) for t in tags},
        "n_samples": protocol.n_samples,
        "prompts": protocol.n_prompts,
    }
