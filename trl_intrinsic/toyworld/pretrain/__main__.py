"""Command line of the toy models' pretraining: ``python -m trl_intrinsic.toyworld.pretrain {flow,janus}``.

Options left unset keep the defaults of :class:`~trl_intrinsic.toyworld.pretrain.flow.FlowPretrainConfig` /
:class:`~trl_intrinsic.toyworld.pretrain.janus.JanusPretrainConfig`; ``--output`` defaults to the package's
``weights/<model>`` (the shipped model).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trl_intrinsic.toyworld.pretrain.flow import FlowPretrainConfig, pretrain_flow
from trl_intrinsic.toyworld.pretrain.janus import JanusPretrainConfig, pretrain_janus

__all__ = ["main"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trl_intrinsic.toyworld.pretrain",
        description="Pretrain a toy model on toy-world renders.",
    )
    parser.add_argument("model", choices=["flow", "janus"], help="which toy model to train")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"training time, both stages (default {FlowPretrainConfig.minutes} for flow, "
        f"{JanusPretrainConfig.minutes:g} for janus)",
    )
    parser.add_argument("--vae-minutes", type=float, default=None, help="flow: VAE time budget")
    parser.add_argument("--vq-minutes", type=float, default=None, help="janus: VQ time budget")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop the transformer / language model after this many steps",
    )
    parser.add_argument("--vae-max-steps", type=int, default=None)
    parser.add_argument("--vq-max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-every-minutes", type=float, default=None)
    parser.add_argument("--final-eval-per-tag", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="default: the package's weights/<model>")
    parser.add_argument(
        "--init-from", default=None, help="flow: continue training the pipeline saved in this directory"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and run :func:`~trl_intrinsic.toyworld.pretrain.flow.pretrain_flow` or
    :func:`~trl_intrinsic.toyworld.pretrain.janus.pretrain_janus`; returns their metrics."""
    args = _parser().parse_args(argv)
    output = args.output or WEIGHTS_DIR / args.model
    options = {
        "minutes": args.minutes,
        "batch_size": args.batch_size,
        "eval_every_minutes": args.eval_every_minutes,
        "final_eval_per_tag": args.final_eval_per_tag,
        "threads": args.threads,
    }
    if args.model == "flow":
        options |= {"vae_minutes": args.vae_minutes, "init_from": args.init_from}
        config = FlowPretrainConfig(
            seed=args.seed,
            max_steps=args.max_steps,
            vae_max_steps=args.vae_max_steps,
            **{k: v for k, v in options.items() if v is not None},
        )
        return pretrain_flow(output, config)
    options["vq_minutes"] = args.vq_minutes
    config = JanusPretrainConfig(
        seed=args.seed,
        max_steps=args.max_steps,
        vq_max_steps=args.vq_max_steps,
        **{k: v for k, v in options.items() if v is not None},
    )
    return pretrain_janus(output, config)


if __name__ == "__main__":
    main()
