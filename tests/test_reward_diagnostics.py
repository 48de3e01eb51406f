"""Reward diagnostics: within-group AUROC / concordance / Spearman against hand computations, bootstrap and
jackknife standard errors, the recording wrappers and baselines, and a smoke run of the example script."""

import asyncio
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from trl_intrinsic.rewards import diagnostics
from trl_intrinsic.rewards.diagnostics import (
    ScoreRecorder,
    alignment,
    diagnose,
    format_table,
    group_statistics,
    is_binary,
    mean_pairwise_similarity,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Group A: positives score 3 and 2, negatives 1 and 2: wins 1 + 1 + 1 + ½ (the tie 2 = 2) of 4 pairs.
# Group B: the positive (0.2) scores below both negatives: 0 of 2 pairs.
# Group C: every image correct: uninformative. Group D: a single image: no pair at all.
SCORES = [3, 1, 2, 2, 0.5, 0.2, 0.9, 1, 2, 3, 7]
REFERENCE = [1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1]
GROUPS = ["A"] * 4 + ["B"] * 3 + ["C"] * 3 + ["D"]
TAGS = ["colors"] * 4 + ["counting"] * 3 + ["colors"] * 3 + ["position"]
RHO_A = 3 / math.sqrt(18)  # ranks (4, 1, 2.5, 2.5) vs (3.5, 1.5, 3.5, 1.5)
RHO_B = -1.5 / math.sqrt(3)  # ranks (2, 1, 3) vs (1.5, 3, 1.5)


def test_group_statistics_by_hand():
    stats = group_statistics(SCORES, REFERENCE, GROUPS)
    assert list(stats["group"]) == ["A", "B", "C"]  # D has one image
    assert stats["wins"].tolist() == [3.5, 0.0, 0.0]
    assert stats["pairs"].tolist() == [4, 2, 0]
    assert stats["spearman"][:2] == pytest.approx([RHO_A, RHO_B])
    assert math.isnan(stats["spearman"][2])
    assert spearmanr(SCORES[:4], REFERENCE[:4]).statistic == pytest.approx(RHO_A)
    assert spearmanr(SCORES[4:7], REFERENCE[4:7]).statistic == pytest.approx(RHO_B)


def test_alignment_pools_pairs_and_excludes_uninformative_groups():
    result = alignment(SCORES, REFERENCE, GROUPS, n_bootstrap=200)
    assert result["auroc"] == pytest.approx(3.5 / 6)
    assert result["spearman"] == pytest.approx((RHO_A + RHO_B) / 2)
    assert (result["n_groups"], result["n_pairs"], result["n_groups_total"]) == (2, 6, 3)
    assert result["auroc_se"] > 0 and result["spearman_se"] > 0
    assert result["by_tag"] == {}
    # Flipping the score's sign mirrors the AUROC around 0.5 (ties stay ½).
    flipped = alignment([-s for s in SCORES], REFERENCE, GROUPS, n_bootstrap=0)
    assert flipped["auroc"] == pytest.approx(1 - 3.5 / 6)
    assert flipped["auroc_se"] is None


def test_per_tag_split():
    result = alignment(SCORES, REFERENCE, GROUPS, TAGS, n_bootstrap=100)
    assert sorted(result["by_tag"]) == ["colors", "counting", "position"]
    colors, counting, position = (result["by_tag"][t] for t in ("colors", "counting", "position"))
    assert colors["auroc"] == pytest.approx(3.5 / 4) and colors["spearman"] == pytest.approx(RHO_A)
    assert (colors["n_groups"], colors["n_pairs"], colors["n_groups_total"]) == (1, 4, 2)
    assert colors["auroc_se"] is None  # one informative group: no standard error
    assert counting["auroc"] == 0.0 and counting["spearman"] == pytest.approx(RHO_B)
    assert position == {
        "auroc": None, "auroc_se": None, "spearman": None, "spearman_se": None,
        "n_groups": 0, "n_pairs": 0, "n_groups_total": 0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="tagged"):
        alignment(SCORES, REFERENCE, GROUPS, ["colors"] * 3 + ["counting"] * 8)


def test_continuous_reference_gives_pairwise_concordance():
    # Pairs with different references: (0.5 > 0.1) twice won, (0.9 > 0.1) won, (0.9 > 0.5) lost and tied.
    scores, reference = [1, 3, 2, 2], [0.1, 0.5, 0.5, 0.9]
    result = alignment(scores, reference, [0] * 4, n_bootstrap=0)
    assert not is_binary(reference) and is_binary(REFERENCE) and is_binary([0.0, 1.0, math.nan])
    assert result["auroc"] == pytest.approx(3.5 / 5) and result["n_pairs"] == 5
    assert result["spearman"] == pytest.approx(spearmanr(scores, reference).statistic)


def test_nan_samples_are_dropped_and_constant_scores_have_zero_spearman():
    scores = [1.0, math.nan, 2.0, 5.0, 5.0, 5.0]
    reference = [0, 1, 1, 0, 1, 0]
    result = alignment(scores, reference, [0, 0, 0, 1, 1, 1], n_bootstrap=0)
    # Group 0 keeps (1.0, 0) and (2.0, 1): one pair, won. Group 1: constant scores, 2 tied pairs, ρ = 0.
    assert (result["n_groups"], result["n_pairs"]) == (2, 3)
    assert result["auroc"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert result["spearman"] == pytest.approx((1.0 + 0.0) / 2)


def _synthetic(n_groups: int, seed: int):
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 2, size=(n_groups, 8)).astype(float)
    scores = reference + rng.normal(0, 2, size=(n_groups, 8))
    groups = np.repeat(np.arange(n_groups), 8)
    return scores.ravel(), reference.ravel(), groups.tolist()


def test_bootstrap_se_is_seeded_and_shrinks_with_more_groups():
    few = _synthetic(25, seed=1)
    a, b = alignment(*few, n_bootstrap=300, seed=7), alignment(*few, n_bootstrap=300, seed=7)
    assert a == b
    assert alignment(*few, n_bootstrap=300, seed=8)["auroc_se"] != a["auroc_se"]
    many = alignment(*_synthetic(400, seed=2), n_bootstrap=300, seed=7)
    assert many["auroc_se"] < a["auroc_se"] / 2 and many["spearman_se"] < a["spearman_se"] / 2
    assert many["auroc"] > 0.6  # the synthetic score does carry signal


def test_diagnose_and_table():
    results = diagnose(
        {"score": SCORES, "negated": [-s for s in SCORES]}, REFERENCE, GROUPS, TAGS, n_bootstrap=50
    )
    assert list(results) == ["score", "negated"]
    table = format_table(results)
    assert "| score | 0.583 ± " in table and "| 2 / 3 | 6 |" in table
    assert "| AUROC by tag | colors | counting | position |" in table and "— (n=0)" in table


def test_jackknife_se_of_a_mean_pairwise_cosine_by_hand():
    sim = np.array([[1.0, 0.1, 0.3], [0.1, 1.0, 0.5], [0.3, 0.5, 1.0]])
    # Leaving out estimate 1, 2, 3 leaves the pairs (2, 3), (1, 3), (1, 2): 0.5, 0.3, 0.1.
    mean, se = mean_pairwise_similarity(sim)
    assert mean == pytest.approx(0.3)
    assert se == pytest.approx(math.sqrt(2 / 3 * (0.2**2 + 0.0 + 0.2**2)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 5))
    sim = (x + x.T) / 2
    loo = []
    for k in range(5):
        keep = [i for i in range(5) if i != k]
        sub = sim[np.ix_(keep, keep)]
        loo.append(sub[np.triu_indices(4, 1)].mean())
    mean, se = mean_pairwise_similarity(sim)
    assert mean == pytest.approx(sim[np.triu_indices(5, 1)].mean())
    assert se == pytest.approx(math.sqrt(4 / 5 * ((np.array(loo) - np.mean(loo)) ** 2).sum()))
    assert mean_pairwise_similarity(np.eye(2))[1] is None


def test_recorder_records_groups_tags_and_values_of_every_batch():
    recorder = ScoreRecorder(num_generations=2)

    def reference(prompts, images=None, **kwargs):
        return [1.0, 0.0, None, 1.0]

    async def score(prompts, images=None, **kwargs):
        return [0.1, 0.2, 0.3, 0.4]

    wrapped_reference = recorder.wrap(reference, "reference")
    wrapped_score = recorder.wrap(score, "score")
    assert wrapped_reference.__name__ == "reference" and wrapped_reference.requires_images
    metadata = [json.dumps({"tag": t}) for t in ("colors", "colors", "counting", "counting")]
    prompts = ["a", "a", "b", "b"]
    # A flow batch (group ids given) and a Janus-like batch (groups from the order, a tag column).
    wrapped_reference(prompts, None, group_ids=[0, 0, 1, 1], metadata=metadata)
    asyncio.run(wrapped_score(prompts, None, group_ids=[0, 0, 1, 1]))
    wrapped_reference(prompts=prompts, completions=None, tag=["position"] * 4)
    asyncio.run(wrapped_score(prompts=prompts, completions=None))
    table = recorder.table()
    assert table["groups"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert table["tags"] == ["colors", "colors", "counting", "counting"] + ["position"] * 4
    assert np.isnan(table["scores"]["reference"][2])
    assert table["scores"]["score"].tolist() == [0.1, 0.2, 0.3, 0.4] * 2
    with pytest.raises(ValueError, match="already"):
        recorder.wrap(reference, "score")


def test_baselines():
    white = Image.new("RGB", (4, 4), (255, 255, 255))
    half = np.full((4, 4, 3), 255, dtype=np.uint8)
    half[:2] = (230, 0, 0)
    assert diagnostics.brightness(images=[white]) == [1.0]
    assert diagnostics.ink_share(images=[white, Image.fromarray(half)]) == [0.0, 0.5]
    assert diagnostics.ink_share(completions=[[Image.fromarray(half)]]) == [0.5]  # a Janus completion
    latents = np.zeros((2, 2, 2, 2))
    latents[1, 0] = [[0.0, 2.0], [0.0, 2.0]]  # channel 0: std 1, channel 1: std 0
    assert diagnostics.latent_std(["a", "b"], latents=latents) == [0.0, 0.5]
    assert diagnostics.latent_std(["a", "b"]) == [None, None]
    first, second = diagnostics.RandomScore(3)(["a"] * 4), diagnostics.RandomScore(3)(["a"] * 4)
    assert first == second and len(set(first)) == 4


def test_reward_diagnostics_example_on_a_tiny_pipeline(tmp_path):
    from trl_intrinsic.testing import tiny_sd3_pipeline

    sys.path.insert(0, str(EXAMPLES))
    import reward_diagnostics

    assert reward_diagnostics.reward("toy_verifier", {}, 0).__name__ == "verifier_reward"
    tiny_sd3_pipeline().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    results = reward_diagnostics.main(
        [
            "--model", str(tmp_path / "tiny"), "--rewards", "solace_reward", "--reference", "brightness",
            "--groups", "2", "--bootstrap", "50", "--output", str(out),
            "--set", "num_inference_steps=3", "sde_window_size=2", "sde_window_range=[0,2]",
            "per_device_train_batch_size=8", "gradient_accumulation_steps=1",
        ]
    )  # fmt: skip
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    # The reference (brightness here) is not scored against itself; latent std is a flow baseline.
    assert list(saved) == ["solace_reward", "random", "ink_share", "latent_std"]
    fields = {"auroc", "auroc_se", "spearman", "spearman_se", "n_groups", "n_pairs", "n_groups_total"}
    for name, entry in saved.items():
        assert fields <= set(entry) and entry["kind"] == ("reward" if name == "solace_reward" else "baseline")
        assert entry["n_groups"] == 2 and 0 < entry["n_pairs"] <= 2 * 28  # a continuous reference
        assert 0.0 <= entry["auroc"] <= 1.0 and entry["auroc_se"] >= 0.0
        assert entry["by_tag"] and all(fields <= set(t) for t in entry["by_tag"].values())
    run = json.loads((out / "run.json").read_text())
    assert run["groups"] == 2 and run["samples"] == 16 and run["statistic"] == "concordance"
    assert run["settings"]["num_inference_steps"] == 3
    assert (out / "diagnostics.png").stat().st_size > 0


def test_reward_diagnostics_example_on_a_tiny_janus(tmp_path):
    from trl_intrinsic.testing import tiny_janus

    sys.path.insert(0, str(EXAMPLES))
    import reward_diagnostics

    model, processor = tiny_janus(seed=0)
    model.save_pretrained(tmp_path / "janus")
    processor.save_pretrained(tmp_path / "janus")
    out = tmp_path / "out"
    reward_diagnostics.main(
        [
            "--model", str(tmp_path / "janus"), "--rewards", "nsc_reward", "--reference", "brightness",
            "--groups", "2", "--bootstrap", "50", "--output", str(out), "--set", "max_completion_length=8",
        ]
    )  # fmt: skip
    saved = json.loads((out / "diagnostics.json").read_text())
    # Janus: the two parts of NSC are scored too; there is no latent.
    assert list(saved) == ["nsc_reward", "nsc_text", "nsc_image", "random", "ink_share"]
    assert [saved[n]["kind"] for n in ("nsc_reward", "nsc_text", "random")] == ["reward", "part", "baseline"]
    assert all(entry["n_groups"] == 2 and entry["auroc"] is not None for entry in saved.values())
    run = json.loads((out / "run.json").read_text())
    assert run["family"] == "janus" and run["samples"] == 16 and run["settings"]["max_completion_length"] == 8
