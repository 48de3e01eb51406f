"""Toy-world accuracy of a model, or of the model with a LoRA adapter (paired), on held-out prompts.

    python examples/evaluate.py                                   # the shipped toy SD3 pipeline
    python examples/evaluate.py --adapter outputs/toy-solace      # ... against the same with a trained LoRA adapter
    python examples/evaluate.py --model toy-janus --adapter outputs/toy-iris
    python examples/evaluate.py --model path/to/pipeline --adapter path/to/lora --output-dir results/

``--model`` is ``toy-flow`` (default), ``toy-janus``, or a directory: a diffusers flow pipeline
(``model_index.json``) or a ``JanusForConditionalGeneration`` with its processor. Flow adapters are
``pytorch_lora_weights.safetensors`` files (``load_lora_weights``), Janus adapters PEFT directories
(``adapter_model.safetensors``).

Every evaluation follows the toy world's protocol (``trl_intrinsic.toyworld.EvalProtocol``): every distinct
prompt of each tag up to ``--prompts-per-tag``, each sampled until the tag has ``--samples-per-tag`` samples, at
the evaluation seed ``--seed`` (≥ 10000; training seeds stay below). With ``--adapter`` the base and the adapted
model are scored on the same samples, and the report gives the paired change per tag and overall with its SE and
flips ("no measurable change" below 2 paired SE). The evaluation noise floor of the base model (SD of its overall
accuracy over ``--noise-floor-seeds`` evaluation seeds, 5 by default; 0 skips it) is printed beside. Writes
``toy_accuracy.json``, ``toy_accuracy.md`` and ``toy_accuracy_samples.jsonl`` (one line per sample) to
``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from trl_intrinsic.toyworld.models import FLOW_SAMPLING, TOY_FLOW_DIR, TOY_JANUS_DIR
from trl_intrinsic.toyworld.report import format_change, write_accuracy_report

# Settings of the flow rollout sampler that an adapter's training_args.json provides.
ROLLOUT_KEYS = ("noise_level", "sde_type", "sde_window_size", "sde_window_range")


def _rollout_settings(adapter: Path | None, args) -> tuple[dict, int]:
    """The flow rollout sampler's settings and step count: the adapter's training run's (``training_args.json``;
    without a noise level, a DiffusionNFT run, the ODE), else Flow-GRPO's defaults; ``--noise-level`` wins."""
    from trl_intrinsic.toyworld.evaluation import FLOW_ROLLOUT

    rollout, steps = dict(FLOW_ROLLOUT), args.num_inference_steps
    trained = adapter / "training_args.json" if adapter is not None else None
    if trained is not None and trained.is_file():
        values = json.loads(trained.read_text())
        rollout.update({k: values[k] for k in ROLLOUT_KEYS if k in values})
        if "noise_level" not in values:
            rollout["noise_level"] = 0.0
        steps = values.get("num_inference_steps", steps)
    if args.noise_level is not None:
        rollout["noise_level"] = args.noise_level
    return rollout, steps


def _flow(path: Path, adapter: Path | None, args) -> dict[str, Callable]:
    from trl_intrinsic.toyworld import load_toy_pipeline
    from trl_intrinsic.toyworld.evaluation import evaluate_flow_pipeline

    if adapter is not None and not (adapter / "pytorch_lora_weights.safetensors").is_file():
        raise ValueError(
            f"--adapter: {adapter} has no pytorch_lora_weights.safetensors (a flow LoRA adapter)"
        )
    pipe = load_toy_pipeline(path)
    sampling = {**FLOW_SAMPLING, "num_inference_steps": args.num_inference_steps}
    if args.guidance_scale is not None:
        sampling["guidance_scale"] = args.guidance_scale
    rollout = None
    if args.sampler == "rollout":
        rollout, sampling["num_inference_steps"] = _rollout_settings(adapter, args)

    def score(protocol) -> dict:
        return evaluate_flow_pipeline(
            pipe, protocol=protocol, sampler=args.sampler, rollout=rollout, **sampling
        )

    def adapted(protocol) -> dict:
        pipe.load_lora_weights(str(adapter))
        return score(protocol)

    return {"base": score, **({"adapter": adapted} if adapter is not None else {})}


def _janus(path: Path, adapter: Path | None, args) -> dict[str, Callable]:
    from trl_intrinsic.toyworld import load_toy_janus
    from trl_intrinsic.toyworld.evaluation import evaluate_janus
    from trl_intrinsic.toyworld.models import JANUS_SAMPLING

    if adapter is not None and not (adapter / "adapter_model.safetensors").is_file():
        raise ValueError(
            f"--adapter: {adapter} has no adapter_model.safetensors (a PEFT adapter of a Janus model)"
        )
    if args.sampler == "deterministic":
        raise ValueError("--sampler: a Janus model samples with its IRIS rollout only; use --sampler rollout")
    model, processor = load_toy_janus(path)
    sampling = dict(JANUS_SAMPLING)
    if args.guidance_scale is not None:
        sampling["cfg_weight"] = args.guidance_scale

    def score(protocol, m=model) -> dict:
        return evaluate_janus(m, processor, protocol=protocol, use_cot=not args.no_cot, **sampling)

    def adapted(protocol) -> dict:
        from peft import PeftModel

        return score(protocol, PeftModel.from_pretrained(model, str(adapter)).get_base_model())

    return {"base": score, **({"adapter": adapted} if adapter is not None else {})}


