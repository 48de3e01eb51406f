"""The toy world's evaluation protocol: fixed prompts and evaluation seeds, paired statistics, the noise floor and
the report's JSON (hand computations on small tables; tiny random pipelines for the evaluators)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.toyworld import TEST_TAGS, prompt_space, render, sample_metadata
from trl_intrinsic.toyworld.evaluation import (
    DEFAULT_MIN_SAMPLES_PER_TAG,
    EVAL_SEED_BASE,
    EvalProtocol,
    SampleResult,
    evaluate_flow_pipeline,
    flip_test,
    noise_floor,
    paired_difference,
    paired_mean_difference,
    scores_from_records,
)
from trl_intrinsic.toyworld.report import change_verdict, format_change, write_accuracy_report
from trl_intrinsic.toyworld.verifier import evaluate

TINY = {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 32, "width": 32, "max_sequence_length": 1}


def _records(table: dict[str, dict[str, list[int]]], seed: int = EVAL_SEED_BASE) -> list[SampleResult]:
    """``{tag: {prompt: [correct of sample 0, 1, ...]}}`` → records."""
    return [
        SampleResult(prompt, tag, seed, i, bool(c))
        for tag, prompts in table.items()
        for prompt, outcomes in prompts.items()
        for i, c in enumerate(outcomes)
    ]


# ------------------------------------------------------------------------------------------- paired statistics
BEFORE = {
    "counting": {"A": [0, 0], "B": [1, 0], "C": [1, 1]},
    "position": {"P": [0], "Q": [1]},
}
AFTER = {
    "counting": {"A": [1, 1], "B": [1, 1], "C": [0, 1]},
    "position": {"P": [1], "Q": [1]},
}


def test_paired_difference_matches_a_hand_computation():
    diff = paired_difference(_records(BEFORE), _records(AFTER))
    assert list(diff) == ["counting", "position", "overall"]  # tags in TAGS order, then overall

    # counting: per-prompt mean differences A 1, B 0.5, C -0.5 → mean 1/3; their SD over √3 prompts.
    counting = diff["counting"]
    sd = math.sqrt(((1 - 1 / 3) ** 2 + (0.5 - 1 / 3) ** 2 + (-0.5 - 1 / 3) ** 2) / 2)
    assert counting["value"] == pytest.approx(1 / 3)
    assert counting["paired_se"] == pytest.approx(sd / math.sqrt(3))
    assert counting["paired_se"] == pytest.approx(0.440959, abs=1e-6)
    assert (counting["before"], counting["after"]) == (pytest.approx(0.5), pytest.approx(5 / 6))
    assert (counting["n"], counting["prompts"]) == (6, 3)
    assert (counting["wrong_to_right"], counting["right_to_wrong"]) == (3, 1)
    assert counting["flip_p_value"] == pytest.approx(10 / 16)  # 2 · P(X ≤ 1), X ~ Bin(4, 1/2)

    # position: differences 1 and 0 over 2 prompts → 0.5 ± sd(1, 0)/√2 = 0.5.
    position = diff["position"]
    assert position["value"] == pytest.approx(0.5) and position["paired_se"] == pytest.approx(0.5)
    assert (position["wrong_to_right"], position["right_to_wrong"], position["flip_p_value"]) == (1, 0, 1.0)

    # overall = mean of the tag changes; SE = √(Σ SE²) / tags; flips summed.
    overall = diff["overall"]
    assert overall["value"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert overall["paired_se"] == pytest.approx(math.sqrt(0.440959**2 + 0.25) / 2, abs=1e-6)
    assert (overall["n"], overall["prompts"]) == (8, 5)
    assert (overall["wrong_to_right"], overall["right_to_wrong"]) == (4, 1)
    assert overall["flip_p_value"] == pytest.approx(2 * (1 + 5) / 32)
    # The overall before/after are the overall accuracies (means of the tag accuracies), as evaluate() reports.
    assert overall["before"] == pytest.approx(scores_from_records(_records(BEFORE))["overall"])
    assert overall["after"] == pytest.approx(scores_from_records(_records(AFTER))["overall"])


def test_paired_se_with_unequal_samples_per_prompt_is_the_cluster_robust_se():
    # Prompt X: differences (1, 1, 0), prompt Y: (0,), prompt Z: (-1, 0): N = 6, mean 1/6.
    pairs = [("X", 0, 1), ("X", 0, 1), ("X", 1, 1), ("Y", 1, 1), ("Z", 1, 0), ("Z", 0, 0)]
    value, se = paired_mean_difference(pairs)
    mean = 1 / 6
    sums = [(1 - mean) + (1 - mean) + (0 - mean), 0 - mean, (-1 - mean) + (0 - mean)]
    assert value == pytest.approx(mean)
    assert se == pytest.approx(math.sqrt(3 / 2 * sum(e * e for e in sums)) / 6)
    # The SE never drops below the per-sample paired SE: two prompts that each gained one of four samples have
    # equal per-prompt changes (a clustered SE of 0), yet 2 flips of 8 samples are no certainty.
    gained = [(p, int(i > 0), 1) for p in ("X", "Y") for i in range(4)]
    gain, gain_se = paired_mean_difference(gained)
    assert gain == pytest.approx(0.25) and gain_se == pytest.approx(
        statistics.stdev([1, 0, 0, 0] * 2) / math.sqrt(8)
    )
    # A single prompt: the per-sample SE (the change on that prompt); a single pair: unknown.
    assert paired_mean_difference([("X", 0, 1), ("X", 1, 1)])[1] == pytest.approx(0.5)
    assert math.isnan(paired_mean_difference([("X", 0, 1)])[1])
    # Samples of one prompt are not independent: repeating each sample k times leaves the SE unchanged, where a
    # per-sample SE would shrink by √k.
    value3, se3 = paired_mean_difference([p for p in pairs for _ in range(3)])
    assert (value3, se3) == (pytest.approx(value), pytest.approx(se))


def test_flip_test_is_the_exact_two_sided_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert flip_test(0, 0) == 1.0
    assert flip_test(3, 1) == pytest.approx(0.625)
    assert flip_test(10, 0) == pytest.approx(2 / 2**10)
    assert flip_test(5, 5) == 1.0
    for b, c in [(7, 2), (2, 7), (30, 12), (0, 6), (100, 70)]:
        assert flip_test(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue)
    with pytest.raises(ValueError, match="flip counts"):
        flip_test(-1, 2)


def test_paired_difference_refuses_evaluations_of_different_samples():
    before = _records(BEFORE)
    with pytest.raises(ValueError, match="not the same samples"):
        paired_difference(before, before[:-1])
    with pytest.raises(ValueError, match="not the same samples"):  # another evaluation seed: other noise
        paired_difference(before, _records(AFTER, seed=EVAL_SEED_BASE + 1))
    with pytest.raises(ValueError, match="twice"):
        paired_difference(before + before[:1], before + before[:1])


def test_only_changes_of_two_paired_se_are_claimed():
    assert change_verdict(0.05, 0.03) == "no measurable change"
    assert change_verdict(0.06, 0.03) == "rise"
    assert change_verdict(-0.07, 0.03) == "drop"
    assert change_verdict(0.2, float("nan")) == "no measurable change"
    line = format_change(paired_difference(_records(BEFORE), _records(AFTER))["overall"])
    assert line.startswith(
        "0.500 → 0.917: +0.417 ± 0.333 paired SE (1.2 SE), flips 4 wrong→right / 1 right→wrong"
    )
    assert line.endswith("no measurable change")


# ------------------------------------------------------------------------------------------- the protocol
def test_default_protocol_takes_every_held_out_prompt_and_enough_samples():
    protocol = EvalProtocol()
    assert protocol.split == "test" and protocol.tag_list == TEST_TAGS and protocol.seed == EVAL_SEED_BASE
    for tag in TEST_TAGS:
        space = prompt_space(tag, "test")
        chosen = protocol.prompts(tag)
        assert len(chosen) == min(len(space), protocol.max_prompts_per_tag)
        assert len({m["prompt"] for m in chosen}) == len(chosen)
        assert len(chosen) * protocol.samples_per_prompt(tag) >= DEFAULT_MIN_SAMPLES_PER_TAG
    assert protocol.n_samples >= 400
    assert protocol.n_prompts == sum(min(len(prompt_space(t, "test")), 80) for t in TEST_TAGS)
    samples = protocol.samples()
    assert len(samples) == protocol.n_samples == protocol.to_dict()["n_samples"]
    assert len({(m["prompt"], i) for m, i in samples}) == len(samples)
    # A cap below the space picks a fixed, evenly spread subset.
    capped = EvalProtocol(max_prompts_per_tag=5, min_samples_per_tag=12, tags=("color_attr",))
    picks = [m["prompt"] for m in capped.prompts("color_attr")]
    assert len(picks) == 5 and picks == [
        m["prompt"] for m in capped.with_seed(EVAL_SEED_BASE + 7).prompts("color_attr")
    ]
    assert picks[0] == prompt_space("color_attr", "test")[0]["prompt"]
    assert capped.samples_per_prompt("color_attr") == 3 and capped.n_samples == 15


def test_evaluation_seeds_never_coincide_with_training_seeds():
    with pytest.raises(ValueError, match="evaluation seeds are ≥ 10000"):
        EvalProtocol(seed=0)
    with pytest.raises(ValueError, match="evaluation seeds are ≥ 10000"):
        EvalProtocol(seed=EVAL_SEED_BASE - 1)
    protocol = EvalProtocol()
    protocol.check_training_seeds(0, 42, None, 9_999)
    protocol.check_training_seeds(EVAL_SEED_BASE + 1)  # only the seeds the evaluation uses are refused
    with pytest.raises(ValueError, match="training seed 10000 is also an evaluation seed"):
        protocol.check_training_seeds(0, EVAL_SEED_BASE)
    with pytest.raises(ValueError, match="training seed 10003"):
        protocol.check_training_seeds(EVAL_SEED_BASE + 3, n_eval_seeds=5)  # a noise-floor seed
    protocol.check_training_seeds(EVAL_SEED_BASE + 5, n_eval_seeds=5)
    assert protocol.eval_seeds(3) == [EVAL_SEED_BASE, EVAL_SEED_BASE + 1, EVAL_SEED_BASE + 2]


def test_a_samples_noise_depends_on_its_prompt_index_and_seed_only():
    wide, narrow = EvalProtocol(), EvalProtocol(max_prompts_per_tag=1, min_samples_per_tag=1)
    assert wide.sample_seed("a photo of a red triangle", 1) == narrow.sample_seed(
        "a photo of a red triangle", 1
    )
    assert wide.sample_seed("a photo of a red triangle", 1) != wide.sample_seed(
        "a photo of a red triangle", 0
    )
    assert wide.sample_seed("p", 0) != wide.with_seed(EVAL_SEED_BASE + 1).sample_seed("p", 0)


def test_bad_protocols_raise():
    with pytest.raises(ValueError, match="max_prompts_per_tag"):
        EvalProtocol(max_prompts_per_tag=0)
    with pytest.raises(ValueError, match="min_samples_per_tag"):
        EvalProtocol(min_samples_per_tag=-3)
    with pytest.raises(ValueError, match="single_object"):
        EvalProtocol(tags=("single_object",))  # no held-out single_object prompts
    with pytest.raises(ValueError, match="split"):
        EvalProtocol(split="validation")
    with pytest.raises(ValueError, match="either `protocol` or n_per_tag"):
        evaluate_flow_pipeline(None, protocol=EvalProtocol(), n_per_tag=3)
    with pytest.raises(ValueError, match="sampler"):
        evaluate_flow_pipeline(None, protocol=EvalProtocol(), sampler="ode")
    with pytest.raises(ValueError, match="needs a `protocol`"):
        evaluate_flow_pipeline(None, sampler="rollout", n_per_tag=1)


def test_scores_from_records_are_evaluates_scores():
    metas = sample_metadata(12, seed=3)
    images = [render(m, seed=i) for i, m in enumerate(metas)]
    images[0] = images[1] = None  # a missing image counts as wrong
    from trl_intrinsic.toyworld.verifier import verify

    records = [
        SampleResult(m["prompt"], m["tag"], EVAL_SEED_BASE, i, im is not None and verify(im, m).correct)
        for i, (m, im) in enumerate(zip(metas, images, strict=True))
    ]
    scores = scores_from_records(records)
    prompts = scores.pop("prompts")
    assert scores == evaluate(images, metas)
    assert prompts == {t: len({m["prompt"] for m in metas if m["tag"] == t}) for t in scores["counts"]}


def test_noise_floor_is_the_sd_of_overall_accuracy_over_evaluation_seeds():
    overall = {EVAL_SEED_BASE + i: v for i, v in enumerate([0.20, 0.25, 0.15, 0.22, 0.18])}
    calls = []

    def evaluate_fn(protocol):
        calls.append(protocol.seed)
        return {
            "counting": overall[protocol.seed],
            "overall": overall[protocol.seed],
            "counts": {"counting": 4},
        }

    protocol = EvalProtocol(tags=("counting",))
    known = {EVAL_SEED_BASE: evaluate_fn(protocol)}
    calls.clear()
    floor = noise_floor(evaluate_fn, protocol, 5, known=known)
    assert calls == [EVAL_SEED_BASE + i for i in range(1, 5)]  # the known evaluation is not repeated
    assert floor["sd"] == pytest.approx(statistics.stdev(overall.values()))
    assert floor["per_tag_sd"] == {"counting": pytest.approx(floor["sd"])}
    assert floor["seeds"] == list(overall) and floor["n_seeds"] == 5
    assert (floor["n_samples"], floor["prompts"]) == (protocol.n_samples, protocol.n_prompts)
    with pytest.raises(ValueError, match="at least 2"):
        noise_floor(evaluate_fn, protocol, 1)


# ------------------------------------------------------------------------------------------- evaluators and report
@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    return tiny_sd3_pipeline()


def test_flow_evaluation_under_a_protocol_is_paired_and_names_its_sampler(tiny_pipe):
    protocol = EvalProtocol(max_prompts_per_tag=1, min_samples_per_tag=2)
    first = evaluate_flow_pipeline(tiny_pipe, protocol=protocol, batch_size=4, **TINY)
    assert first["sampler"] == "deterministic"
    assert len(first["records"]) == protocol.n_samples == 2 * len(TEST_TAGS)
    assert first["counts"] == dict.fromkeys(TEST_TAGS, 2) and first["prompts"] == dict.fromkeys(TEST_TAGS, 1)
    assert {(r.eval_seed, r.sample_index) for r in first["records"]} == {
        (EVAL_SEED_BASE, 0),
        (EVAL_SEED_BASE, 1),
    }

    # The noise of a sample does not depend on the batch: another batch size gives the same images' verdicts, and
    # the rollout sampler without noise is the deterministic sampler.
    again = evaluate_flow_pipeline(tiny_pipe, protocol=protocol, batch_size=3, **TINY)
    assert again["records"] == first["records"]
    ode = evaluate_flow_pipeline(
        tiny_pipe, protocol=protocol, sampler="rollout", rollout={"noise_level": 0.0}, **TINY
    )
    assert ode["sampler"] == "rollout" and ode["records"] == first["records"]
    sde = evaluate_flow_pipeline(
        tiny_pipe,
        protocol=protocol,
        sampler="rollout",
        rollout={"noise_level": 0.7, "sde_window_size": 1},
        **TINY,
    )
    assert [r[:4] for r in sde["records"]] == [r[:4] for r in first["records"]]
    diff = paired_difference(first["records"], sde["records"])
    assert diff["overall"]["n"] == protocol.n_samples
    with pytest.raises(ValueError, match="unknown settings"):
        evaluate_flow_pipeline(
            tiny_pipe, protocol=protocol, sampler="rollout", rollout={"noise": 1.0}, **TINY
        )

    # Without a protocol: the pre-protocol evaluation, unchanged, and no records unless asked.
    legacy = evaluate_flow_pipeline(tiny_pipe, n_per_tag=1, seed=5, **TINY)
    assert "records" not in legacy and legacy["counts"] == dict.fromkeys(TEST_TAGS, 1)
    assert (
        len(evaluate_flow_pipeline(tiny_pipe, n_per_tag=1, seed=5, return_records=True, **TINY)["records"])
        == 5
    )


def test_report_json_carries_the_protocol_fields(tmp_path):
    before, after = _records(BEFORE), _records(AFTER)
    results = {
        "before": {
            **scores_from_records(before),
            "sampler": "deterministic",
            "records": before,
            "rewards": {"r": 1.0},
        },
        "after": {
            **scores_from_records(after),
            "sampler": "deterministic",
            "records": after,
            "rewards": {"r": 1.5},
        },
    }
    floor = {"sd": 0.02, "mean": 0.5, "n_seeds": 5, "seeds": list(range(10_000, 10_005)), "overall": [0.5] * 5,
             "per_tag_sd": {}, "n_samples": 8, "prompts": 5, "model": "the model before training"}  # fmt: skip
    markdown = write_accuracy_report(
        tmp_path,
        results,
        difference=paired_difference(before, after),
        noise_floor=floor,
        sampler="deterministic",
        protocol=EvalProtocol(tags=("counting", "position")).to_dict(),
        rewards_delta={"r": 0.5},
        rewards_delta_se={"r": 0.1},
    ).read_text()
    report = json.loads((tmp_path / "toy_accuracy.json").read_text())
    for name in ("before", "after"):
        entry = report[name]
        assert (
            set(entry) >= {"counting", "position", "overall", "counts", "prompts"} and "records" not in entry
        )
        assert entry["counts"] == {"counting": 6, "position": 2} and entry["prompts"] == {
            "counting": 3,
            "position": 2,
        }
    assert report["difference_of"] == "after - before"
    for tag in ("counting", "position", "overall"):
        assert set(report["difference"][tag]) >= {"value", "paired_se", "n", "prompts", "wrong_to_right",
                                                  "right_to_wrong", "flip_p_value"}  # fmt: skip
    assert report["difference"]["counting"]["paired_se"] == pytest.approx(0.440959, abs=1e-6)
    assert report["noise_floor"]["sd"] == 0.02 and report["sampler"] == "deterministic"
    assert report["protocol"]["seed"] == EVAL_SEED_BASE and report["split"] == "test"
    assert report["rewards_delta"] == {"r": 0.5} and report["rewards_delta_se"] == {"r": 0.1}
    lines = (tmp_path / "toy_accuracy_samples.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0]) == {"model": "before", "prompt": "A", "tag": "counting",
                                                        "eval_seed": EVAL_SEED_BASE, "sample_index": 0,
                                                        "correct": False}  # fmt: skip
    assert "| overall | 8 | 5 | 0.500 | 0.917 | +0.417 | 0.333 | 4 | 1 |" in markdown
    assert "no measurable change" in markdown and "noise floor: SD 0.020" in markdown
    assert "| r | 1 | 1.5 | +0.500 ± 0.100 (rise) |" in markdown

    # Not measured, the report says so; an SE that cannot be estimated (one sample) is null in the JSON.
    diff = paired_difference(_records({"counting": {"A": [0]}}), _records({"counting": {"A": [1]}}))
    markdown = write_accuracy_report(
        tmp_path,
        {"before": {"counting": 0.5, "overall": 0.5}, "after": {"counting": 1.0, "overall": 1.0}},
        difference=diff,
        noise_floor_hint="x",
    ).read_text()
    report = json.loads((tmp_path / "toy_accuracy.json").read_text())
    assert report["noise_floor"] is None and report["difference"]["counting"]["paired_se"] is None
    assert "evaluation noise floor: not measured (x)" in markdown
