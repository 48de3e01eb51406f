"""Pretrain the toy text-to-image models that ship with the package, on toy-world renders.

Usage::

    python -m trl_intrinsic.toyworld.pretrain flow [--minutes M] [--seed S] [--output DIR] [--init-from DIR]
    python -m trl_intrinsic.toyworld.pretrain janus [--seed S] [--minutes M] [--max-steps N] \
        [--vq-max-steps N] [--threads T] [--output DIR]

``janus`` trains the toy ``JanusForConditionalGeneration`` (a VQ tokenizer, then the language model
on IRIS-formatted sequences with a chain-of-thought); see :mod:`trl_intrinsic.toyworld.pretrain_janus`.

``flow`` trains a small ``StableDiffusion3Pipeline`` in two stages, both on images rendered on the
fly from ``sample_metadata(split="train")``:

1. **VAE.** An ``AutoencoderKL`` with one ×2 downsampling (32×32×3 px ↔ 16×16×4 latents) learns to
   reconstruct renders: mean squared error with coloured pixels weighted ×5 (or it settles on the
   white background), plus a small KL term. Its ``scaling_factor`` / ``shift_factor`` are then set
   from the latent statistics so that scaled latents have zero mean and unit variance.
2. **Transformer.** An ``SD3Transformer2DModel`` learns rectified flow: for clean scaled latents
   ``x0``, noise ``ε`` and a time ``t ∈ (0, 1)``, ``x_t = (1 − t)·x0 + t·ε`` and the model predicts
   the velocity ``v = ε − x0`` (mean squared error), which is what ``FlowMatchEulerDiscreteScheduler``
   integrates from ``t = 1`` to ``0``. ``t`` is logit-normal, shifted like the sampling schedule
   (shift 3). A share of captions is replaced by the empty prompt so that classifier-free guidance
   works. The two CLIP text encoders stay frozen at their random initialisation (they tell the
   prompts apart, which is all the transformer needs); their embeddings of every training prompt
   are computed once. The saved transformer is an exponential moving average of the weights.

``--init-from DIR`` continues stage 2 from a pipeline saved by an earlier run (its VAE and text encoders
are kept; the render stream is seeded by the steps already taken, so the continuation sees new images).

The prompts of the held-out ``"test"`` split never appear in training; the accuracy reported at
the end (verifier, :func:`evaluate_flow_pipeline`) is measured on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trl_intrinsic.toyworld.models import FLOW_SAMPLING, load_toy_pipeline
from trl_intrinsic.toyworld.rendering import render
from trl_intrinsic.toyworld.scenes import TAGS, TEST_TAGS, prompt_space, sample_metadata
from trl_intrinsic.toyworld.verifier import evaluate

__all__ = [
    "FLOW_SAMPLING",
    "FlowPretrainConfig",
    "build_flow_pipeline",
    "evaluate_flow_pipeline",
    "main",
    "pretrain_flow",
]


@dataclass
class FlowPretrainConfig:
    """Settings of :func:`pretrain_flow`. Times are wall-clock minutes; a ``max_*_steps`` stops earlier."""

    seed: int = 0
    minutes: float = 25.0
    vae_minutes: float = 5.0
    vae_target_accuracy: float = 0.97
    vae_check_every: int = 150
    max_steps: int | None = None
    vae_max_steps: int | None = None
    batch_size: int = 32
    vae_batch_size: int = 16
    learning_rate: float = 7e-4
    vae_learning_rate: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    timestep_shift: float = 3.0
    # Tags to draw training prompts from; a repeated tag is drawn more often (position and colour
    # binding learn slowest).
    train_tags: tuple[str, ...] = (
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "position",
        "color_attr",
        "color_attr",
    )
    eval_every_minutes: float = 5.0
    eval_per_tag: int = 24
    final_eval_per_tag: int = 200
    threads: int = 1
    max_prompt_tokens: int = 24
    # Continue from a pipeline written by `pretrain flow` (its VAE, text encoders and transformer) instead
    # of starting from scratch: the VAE stage is skipped and the transformer trains on new renders.
    init_from: str | None = None
    transformer: dict[str, Any] = field(
        default_factory=lambda: {
            "num_layers": 4,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "caption_projection_dim": 128,
        }
    )

    def __post_init__(self) -> None:
        for name in ("minutes", "vae_minutes", "eval_every_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        for name in ("batch_size", "vae_batch_size", "eval_per_tag", "final_eval_per_tag", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _toy_vae():
    """An ``AutoencoderKL`` with one ×2 downsampling: (B, 3, 32, 32) in [-1, 1] ↔ (B, 4, 16, 16)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
        mid_block_add_attention=False,
    )


