"""Toy-world accuracy of a model, or of the model with a LoRA adapter, on held-out prompts.

    python examples/evaluate.py                                   # the shipped toy SD3 pipeline
    python examples/evaluate.py --adapter outputs/toy-solace      # ... with a trained LoRA adapter
    python examples/evaluate.py --model toy-janus --adapter outputs/toy-iris
    python examples/evaluate.py --model path/to/pipeline --adapter path/to/lora --output-dir results/

``--model`` is ``toy-flow`` (default), ``toy-janus``, or a directory: a diffusers flow pipeline
(``model_index.json``) or a ``JanusForConditionalGeneration`` with its processor. Flow adapters are
``pytorch_lora_weights.safetensors`` files (``load_lora_weights``), Janus adapters PEFT directories
(``adapter_model.safetensors``). Writes ``toy_accuracy.json`` and ``toy_accuracy.md`` (accuracy per tag
and overall, GenEval style) to ``--output-dir``; with ``--adapter`` the base and the adapted model are
scored on the same prompts and seeds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from trl_intrinsic.toyworld.models import FLOW_SAMPLING, JANUS_SAMPLING, TOY_FLOW_DIR, TOY_JANUS_DIR
from trl_intrinsic.toyworld.report import write_accuracy_report


def _flow(path: Path, adapter: Path | None, args) -> dict[str, Callable[[], dict]]:
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

    def score() -> dict:
        return evaluate_flow_pipeline(
            pipe, n_per_tag=args.prompts_per_tag, seed=args.seed, split=args.split, **sampling
        )

    def adapted() -> dict:
        pipe.load_lora_weights(str(adapter))
        return score()

    return {"base": score, **({"adapter": adapted} if adapter is not None else {})}


def _janus(path: Path, adapter: Path | None, args) -> dict[str, Callable[[], dict]]:
    from trl_intrinsic.toyworld import load_toy_janus
    from trl_intrinsic.toyworld.evaluation import evaluate_janus

    if adapter is not None and not (adapter / "adapter_model.safetensors").is_file():
        raise ValueError(
            f"--adapter: {adapter} has no adapter_model.safetensors (a PEFT adapter of a Janus model)"
        )
    model, processor = load_toy_janus(path)
    sampling = dict(JANUS_SAMPLING)
    if args.guidance_scale is not None:
        sampling["cfg_weight"] = args.guidance_scale

    def score(m=model) -> dict:
        return evaluate_janus(
            m, processor, n_per_tag=args.prompts_per_tag, seed=args.seed, split=args.split,
            use_cot=not args.no_cot, **sampling,
        )  # fmt: skip

    def adapted() -> dict:
        from peft import PeftModel

        return score(PeftModel.from_pretrained(model, str(adapter)).get_base_model())

    return {"base": score, **({"adapter": adapted} if adapter is not None else {})}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy-flow", help="toy-flow, toy-janus, or a model directory")
    parser.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter trained on --model")
    parser.add_argument("--prompts-per-tag", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("test", "train"), default="test")
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

    path = {"toy-flow": TOY_FLOW_DIR, "toy-janus": TOY_JANUS_DIR}.get(args.model, Path(args.model))
    if (path / "model_index.json").is_file():
        runs = _flow(path, args.adapter, args)
    elif (path / "config.json").is_file():
        runs = _janus(path, args.adapter, args)
    else:
        raise ValueError(
            f"--model: {path} is neither a flow pipeline (model_index.json) nor a Janus model (config.json); "
            "pass toy-flow, toy-janus or a model directory"
        )
    results = {name: run() for name, run in runs.items()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_accuracy_report(args.output_dir, results, split=args.split, settings=settings)
    print(path.read_text())
    return results


if __name__ == "__main__":
    main()
