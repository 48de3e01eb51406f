"""The toy world: a synthetic shapes domain that stands in for GenEval on a CPU.

Light on purpose: importing it needs numpy, PIL and scipy only. The evaluators
and the evaluation protocol (:mod:`~trl_intrinsic.toyworld.evaluation`: ``evaluate_flow_pipeline``,
``evaluate_janus``, ``EvalProtocol``, ``paired_difference``, ``noise_floor``, …) need torch and are imported on
first use. The pretraining of the shipped toy models lives in
:mod:`trl_intrinsic.toyworld.pretrain`, which the runtime never imports.
"""

from typing import TYPE_CHECKING

from trl_intrinsic._lazy import lazy_exports
from trl_intrinsic.toyworld.models import (
    FLOW_SAMPLING,
    JANUS_SAMPLING,
    TOY_FLOW_DIR,
    TOY_JANUS_DIR,
    load_toy_janus,
    load_toy_pipeline,
)
from trl_intrinsic.toyworld.rendering import render
from trl_intrinsic.toyworld.reward import make_verifier_reward, verifier_reward, verifier_reward_partial
from trl_intrinsic.toyworld.scenes import (
    HELD_OUT_COUNTS,
    HELD_OUT_PAIRS,
    HELD_OUT_POSITIONS,
    HELD_OUT_SHAPE_ORDERS,
    PALETTE,
    RELATIONS,
    SHAPES,
    TAGS,
    TEST_TAGS,
    held_out_compositions,
    normalize_metadata,
    prompt_space,
    sample_metadata,
)
from trl_intrinsic.toyworld.verifier import DetectedObject, VerifyResult, detect_objects, evaluate, verify

__all__ = [
    "EVAL_SEED_BASE",
    "FLOW_SAMPLING",
    "HELD_OUT_COUNTS",
    "HELD_OUT_PAIRS",
    "HELD_OUT_POSITIONS",
    "HELD_OUT_SHAPE_ORDERS",
    "JANUS_SAMPLING",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "TAGS",
    "TEST_TAGS",
    "TOY_FLOW_DIR",
    "TOY_JANUS_DIR",
    "DetectedObject",
    "EvalProtocol",
    "SampleResult",
    "VerifyResult",
    "blank_share",
    "describe",
    "detect_objects",
    "evaluate",
    "evaluate_flow_pipeline",
    "evaluate_janus",
    "flip_test",
    "held_out_compositions",
    "load_toy_janus",
    "load_toy_pipeline",
    "make_verifier_reward",
    "noise_floor",
    "normalize_metadata",
    "paired_difference",
    "paired_mean_difference",
    "prompt_space",
    "render",
    "sample_metadata",
    "scores_from_records",
    "verifier_reward",
    "verifier_reward_partial",
    "verify",
]

_LAZY = dict.fromkeys(
    (
        "EVAL_SEED_BASE",
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
    ),
    "trl_intrinsic.toyworld.evaluation",
)

if TYPE_CHECKING:  # pragma: no cover
    from trl_intrinsic.toyworld.evaluation import (
        EVAL_SEED_BASE,
        EvalProtocol,
        SampleResult,
        blank_share,
        describe,
        evaluate_flow_pipeline,
        evaluate_janus,
        flip_test,
        noise_floor,
        paired_difference,
        paired_mean_difference,
        scores_from_records,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