def build_flow_pipeline(seed: int = 0, *, max_prompt_tokens: int = 24, **transformer_overrides: Any):
    """A randomly initialised toy ``StableDiffusion3Pipeline`` (T5-less) ready for :func:`pretrain_flow`.

    The text side (two CLIP encoders of hidden size 32 and their locally built tokenizers) and the
    scheduler come from :func:`trl_intrinsic.testing.tiny_sd3_pipeline`; the transformer takes
    ``transformer_overrides`` (``SD3Transformer2DModel`` config values) and the VAE is
    :func:`_toy_vae`. Weights are seeded by ``seed``.

    The tokenizers pad and truncate to ``max_prompt_tokens`` (toy-world prompts take at most 19)
    instead of CLIP's 77, which makes the joint attention about twice as cheap.
    """
    from trl_intrinsic.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed, **transformer_overrides)
    longest = max(len(pipe.tokenizer(m["prompt"]).input_ids) for m in _all_prompts())
    if max_prompt_tokens < longest:
        raise ValueError(
            f"max_prompt_tokens: the longest toy-world prompt takes {longest} tokens, got {max_prompt_tokens}"
        )
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        tokenizer.model_max_length = max_prompt_tokens
    pipe.tokenizer_max_length = max_prompt_tokens
    pipe.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        pipe.vae = _toy_vae()
    pipe.register_modules(vae=pipe.vae)
    return pipe


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _all_prompts() -> list[dict]:
    """Every metadata dict of both splits."""
    out = [m for tag in TAGS for m in prompt_space(tag, "train")]
    return out + [m for tag in TEST_TAGS for m in prompt_space(tag, "test")]


def _render_batch(metadatas: Sequence[dict], seeds: Sequence[int]) -> torch.Tensor:
    """Renders as a (B, 3, 32, 32) float tensor in [-1, 1]."""
    arrays = np.stack(
        [np.asarray(render(m, seed=int(s)), dtype=np.float32) for m, s in zip(metadatas, seeds)]
    )
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


class _TrainStream:
    """Endless, seeded stream of (metadata, render seed) from the train split."""

    def __init__(self, seed: int, tags: Sequence[str]):
        self._rng = np.random.default_rng(seed)
        self._tags = list(tags)

    def next(self, n: int) -> tuple[list[dict], list[int]]:
        metas = sample_metadata(n, seed=int(self._rng.integers(2**31)), tags=self._tags)
        seeds = self._rng.integers(2**31, size=n).tolist()
        return metas, seeds


# ----------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _reconstruction_accuracy(vae, seed: int, n_per_tag: int = 16) -> float:
    """Verifier accuracy on encode → decode round trips of test-split renders (latent mode)."""
    test = sample_metadata(n_per_tag * len(TEST_TAGS), seed=seed, split="test")
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(_render_batch(test, range(len(test)))).latent_dist.mode()).sample
    vae.train(was_training)
    return evaluate(_to_pil(recon), test)["overall"]


def _train_vae(vae, config: FlowPretrainConfig, log) -> dict[str, float]:
    """Train ``vae`` on renders in place, then set its latent ``scaling_factor`` / ``shift_factor``.

    Stops after ``config.vae_minutes`` (or ``vae_max_steps``), or earlier once the verifier accepts
    ``config.vae_target_accuracy`` of the reconstructions (checked every ``vae_check_every`` steps).
    """
    from tqdm.auto import tqdm

    stream = _TrainStream(config.seed + 11, config.train_tags)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    vae.train()
    start, step, loss, recon_acc = time.monotonic(), 0, None, float("nan")
    bar = tqdm(desc="vae", unit="step", mininterval=10)
    while time.monotonic() - start < config.vae_minutes * 60 and (
        config.vae_max_steps is None or step < config.vae_max_steps
    ):
        images = _render_batch(*stream.next(config.vae_batch_size))
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Coloured pixels (anything not white) weigh 5x: otherwise the background dominates.
        weight = 1.0 + 4.0 * (images.min(dim=1, keepdim=True).values < 0.9).float()
        loss = (weight * (recon - images) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % config.vae_check_every == 0:
            recon_acc = _reconstruction_accuracy(vae, config.seed + 13)
            log(
                f"vae step {step}: loss {loss.item():.4f}, verifier accuracy on reconstructions {recon_acc:.3f}"
            )
            if recon_acc >= config.vae_target_accuracy:
                break
    bar.close()
    vae.eval()

    # Latent statistics -> SD3 convention: scaled = (z - shift_factor) * scaling_factor.
    metas, seeds = _TrainStream(config.seed + 12, config.train_tags).next(256)
    with torch.no_grad():
        latents = vae.encode(_render_batch(metas, seeds)).latent_dist.mode()
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)

    recon_acc = _reconstruction_accuracy(vae, config.seed + 14)
    stats = {"vae_steps": step, "vae_loss": float("nan") if loss is None else loss.item()}
    stats |= {"vae_shift_factor": shift, "vae_scaling_factor": scale, "vae_recon_accuracy": recon_acc}
    log(f"vae done: {step} steps, verifier accuracy on reconstructions {recon_acc:.3f}")
    return stats


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


