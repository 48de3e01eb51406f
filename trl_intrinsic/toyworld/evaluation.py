"""Toy-world accuracy of text-to-image models: sample one image per held-out prompt, verify it.

:func:`evaluate_flow_pipeline` samples a diffusers pipeline; :func:`evaluate_janus` samples a Janus model
with :func:`~trl_intrinsic.autoregressive.janus.janus_rollout`, the rollout ``IntrinsicGRPOTrainer`` trains
on, so an evaluation sees exactly what training samples. Both return
:func:`~trl_intrinsic.toyworld.evaluate`'s scores. Prompts and sampling noise are seeded by ``seed``:
evaluate before and after training with the same seed for a paired comparison.

Importing this module loads torch; ``from trl_intrinsic.toyworld import evaluate_janus`` does so on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trl_intrinsic.toyworld.models import FLOW_SAMPLING, JANUS_SAMPLING
from trl_intrinsic.toyworld.scenes import COUNT_WORDS, TAGS, TEST_TAGS, sample_metadata
from trl_intrinsic.toyworld.verifier import evaluate

__all__ = ["blank_share", "describe", "evaluate_flow_pipeline", "evaluate_janus"]


def _metadata(n_per_tag: int, seed: int, split: str) -> list[dict]:
    """``n_per_tag`` prompts per tag of ``split`` (the held-out tags for ``"test"``), drawn with ``seed``."""
    if n_per_tag < 1:
        raise ValueError(f"n_per_tag: must be ≥ 1, got {n_per_tag}")
    tags = None if split == "test" else list(TAGS)
    n_tags = len(TEST_TAGS) if tags is None else len(tags)
    return sample_metadata(n_per_tag * n_tags, seed=seed, split=split, tags=tags)


@torch.no_grad()
def evaluate_flow_pipeline(
    pipe,
    *,
    n_per_tag: int = 200,
    seed: int = 0,
    split: str = "test",
    batch_size: int = 100,
    **sampling: Any,
) -> dict[str, Any]:
    """Toy accuracy of a text-to-image pipeline: generate one image per prompt and verify it.

    Args:
        pipe: a diffusers pipeline called as ``pipe(prompts, generator=..., **sampling)``.
        n_per_tag: prompts per tag (drawn with :func:`sample_metadata`, balanced over the tags of
            ``split``).
        seed: seeds both the prompts and the sampling noise.
        split: ``"test"`` (held-out compositions) or ``"train"``.
        batch_size: prompts per pipeline call.
        **sampling: overrides of :data:`FLOW_SAMPLING`.

    Returns:
        :func:`trl_intrinsic.toyworld.evaluate`'s dict (accuracy per tag, ``"overall"``, ``"counts"``), plus
        ``"blank"``: the share of images without content (:func:`blank_share`), the failure an intrinsic
        reward can drift to.
    """
    metas = _metadata(n_per_tag, seed, split)
    settings = {**FLOW_SAMPLING, **sampling}
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(metas), batch_size):
        prompts = [m["prompt"] for m in metas[i : i + batch_size]]
        images += pipe(prompts, generator=generator, output_type="pil", **settings).images
    return {**evaluate(images, metas), "blank": blank_share(images)}


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


@torch.no_grad()
def evaluate_janus(
    model,
    processor,
    *,
    n_per_tag: int = 100,
    seed: int = 0,
    split: str = "test",
    use_cot: bool = True,
    batch_size: int = 50,
    cot_template: str | None = None,
    return_samples: bool = False,
    **sampling: Any,
) -> dict[str, Any]:
    """Toy accuracy of a Janus model sampled as IRIS rollouts are: one image per prompt, verified.

    Each batch of prompts is one :func:`~trl_intrinsic.autoregressive.janus.janus_rollout` (the CoT request
    from ``cot_template`` with ``use_cot``, else the bare prompt; the CoT up to EOS; the image tokens under
    guidance), all drawn from one generator seeded with ``seed``.

    Args:
        model, processor: a ``JanusForConditionalGeneration`` and its processor.
        n_per_tag: prompts per tag (drawn with :func:`sample_metadata`, balanced over the tags of ``split``).
        seed: seeds both the prompts and the sampling.
        split: ``"test"`` (held-out compositions) or ``"train"``.
        use_cot: sample a chain-of-thought before the image.
        batch_size: prompts per rollout.
        cot_template: the CoT request; default the trainer's
            (:data:`~trl_intrinsic.autoregressive.janus.DEFAULT_COT_TEMPLATE`).
        return_samples: also return ``"samples"``: the metadata, CoT texts and PIL images.
        **sampling: overrides of :data:`JANUS_SAMPLING` (``cfg_weight``, ``image_temperature``,
            ``temperature``, ``max_cot_tokens``).

    Returns:
        :func:`trl_intrinsic.toyworld.evaluate`'s dict (accuracy per tag, ``"overall"``, ``"counts"``), with
        ``use_cot`` also ``"cot_exact"``: the share of CoTs equal to :func:`describe` of their metadata.
    """
    from trl_intrinsic.autoregressive.janus import janus_rollout

    metas = _metadata(n_per_tag, seed, split)
    settings = {**JANUS_SAMPLING, **sampling}
    generator = torch.Generator().manual_seed(seed)
    images, cots = [], []
    for i in range(0, len(metas), batch_size):
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
    scores = evaluate(images, metas)
    if use_cot:
        scores["cot_exact"] = float(np.mean([c.strip() == describe(m) for c, m in zip(cots, metas)]))
    if return_samples:
        scores["samples"] = {"metadata": metas, "cot": cots, "images": images}
    return scores
