"""Pretrain the toy ``StableDiffusion3Pipeline`` that ships with the package, on toy-world renders.

Usage::

    python -m trl_intrinsic.toyworld.pretrain flow [--minutes M] [--seed S] [--output DIR] [--init-from DIR]

Two stages, both on images rendered on the fly from ``sample_metadata(split="train")``:

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
the end (verifier, :func:`~trl_intrinsic.toyworld.evaluation.evaluate_flow_pipeline`) is measured on them.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from trl_intrinsic.toyworld.evaluation import evaluate_flow_pipeline
from trl_intrinsic.toyworld.models import FLOW_SAMPLING, load_toy_pipeline
from trl_intrinsic.toyworld.pretrain.common import (
    PretrainConfig,
    TrainStream,
    all_prompts,
    format_scores,
    render_batch,
    timed_log,
    to_pil,
)
from trl_intrinsic.toyworld.pretrain.components import autoencoder_kl, sd3_pipeline
from trl_intrinsic.toyworld.scenes import TAGS, TEST_TAGS, prompt_space, sample_metadata
from trl_intrinsic.toyworld.verifier import evaluate

__all__ = ["FlowPretrainConfig", "build_flow_pipeline", "pretrain_flow"]


@dataclass
class FlowPretrainConfig(PretrainConfig):
    """Settings of :func:`pretrain_flow`: :class:`~trl_intrinsic.toyworld.pretrain.common.PretrainConfig` plus
    the VAE stage (``vae_*``), the flow-matching knobs and the transformer's size."""

    vae_minutes: float = 5.0
    vae_target_accuracy: float = 0.97
    vae_check_every: int = 150
    vae_max_steps: int | None = None
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    timestep_shift: float = 3.0
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

    _stage1_minutes: ClassVar[tuple[str, ...]] = ("vae_minutes",)
    _stage1_counts: ClassVar[tuple[str, ...]] = ("vae_batch_size",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_flow_pipeline(seed: int = 0, *, max_prompt_tokens: int = 24, **transformer_overrides: Any):
    """A randomly initialised toy ``StableDiffusion3Pipeline`` (T5-less) ready for :func:`pretrain_flow`.

    The text side (two CLIP encoders of hidden size 32 and their locally built tokenizers) and the
    scheduler are :func:`~trl_intrinsic.toyworld.pretrain.components.sd3_pipeline`'s (the pipeline of
    :func:`trl_intrinsic.testing.tiny_sd3_pipeline`); the transformer takes ``transformer_overrides``
    (``SD3Transformer2DModel`` config values) and the VAE is a wider
    :func:`~trl_intrinsic.toyworld.pretrain.components.autoencoder_kl` (channels 32, 64). Weights are
    seeded by ``seed``.

    The tokenizers pad and truncate to ``max_prompt_tokens`` (toy-world prompts take at most 19)
    instead of CLIP's 77, which makes the joint attention about twice as cheap.
    """
    pipe = sd3_pipeline(seed, **transformer_overrides)
    longest = max(len(pipe.tokenizer(m["prompt"]).input_ids) for m in all_prompts())
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
        pipe.vae = autoencoder_kl(4, block_out_channels=(32, 64), norm_num_groups=16)
    pipe.register_modules(vae=pipe.vae)
    return pipe


# ----------------------------------------------------------------------------------------------
# Stage 1: VAE
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _reconstruction_accuracy(vae, seed: int, n_per_tag: int = 16) -> float:
    """Verifier accuracy on encode → decode round trips of test-split renders (latent mode)."""
    test = sample_metadata(n_per_tag * len(TEST_TAGS), seed=seed, split="test")
    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(render_batch(test, range(len(test)))).latent_dist.mode()).sample
    vae.train(was_training)
    return evaluate(to_pil(recon), test)["overall"]


def _train_vae(vae, config: FlowPretrainConfig, log) -> dict[str, float]:
    """Train ``vae`` on renders in place, then set its latent ``scaling_factor`` / ``shift_factor``.

    Stops after ``config.vae_minutes`` (or ``vae_max_steps``), or earlier once the verifier accepts
    ``config.vae_target_accuracy`` of the reconstructions (checked every ``vae_check_every`` steps).
    """
    from tqdm.auto import tqdm

    stream = TrainStream(config.seed + 11, config.train_tags)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    vae.train()
    start, step, loss, recon_acc = time.monotonic(), 0, None, float("nan")
    bar = tqdm(desc="vae", unit="step", mininterval=10)
    while time.monotonic() - start < config.vae_minutes * 60 and (
        config.vae_max_steps is None or step < config.vae_max_steps
    ):
        images = render_batch(*stream.next(config.vae_batch_size))
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
    metas, seeds = TrainStream(config.seed + 12, config.train_tags).next(256)
    with torch.no_grad():
        latents = vae.encode(render_batch(metas, seeds)).latent_dist.mode()
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)

    recon_acc = _reconstruction_accuracy(vae, config.seed + 14)
    stats = {"vae_steps": step, "vae_loss": float("nan") if loss is None else loss.item()}
    stats |= {"vae_shift_factor": shift, "vae_scaling_factor": scale, "vae_recon_accuracy": recon_acc}
    log(f"vae done: {step} steps, verifier accuracy on reconstructions {recon_acc:.3f}")
    return stats


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
    stream = TrainStream(config.seed + 21 + 1_000_003 * first_step, config.train_tags)
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
            x0 = (vae.encode(render_batch(metas, seeds)).latent_dist.sample(generator) - shift) * scale
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
                f"step {first_step + step} ({elapsed / 60:.1f} min): loss {running:.4f}, test accuracy {format_scores(scores)}"
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

    log = timed_log(wall_start)
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
    log(f"final test accuracy ({config.final_eval_per_tag} prompts per tag): {format_scores(final)}")
    metrics["test_accuracy"] = final
    metrics["sampling"] = FLOW_SAMPLING
    metrics["eval_seed"] = config.seed + 2000
    metrics["wall_minutes"] = (time.monotonic() - wall_start) / 60
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