# ----------------------------------------------------------------------------------------------
# Stage 2: transformer
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _prompt_table(pipe) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Embeddings of every train prompt and of the empty prompt (index 0), as the pipeline computes them.

    Returns:
        ``(index, embeds, pooled)``: ``index[prompt]`` is a row of ``embeds`` (P, L, D) and ``pooled``
        (P, 64); L = 77 CLIP tokens + ``max_sequence_length`` zero tokens.
    """
    prompts = ["", *sorted({m["prompt"] for tag in TAGS for m in prompt_space(tag, "train")})]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts,
        prompts,
        None,
        do_classifier_free_guidance=False,
        max_sequence_length=FLOW_SAMPLING["max_sequence_length"],
    )
    return {p: i for i, p in enumerate(prompts)}, embeds, pooled


def _sample_t(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal times in (0, 1), shifted towards noise like the sampling schedule: (n,)."""
    t = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


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
        ``"blank"``: the share of images without content (pixel standard deviation below
        :data:`trl_intrinsic.flow.diagnostics.BLANK_IMAGE_STD`), the failure an intrinsic reward can drift to.
    """
    if n_per_tag < 1:
        raise ValueError(f"n_per_tag: must be ≥ 1, got {n_per_tag}")
    settings = {**FLOW_SAMPLING, **sampling}
    tags = None if split == "test" else list(TAGS)
    n_tags = len(TEST_TAGS) if tags is None else len(tags)
    metas = sample_metadata(n_per_tag * n_tags, seed=seed, split=split, tags=tags)
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


def _format(scores: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "counts")


def _train_transformer(
    pipe, config: FlowPretrainConfig, log, deadline: float, first_step: int = 0
) -> dict[str, Any]:
    """Train ``pipe.transformer`` until ``deadline`` (``time.monotonic()``) or ``max_steps``; keeps the EMA.

    ``first_step`` counts the steps of an earlier run being continued: the render stream is seeded with it,
    so a continuation sees new images, and ``history`` reports cumulative steps.
    """
    from tqdm.auto import tqdm

    index, table_embeds, table_pooled = _prompt_table(pipe)
    model = pipe.transformer
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps))
    )
    stream = _TrainStream(config.seed + 21 + 1_000_003 * first_step, config.train_tags)
    generator = torch.Generator().manual_seed(config.seed + 22 + 1_000_003 * first_step)
    vae = pipe.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    history: list[dict[str, Any]] = []
    start = time.monotonic()
    next_eval = config.eval_every_minutes * 60
    step, running = 0, None
    bar = tqdm(desc="transformer", unit="step", mininterval=10)
    while time.monotonic() < deadline and (config.max_steps is None or step < config.max_steps):
        metas, seeds = stream.next(config.batch_size)
        with torch.no_grad():
            x0 = (vae.encode(_render_batch(metas, seeds)).latent_dist.sample(generator) - shift) * scale
        rows = torch.tensor([index[m["prompt"]] for m in metas])
        drop = torch.rand(len(rows), generator=generator) < config.caption_dropout
        rows = torch.where(drop, torch.zeros_like(rows), rows)
        t = _sample_t(len(rows), config.timestep_shift, generator)
        noise = torch.randn(x0.shape, generator=generator)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        pred = model(
            hidden_states=x_t,
            encoder_hidden_states=table_embeds[rows],
            pooled_projections=table_pooled[rows],
            timestep=t * 1000,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        elapsed = time.monotonic() - start
        if config.eval_every_minutes > 0 and elapsed >= next_eval:
            next_eval += config.eval_every_minutes * 60
            pipe.transformer = ema
            scores = evaluate_flow_pipeline(pipe, n_per_tag=config.eval_per_tag, seed=config.seed + 1000)
            pipe.transformer = model
            history.append({"step": first_step + step, "minutes": elapsed / 60, "loss": running, **scores})
            log(
                f"step {first_step + step} ({elapsed / 60:.1f} min): loss {running:.4f}, test accuracy {_format(scores)}"
            )
    bar.close()
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    return {
        "steps": step,
        "train_minutes": (time.monotonic() - start) / 60,
        "loss": running,
        "history": history,
    }


def pretrain_flow(output_dir: str | Path, config: FlowPretrainConfig | None = None) -> dict[str, Any]:
    """Train the toy flow pipeline and save it to ``output_dir`` (safetensors), with ``metrics.json``.

    Returns:
        The metrics written to ``metrics.json``: config, training statistics, the final test accuracy
        (``"test_accuracy"``, :func:`evaluate_flow_pipeline` with :data:`FLOW_SAMPLING` and
        ``config.final_eval_per_tag`` prompts per tag) and the total wall time in minutes.
    """
    config = config or FlowPretrainConfig()
    output_dir = Path(output_dir)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    wall_start = time.monotonic()

    def log(message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"[{(time.monotonic() - wall_start) / 60:5.1f} min] {message}")

    metrics: dict[str, Any] = {"config": asdict(config)}
    deadline = time.monotonic() + config.minutes * 60
    if config.init_from is None:
        pipe = build_flow_pipeline(
            config.seed, max_prompt_tokens=config.max_prompt_tokens, **config.transformer
        )
        metrics |= _train_vae(pipe.vae, config, log)
        first_step = 0
    else:
        previous = Path(config.init_from) / "metrics.json"
        if not previous.is_file():
            raise ValueError(
                f"init_from: {config.init_from} has no metrics.json; continue only from a directory written "
                "by `pretrain flow`"
            )
        pipe = load_toy_pipeline(config.init_from)
        earlier = json.loads(previous.read_text())
        first_step = int(earlier["steps"])
        metrics["continued_from"] = {
            k: earlier[k] for k in ("config", "steps", "test_accuracy") if k in earlier
        }
        metrics |= {k: earlier[k] for k in earlier if k.startswith("vae_")}
        log(f"continuing from {config.init_from} after {first_step} transformer steps")
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    log(f"transformer: {n_params / 1e6:.2f} M parameters")
    metrics |= _train_transformer(pipe, config, log, deadline, first_step)
    metrics["steps"] += first_step

    # Ship fp16 weights (half the size); measure the accuracy of exactly what ships, reloaded.
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(output_dir, safe_serialization=True)
    log(f"saved to {output_dir}")
    shipped = load_toy_pipeline(output_dir)
    final = evaluate_flow_pipeline(shipped, n_per_tag=config.final_eval_per_tag, seed=config.seed + 2000)
    log(f"final test accuracy ({config.final_eval_per_tag} prompts per tag): {_format(final)}")
    metrics["test_accuracy"] = final
    metrics["sampling"] = FLOW_SAMPLING
    metrics["eval_seed"] = config.seed + 2000
    metrics["wall_minutes"] = (time.monotonic() - wall_start) / 60
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _default_output(model: str) -> Path:
    return Path(__file__).resolve().parent / "weights" / model


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m trl_intrinsic.toyworld.pretrain",
        description="Pretrain a toy model on toy-world renders.",
    )
    parser.add_argument("model", choices=["flow", "janus"], help="which toy model to train")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"training time, both stages (default {FlowPretrainConfig.minutes} for flow, 35 for janus)",
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
    args = parser.parse_args(argv)
    args.output = args.output or _default_output(args.model)
    if args.model == "janus":
        from trl_intrinsic.toyworld.pretrain_janus import main_janus

        return main_janus(args)
    options = {
        "minutes": args.minutes,
        "vae_minutes": args.vae_minutes,
        "batch_size": args.batch_size,
        "eval_every_minutes": args.eval_every_minutes,
        "final_eval_per_tag": args.final_eval_per_tag,
        "threads": args.threads,
        "init_from": args.init_from,
    }
    config = FlowPretrainConfig(
        seed=args.seed,
        max_steps=args.max_steps,
        vae_max_steps=args.vae_max_steps,
        **{k: v for k, v in options.items() if v is not None},
    )
    return pretrain_flow(args.output, config)


if __name__ == "__main__":
    main()
