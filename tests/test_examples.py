"""The example scripts parse their configs and train end to end (tiny local pipeline, a couple of steps)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trl import ModelConfig, TrlParser

from trl_intrinsic import DiffusionNFTConfig, FlowGRPOConfig
from trl_intrinsic.testing import tiny_sd3_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from common import ScriptArguments, training_reward_curves  # noqa: E402
from train_solace import SolaceArguments, SolaceScriptArguments  # noqa: E402


@pytest.mark.parametrize(
    ("config", "dataclasses"),
    [
        ("toy_flow_grpo.yaml", (ScriptArguments, FlowGRPOConfig, ModelConfig)),
        ("toy_solace.yaml", (SolaceScriptArguments, SolaceArguments, FlowGRPOConfig, ModelConfig)),
        ("solace_sd35m.yaml", (SolaceScriptArguments, SolaceArguments, FlowGRPOConfig, ModelConfig)),
        ("toy_diffusion_nft.yaml", (ScriptArguments, SolaceArguments, DiffusionNFTConfig, ModelConfig)),
        ("diffusion_nft_sd35m.yaml", (ScriptArguments, SolaceArguments, DiffusionNFTConfig, ModelConfig)),
    ],
)
def test_configs_parse_into_the_script_dataclasses(config, dataclasses):
    parsed = TrlParser(dataclasses).parse_args_and_config(
        ["--config", str(EXAMPLES / "configs" / config), "--use_cpu", "true", "--bf16", "false"]
    )
    values = yaml.safe_load((EXAMPLES / "configs" / config).read_text())
    training_args = next(p for p in parsed if isinstance(p, FlowGRPOConfig | DiffusionNFTConfig))
    assert training_args.num_generations == values["num_generations"]
    assert training_args.resolution == values["resolution"]
    if "nft" in config:
        assert training_args.nft_beta == values["nft_beta"]
        assert training_args.timesteps_per_image == int(
            values["timestep_fraction"] * values["num_inference_steps"]
        )
    if "solace" in config:
        solace_args = next(p for p in parsed if isinstance(p, SolaceArguments))
        reward = solace_args.reward()
        assert reward.num_probes == values["solace_num_probes"]
        assert training_args.timestep_selection == "suffix"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_flow_grpo.py", "train_solace.py", "train_diffusion_nft.py"])
def test_example_trains_a_local_pipeline(tmp_path, script):
    model = tmp_path / "model"
    tiny_sd3_pipeline().save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "out"
    command = [
        sys.executable, str(EXAMPLES / script), "--model_name_or_path", str(model),
        "--dataset_name", str(prompts), "--output_dir", str(out), "--use_cpu", "true", "--bf16", "false",
        "--report_to", "none", "--resolution", "32", "--max_sequence_length", "1",
        "--num_inference_steps", "3", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--max_steps", "2", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
        "--save_strategy", "no", "--reward_funcs", "solace_reward",
        *(["--solace_num_probes", "2"] if script != "train_flow_grpo.py" else []),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "README.md").is_file()

    report = tmp_path / "report"
    evaluation = [
        sys.executable, str(EXAMPLES / "evaluate.py"), "--model", str(model), "--adapter", str(out),
        "--prompts-per-tag", "1", "--samples-per-tag", "2", "--noise-floor-seeds", "2",
        "--num-inference-steps", "2", "--output-dir", str(report),
    ]  # fmt: skip
    result = subprocess.run(evaluation, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((report / "toy_accuracy.json").read_text())
    assert (
        set(scores["base"]) >= {"overall", "counting", "position", "counts", "prompts"}
        and "adapter" in scores
    )
    assert scores["base"]["counts"]["counting"] == 2 and scores["base"]["prompts"]["counting"] == 1
    # Paired: base and adapter on the same samples; the change per tag with its SE and flips.
    assert scores["difference_of"] == "adapter - base" and scores["sampler"] == "deterministic"
    overall = scores["difference"]["overall"]
    assert overall["n"] == 2 * len(scores["base"]["counts"])
    assert overall["value"] == pytest.approx(scores["adapter"]["overall"] - scores["base"]["overall"])
    assert scores["noise_floor"]["n_seeds"] == 2 and scores["noise_floor"]["seeds"] == [10_000, 10_001]
    assert scores["protocol"]["seed"] == 10_000
    markdown = (report / "toy_accuracy.md").read_text()
    assert "| overall |" in markdown and "paired SE" in markdown and "noise floor: SD" in markdown
    assert "adapter − base, overall:" in result.stdout


def test_training_reward_curves_draw_a_single_reward_once():
    single = [{"step": 1, "reward": 0.5, "rewards/solace_reward/mean": 0.5}, {"step": 1, "loss": 0.1},
              {"step": 2, "reward": 0.7, "rewards/solace_reward/mean": 0.7}]  # fmt: skip
    assert training_reward_curves(single) == {"solace_reward": [(1, 0.5), (2, 0.7)]}
    hybrid = [{"step": 1, "reward": 1.0, "rewards/a/mean": 0.2, "rewards/b/mean": 0.8}]
    assert training_reward_curves(hybrid) == {"a": [(1, 0.2)], "b": [(1, 0.8)], "reward": [(1, 1.0)]}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_flow_grpo.py", "train_solace.py"])
def test_example_on_the_shipped_toy_model_writes_its_report(tmp_path, script):
    from PIL import Image

    out = tmp_path / "out"
    # Flow-GRPO's report samples with the training rollout sampler (its SDE window) and skips the noise floor;
    # SOLACE's with the deterministic sampler and measures the noise floor over two evaluation seeds.
    evaluation = ["--toy_eval_sampler", "rollout"] if "grpo" in script else ["--toy_noise_floor_seeds", "2"]
    command = [
        sys.executable, str(EXAMPLES / script), "--output_dir", str(out), "--max_steps", "2",
        "--toy_eval_steps", "1", "--toy_eval_prompts_per_tag", "2", "--toy_eval_samples_per_tag", "2",
        "--num_train_prompts", "8", *evaluation,
        "--num_generations", "2", "--per_device_train_batch_size", "4", "--num_inference_steps", "3",
        "--eval_num_inference_steps", "3", "--toy_eval_reward_prompts", "2",
        *(["--solace_num_probes", "2"] if "solace" in script else []),
        *(["--gradient_accumulation_steps", "1", "--sde_window_size", "2", "--sde_window_range", "0", "2"] if "grpo" in script else []),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toy accuracy before" in result.stdout and "toy accuracy after" in result.stdout
    assert "change from before, overall:" in result.stdout
    report = json.loads((out / "toy_accuracy.json").read_text())
    for name in ("before", "after"):
        assert 0.0 <= report[name]["overall"] <= 1.0 and set(report[name]["counts"].values()) == {2}
        assert set(report[name]["prompts"].values()) <= {1, 2} and report[name]["prompts"]["position"] == 2
    # The paired change per tag and overall, the sampler, the protocol, the noise floor (or null).
    difference = report["difference"]
    assert (
        set(difference) == {*report["before"]["counts"], "overall"}
        and report["difference_of"] == "after - before"
    )
    for entry in difference.values():
        assert {
            "value",
            "paired_se",
            "n",
            "prompts",
            "wrong_to_right",
            "right_to_wrong",
            "flip_p_value",
        } <= set(entry)
    assert difference["overall"]["value"] == pytest.approx(
        report["after"]["overall"] - report["before"]["overall"]
    )
    assert report["sampler"] == ("rollout" if "grpo" in script else "deterministic")
    assert report["protocol"]["n_samples"] == 2 * len(report["before"]["counts"])
    if "grpo" in script:
        assert report["noise_floor"] is None and "noise floor: not measured" in result.stdout
    else:
        assert report["noise_floor"]["n_seeds"] == 2 and report["noise_floor"]["sd"] >= 0.0
    samples = (out / "toy_accuracy_samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * report["protocol"]["n_samples"]
    assert [point["step"] for point in report["curve"]] == [0, 1, 2]  # before, step 1, after
    assert report["curve"][0]["overall"] == report["before"]["overall"]
    assert report["curve"][-1]["change"] == pytest.approx(difference["overall"]["value"])
    # Both training steps are logged, also the one measured in the middle of training (evaluate() inside a
    # step must not swallow the step's own log).
    assert (result.stdout + result.stderr).count("'policy_loss'") == 2
    reward = "solace_reward" if "solace" in script else "verifier_reward_partial"
    for point in report["curve"]:  # the trained reward on fixed held-out prompts, at every measurement
        assert set(point["rewards"]) == {reward} and math.isfinite(point["rewards"][reward])
    assert report["after"]["rewards"] == report["curve"][-1]["rewards"]
    # Its paired change over the fixed prompts' samples, with its SE clustered by prompt.
    assert set(report["rewards_delta"]) == {reward} and set(report["rewards_delta_se"]) == {reward}
    assert report["rewards_delta"][reward] == pytest.approx(
        report["after"]["rewards"][reward] - report["before"]["rewards"][reward], abs=1e-5
    )
    markdown = (out / "toy_accuracy.md").read_text()
    assert "| overall |" in markdown and f"| {reward} |" in markdown and "paired SE" in markdown
    for png in ("reward_curve.png", "accuracy_curve.png", "before_after.png"):
        with Image.open(out / png) as image:
            assert image.width > 100 and image.height > 100
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_train_iris_on_a_local_janus(tmp_path):
    from trl_intrinsic.testing import tiny_janus

    model, processor = tiny_janus()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    command = [
        sys.executable, str(EXAMPLES / "train_iris.py"), "--model_name_or_path", str(tmp_path / "model"),
        "--dataset_name", str(prompts), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
        "--bf16", "false", "--report_to", "none", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_steps", "2", "--max_completion_length", "8", "--save_strategy", "no", "--cfg_weight", "2.0",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_iris_configs_parse_into_the_script_dataclasses():
    from train_iris import IrisScriptArguments

    from trl_intrinsic import IntrinsicGRPOConfig

    for config in ("toy_iris.yaml", "iris_janus_pro_1b.yaml"):
        values = yaml.safe_load((EXAMPLES / "configs" / config).read_text())
        script_args, training_args, model_args = TrlParser(
            (IrisScriptArguments, IntrinsicGRPOConfig, ModelConfig)
        ).parse_args_and_config(
            ["--config", str(EXAMPLES / "configs" / config), "--use_cpu", "true", "--bf16", "false"]
        )
        assert training_args.num_generations == values["num_generations"]
        assert training_args.cfg_weight == values["cfg_weight"]
        assert model_args.model_name_or_path == values.get("model_name_or_path")
    assert script_args.reward_funcs == ["nsc_reward"]


def test_train_iris_rejects_an_unknown_reward_name(tmp_path):
    import train_iris

    with pytest.raises(ValueError, match=r"Unknown reward name 'nsc'.*nsc_reward"):
        train_iris.main(["--output_dir", str(tmp_path), "--reward_funcs", "nsc", "--max_steps", "1"])


@pytest.mark.slow
def test_train_iris_on_the_shipped_toy_janus_writes_its_report(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    command = [
        sys.executable, str(EXAMPLES / "train_iris.py"), "--output_dir", str(out), "--max_steps", "2",
        "--toy_eval_steps", "1", "--toy_eval_prompts_per_tag", "2", "--toy_eval_samples_per_tag", "2",
        "--num_train_prompts", "8", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--toy_eval_reward_prompts", "2",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "toy accuracy before" in result.stdout and "toy accuracy after" in result.stdout
    trained = json.loads((out / "toy_accuracy.json").read_text())
    for name in ("before", "after"):
        assert 0.0 <= trained[name]["overall"] <= 1.0 and set(trained[name]["counts"].values()) == {2}
        assert 0.0 <= trained[name]["cot_exact"] <= 1.0  # the CoT is sampled (use_cot: true in toy_iris.yaml)
        assert trained[name]["rewards"]["nsc_reward"] < 0  # NSC on fixed held-out prompts (a negative number)
    assert trained["sampler"] == "rollout" and "overall" in trained["difference"]
    assert set(trained["rewards_delta"]) == {"nsc_reward"}
    assert [point["step"] for point in trained["curve"]] == [0, 1, 2]
    assert "| overall |" in (out / "toy_accuracy.md").read_text()
    for png in ("reward_curve.png", "accuracy_curve.png", "before_after.png"):
        with Image.open(out / png) as image:
            assert image.width > 100 and image.height > 100
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "language_model" in config["target_modules"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()

    report = tmp_path / "report"
    evaluation = [
        sys.executable, str(EXAMPLES / "evaluate.py"), "--model", "toy-janus", "--adapter", str(out),
        "--prompts-per-tag", "2", "--samples-per-tag", "2", "--noise-floor-seeds", "0", "--output-dir", str(report),
    ]  # fmt: skip
    result = subprocess.run(evaluation, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((report / "toy_accuracy.json").read_text())
    assert set(scores) >= {"base", "adapter", "split", "difference"} and "cot_exact" in scores["adapter"]
    assert scores["noise_floor"] is None and scores["sampler"] == "rollout"
    # Same protocol (prompts, evaluation seed) and sampling settings as the training run's own before/after
    # measurements: the same samples, so the same accuracies and the same paired change.
    accuracy = {
        name: {k: v for k, v in trained[name].items() if k != "rewards"} for name in ("before", "after")
    }
    assert scores["base"] == accuracy["before"]
    assert scores["adapter"] == accuracy["after"]
    assert scores["difference"] == trained["difference"] and scores["protocol"] == trained["protocol"]


def test_collect_toy_results_averages_seeds(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from collect_toy_results import main
    finally:
        sys.path.remove(str(EXAMPLES))

    def report(before, after):
        tags = lambda x: {"counting": x, "position": x / 2, "overall": x, "counts": {"counting": 20}}  # noqa: E731
        return {"before": tags(before), "after": tags(after)}

    for method, afters in {"flow_grpo": [0.5, 0.7], "solace": [0.3]}.items():
        for seed, after in enumerate(afters):
            run = tmp_path / method / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "toy_accuracy.json").write_text(json.dumps(report(0.3, after)))
    out = tmp_path / "table.md"
    markdown = main([str(tmp_path), "--output", str(out)])
    assert out.read_text().strip() == markdown
    lines = markdown.splitlines()
    assert lines[0] == "| model | runs | counting | position | overall |"
    assert lines[2] == "| base | 3 | 0.300 ± 0.000 | 0.150 ± 0.000 | 0.300 ± 0.000 |"
    assert lines[3] == "| flow_grpo | 2 | 0.600 ± 0.141 | 0.300 ± 0.071 | 0.600 ± 0.141 |"
    assert lines[4] == "| solace | 1 | 0.300 | 0.150 | 0.300 |"
    with pytest.raises(ValueError, match=r"toy_accuracy\.json"):
        main([str(tmp_path / "flow_grpo" / "seed0")])

    # Runs whose base measurements differ (IRIS with and without a chain-of-thought) get a base row each;
    # a tag only some runs report (cot_exact) is left blank for the others.
    janus = tmp_path / "janus"
    for method, before, cot in (("iris_cot", 0.2, True), ("iris_no_cot", 0.1, False)):
        run = janus / method / "seed0"
        run.mkdir(parents=True)
        reports = report(before, before + 0.1)
        if cot:
            for name in ("before", "after"):
                reports[name]["cot_exact"] = 0.7
        (run / "toy_accuracy.json").write_text(json.dumps(reports))
    lines = main([str(janus)]).splitlines()
    assert lines[0] == "| model | runs | counting | position | cot_exact | overall |"
    assert lines[2] == "| base (iris_cot) | 1 | 0.200 | 0.100 | 0.700 | 0.200 |"
    assert lines[3] == "| base (iris_no_cot) | 1 | 0.100 | 0.050 | — | 0.100 |"
    assert lines[5] == "| iris_no_cot | 1 | 0.200 | 0.100 | — | 0.200 |"

    # Trained rewards on the fixed prompts depend on the seed: they do not split the base row, and get a table
    # of their own (before, after and the change per seed).
    nsc = tmp_path / "nsc"
    for seed, (before, after) in enumerate([(-22.0, -20.0), (-23.0, -20.0)]):
        run = nsc / "iris_cot" / f"seed{seed}"
        run.mkdir(parents=True)
        reports = report(0.2, 0.3)
        reports["before"]["rewards"], reports["after"]["rewards"] = (
            {"nsc_reward": before},
            {"nsc_reward": after},
        )
        (run / "toy_accuracy.json").write_text(json.dumps(reports))
    lines = main([str(nsc)]).splitlines()
    assert lines[0] == "| model | runs | counting | position | overall |"
    assert lines[2] == "| base | 2 | 0.200 ± 0.000 | 0.100 ± 0.000 | 0.200 ± 0.000 |"
    assert lines[-1] == "| iris_cot | nsc_reward | 2 | -22.500 ± 0.707 | -20.000 ± 0.000 | 2.500 ± 0.707 |"

    # Reports of the evaluation protocol carry each run's paired change: a table of its own.
    paired = tmp_path / "paired"
    for seed, (value, se) in enumerate([(0.06, 0.02), (0.01, 0.02)]):
        run = paired / "flow_grpo" / f"seed{seed}"
        run.mkdir(parents=True)
        reports = report(0.3, 0.3 + value)
        reports["difference"] = {"overall": {"value": value, "paired_se": se}}
        (run / "toy_accuracy.json").write_text(json.dumps(reports))
    lines = main([str(paired)]).splitlines()
    assert "| model | runs | change per run (± paired SE) | mean change |" in lines
    assert (
        lines[-1]
        == "| flow_grpo | 2 | +0.060 ± 0.020, +0.010 ± 0.020 (no measurable change) | 0.035 ± 0.035 |"
    )


def test_gradient_snr_measures_independent_gradient_estimates(tmp_path):
    import gradient_snr

    rows = gradient_snr.main(
        [
            "--output_dir", str(tmp_path), "--estimates", "3", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--num_inference_steps", "3", "--num_train_prompts", "16",
            "--sde_window_size", "2", "--sde_window_range", "0", "2", "--reward_funcs", "verifier_reward",
        ]
    )  # fmt: skip
    assert [row["reward"] for row in rows] == ["verifier_reward", "brightness (control)"]
    for row in rows:
        assert row["estimates"] == 3 and row["images_per_estimate"] == 8
        # The same prompt in every estimate; a jackknife SE over the 3 estimates.
        assert row["prompts_per_estimate"] == 1 and len(row["prompts"]) == 1
        assert -1.0 <= row["cosine_mean"] <= 1.0 and row["cosine_stderr"] >= 0.0
    assert json.loads((tmp_path / "gradient_snr.json").read_text()) == rows
    # The dense control reward gives a non-zero gradient in every estimate.
    assert rows[1]["cosine_mean"] != 0.0
    with pytest.raises(ValueError, match="estimates"):
        gradient_snr.main(["--output_dir", str(tmp_path), "--estimates", "1"])
