"""Toy-world accuracy of a flow pipeline, or of the pipeline with a LoRA adapter, on held-out prompts.

    python examples/evaluate.py                                   # the shipped toy SD3 pipeline
    python examples/evaluate.py --adapter outputs/toy-solace      # ... with a trained LoRA adapter
    python examples/evaluate.py --model path/to/pipeline --adapter path/to/lora --output-dir results/

Writes ``toy_accuracy.json`` and ``toy_accuracy.md`` (accuracy per tag and overall, GenEval style) to
``--output-dir``. With ``--adapter`` both the base and the adapted pipeline are scored on the same
prompts and seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trl_intrinsic.toyworld import load_toy_pipeline
from trl_intrinsic.toyworld.models import FLOW_SAMPLING
from trl_intrinsic.toyworld.pretrain import evaluate_flow_pipeline
from trl_intrinsic.toyworld.report import write_accuracy_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="pipeline directory (default: the toy pipeline)"
    )
    parser.add_argument(
        "--adapter", type=Path, default=None, help="directory with pytorch_lora_weights.safetensors"
    )
    parser.add_argument("--prompts-per-tag", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-inference-steps", type=int, default=FLOW_SAMPLING["num_inference_steps"])
    parser.add_argument("--guidance-scale", type=float, default=FLOW_SAMPLING["guidance_scale"])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/evaluation"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    pipe = load_toy_pipeline(args.model)
    sampling = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale}
    results = {
        "base": evaluate_flow_pipeline(pipe, n_per_tag=args.prompts_per_tag, seed=args.seed, **sampling)
    }
    if args.adapter is not None:
        if not (args.adapter / "pytorch_lora_weights.safetensors").is_file():
            raise ValueError(f"--adapter: {args.adapter} has no pytorch_lora_weights.safetensors")
        pipe.load_lora_weights(str(args.adapter))
        results["adapter"] = evaluate_flow_pipeline(
            pipe, n_per_tag=args.prompts_per_tag, seed=args.seed, **sampling
        )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_accuracy_report(args.output_dir, results, settings=settings)
    print(path.read_text())
    return results


if __name__ == "__main__":
    main()