def main(argv: list[str] | None = None) -> dict:
    from trl_intrinsic.toyworld.evaluation import (
        DEFAULT_MAX_PROMPTS_PER_TAG,
        DEFAULT_MIN_SAMPLES_PER_TAG,
        EVAL_SEED_BASE,
        EvalProtocol,
        noise_floor,
        paired_difference,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy-flow", help="toy-flow, toy-janus, or a model directory")
    parser.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter trained on --model")
    parser.add_argument(
        "--prompts-per-tag", type=int, default=DEFAULT_MAX_PROMPTS_PER_TAG,
        help="at most this many distinct prompts per tag (all of them if the split has fewer)",
    )  # fmt: skip
    parser.add_argument(
        "--samples-per-tag", type=int, default=DEFAULT_MIN_SAMPLES_PER_TAG,
        help="at least this many samples per tag (each prompt sampled ceil(this / prompts of the tag) times)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=EVAL_SEED_BASE, help=f"the evaluation seed (≥ {EVAL_SEED_BASE})"
    )
    parser.add_argument(
        "--noise-floor-seeds", type=int, default=5,
        help="evaluation seeds (--seed, --seed + 1, ...) of the base model's noise floor; 0 skips it",
    )  # fmt: skip
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument(
        "--sampler", choices=("deterministic", "rollout"), default=None,
        help="flow: 'deterministic' (the pipeline's ODE, default) or 'rollout' (the training rollout sampler: the "
        "adapter's training_args.json, else Flow-GRPO's defaults); Janus: 'rollout' (the only one)",
    )  # fmt: skip
    parser.add_argument(
        "--noise-level", type=float, default=None, help="flow rollout sampler: SDE noise level"
    )
    parser.add_argument("--num-inference-steps", type=int, default=FLOW_SAMPLING["num_inference_steps"])
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="CFG (flow) or cfg_weight (Janus); default: the toy's",
    )
    parser.add_argument(
        "--no-cot", action="store_true", help="Janus: sample the image without a chain-of-thought"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/evaluation"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.noise_floor_seeds == 1 or args.noise_floor_seeds < 0:
        parser.error("--noise-floor-seeds: 0 (skip) or ≥ 2 (an SD needs two seeds; 5 advised)")
    try:
        protocol = EvalProtocol(
            split=args.split,
            max_prompts_per_tag=args.prompts_per_tag,
            min_samples_per_tag=args.samples_per_tag,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))

    path = {"toy-flow": TOY_FLOW_DIR, "toy-janus": TOY_JANUS_DIR}.get(args.model, Path(args.model))
    if (path / "model_index.json").is_file():
        args.sampler = args.sampler or "deterministic"
        runs = _flow(path, args.adapter, args)
    elif (path / "config.json").is_file():
        args.sampler = args.sampler or "rollout"
        runs = _janus(path, args.adapter, args)
    else:
        raise ValueError(
            f"--model: {path} is neither a flow pipeline (model_index.json) nor a Janus model (config.json); "
            "pass toy-flow, toy-janus or a model directory"
        )
    if args.adapter is not None:
        trained = args.adapter / "training_args.json"
        if trained.is_file():  # the adapter's training seed must not be an evaluation seed
            protocol.check_training_seeds(
                json.loads(trained.read_text()).get("seed"), n_eval_seeds=max(1, args.noise_floor_seeds)
            )

    results = {"base": runs["base"](protocol)}
    print(
        f"base: overall {results['base']['overall']:.3f} ({protocol.n_samples} samples, {protocol.n_prompts} prompts)"
    )
    floor = None
    if args.noise_floor_seeds:
        floor = noise_floor(
            runs["base"], protocol, args.noise_floor_seeds, known={protocol.seed: results["base"]}
        )
        floor["model"] = "the base model"
    difference = None
    if "adapter" in runs:
        results["adapter"] = runs["adapter"](protocol)
        difference = paired_difference(results["base"]["records"], results["adapter"]["records"])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_accuracy_report(
        args.output_dir,
        results,
        split=args.split,
        difference=difference,
        noise_floor=floor,
        noise_floor_hint="--noise-floor-seeds 5 measures it",
        sampler=args.sampler,
        protocol=protocol.to_dict(),
        settings=settings,
    )
    print(path.read_text())
    if difference is not None:
        print(f"adapter − base, overall: {format_change(difference['overall'])}")
    return results


if __name__ == "__main__":
    main()
