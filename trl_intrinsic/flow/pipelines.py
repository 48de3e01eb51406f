"""Adapters: the model-specific half of a diffusers flow-matching text-to-image pipeline.

The trainers and rewards never branch on the model type. Everything that differs between
``StableDiffusion3Pipeline``, ``FluxPipeline`` and ``SanaPipeline`` — how prompts are encoded, how the
initial noise is laid out, how the transformer is called and how latents are decoded — lives in one
:class:`FlowPipelineAdapter` subclass per pipeline. Each adapter reuses the pipeline's own
``encode_prompt``, ``prepare_latents`` and scheduler so that a deterministic rollout
(``noise_level=0``) reproduces what the pipeline itself generates.

Supporting a new flow pipeline means writing one subclass and decorating it with
:func:`register_flow_adapter`; nothing else changes.

Conventions. Latents are float32 on the pipeline's device; the transformer may run in another dtype.
``timesteps`` are the scheduler's (``sigma · num_train_timesteps``, e.g. in [0, 1000]); each adapter
converts them to what its transformer expects. Classifier-free guidance puts the unconditional rows
first (``[uncond; cond]``), as the diffusers pipelines do, and runs both halves in one forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils import logging
from PIL import Image

logger = logging.get_logger(__name__)

_ADAPTERS: list[type[FlowPipelineAdapter]] = []

#: LoRA targets of MMDiT transformers (SD3, FLUX.1): image and text attention projections (Flow-GRPO's set)
MMDIT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


def _resolution_shift(scheduler_config, image_seq_len: int, default_max_shift: float) -> float:
    """``mu`` of resolution-dependent timestep shifting, as SD3.5 / FLUX.1 pipelines compute it."""
    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", default_max_shift),
    )


@dataclass
class PromptEmbeddings:
    """Text conditioning for ``U`` unique prompts, plus the negative prompt for guidance.

    Attributes:
        cond: transformer keyword arguments, each tensor (U, ...) — one row per unique prompt.
        uncond: the same keys for the negative prompt, each tensor (1, ...); ``None`` without
            classifier-free guidance.
        shared: keyword arguments that have no batch dimension (e.g. Flux ``txt_ids`` (L, 3)).
    """

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_prompts(self) -> int:
        return next(iter(self.cond.values())).shape[0]

    def rows(self, rows: torch.Tensor, *, negative: bool = False) -> dict[str, torch.Tensor]:
        """Keyword arguments for a batch whose row ``i`` is conditioned on prompt ``rows[i]``.

        Args:
            rows: LongTensor (N,) of indices into the unique prompts.
            negative: return the negative prompt's embeddings repeated N times instead.
        """
        if negative:
            if self.uncond is None:
                raise ValueError("These embeddings were encoded without a negative prompt (no guidance).")
            return {k: v.expand(len(rows), *v.shape[1:]) for k, v in self.uncond.items()}
        return {k: v[rows.to(v.device)] for k, v in self.cond.items()}

    def to(self, device: str | torch.device) -> PromptEmbeddings:
        """The same embeddings on ``device`` (so ``accelerate.utils.send_to_device`` moves them too)."""
        def move(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}

        return PromptEmbeddings(cond=move(self.cond), uncond=move(self.uncond), shared=move(self.shared))


def register_flow_adapter(adapter_cls: type[FlowPipelineAdapter]) -> type[FlowPipelineAdapter]:
    """Class decorator: make :func:`get_flow_adapter` pick ``adapter_cls`` for its ``pipeline_class``.

    Adapters registered later take precedence, so a subclass of a supported pipeline can get its own.
    """
    _ADAPTERS.insert(0, adapter_cls)
    return adapter_cls


def get_flow_adapter(pipeline: DiffusionPipeline) -> FlowPipelineAdapter:
    """Return the adapter for ``pipeline`` (an instance of a registered pipeline class)."""
    for adapter_cls in _ADAPTERS:
        if isinstance(pipeline, adapter_cls.pipeline_class):
            return adapter_cls(pipeline)
    supported = ", ".join(a.pipeline_class.__name__ for a in reversed(_ADAPTERS))
    raise TypeError(
        f"No flow adapter for {type(pipeline).__name__}; supported pipelines: {supported}. "
        "Write a `FlowPipelineAdapter` subclass and decorate it with `register_flow_adapter`."
    )


class FlowPipelineAdapter:
    """Model-specific operations on a flow-matching pipeline used by rollouts, training and rewards.

    Subclasses set :attr:`pipeline_class` and :attr:`lora_target_modules` and implement
    :meth:`_encode`, :meth:`_transformer_forward` and :meth:`_latents_to_vae`; they may override
    :meth:`prepare_latents` and :meth:`_scheduler_kwargs`.
    """

    pipeline_class: ClassVar[type[DiffusionPipeline]] = DiffusionPipeline
    #: modules that receive LoRA adapters by default (attention projections of the transformer)
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: whether guidance runs an unconditional branch (``False`` for guidance-distilled models)
    uses_negative_prompt: ClassVar[bool] = True

    def __init__(self, pipeline: DiffusionPipeline):
        self.pipeline = pipeline
        for name in ("transformer", "vae", "scheduler"):
            if getattr(pipeline, name, None) is None:
                raise ValueError(f"{type(pipeline).__name__} has no `{name}`; a flow pipeline needs one.")
        self.scheduler = self._flow_scheduler(pipeline.scheduler)

    # ------------------------------------------------------------------ components
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    def _flow_scheduler(self, scheduler) -> FlowMatchEulerDiscreteScheduler:
        """A private copy of the pipeline's scheduler (stepping by index never mutates the user's)."""
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"{type(self.pipeline).__name__} uses {type(scheduler).__name__}, which is not a flow-matching "
                "Euler scheduler. Set `pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(...)` "
                "with the model's shift before training."
            )
        if scheduler.config.get("stochastic_sampling", False):
            raise ValueError("The scheduler has `stochastic_sampling=True`; disable it, the SDE replaces it.")
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        *,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
    ) -> PromptEmbeddings:
        """Encode each prompt once (pass unique prompts) and, if given, the negative prompt.

        Args:
            prompts: U prompt strings.
            negative_prompt: the unconditional prompt for classifier-free guidance (usually ``""``);
                ``None`` encodes no negative branch.
            max_sequence_length: token budget of the long text encoder (T5 / Gemma); the pipeline's
                default when ``None``.
        """
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        cond, shared = self._encode(list(prompts), negative=False, **kwargs)
        uncond = None
        if negative_prompt is not None and self.uses_negative_prompt:
            uncond, _ = self._encode([negative_prompt], negative=True, **kwargs)
        return PromptEmbeddings(cond=cond, uncond=uncond, shared=shared)

    def _encode(
        self, prompts: list[str], *, negative: bool, **kwargs
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return (per-prompt transformer kwargs with leading dim U, batch-free kwargs).

        ``negative`` is set when encoding the negative prompt (some pipelines encode it differently).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ noise and schedule
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent (no batch dim) for an image of ``height`` × ``width`` pixels."""
        return tuple(
            self.prepare_latents(1, height, width, generator=torch.Generator().manual_seed(0)).shape[1:]
        )

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        """Initial noise (batch_size, *latent_shape), float32, drawn as the pipeline draws it."""
        channels = self.transformer.config.in_channels
        latents = self.pipeline.prepare_latents(
            batch_size, channels, height, width, torch.float32, self.device, generator
        )
        return latents.float()

    def _scheduler_kwargs(self, height: int, width: int) -> dict:
        return {}

    def set_timesteps(
        self, num_inference_steps: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling schedule the pipeline would use.

        Returns:
            sigmas: (S+1,) float32, decreasing from ≈1 to exactly 0.
            timesteps: (S,) float32 in scheduler units (``sigma · num_train_timesteps``).
        """
        self.scheduler.set_timesteps(
            num_inference_steps, device=self.device, **self._scheduler_kwargs(height, width)
        )
        sigmas = self.scheduler.sigmas.to(self.device, torch.float32)
        timesteps = self.scheduler.timesteps.to(self.device, torch.float32)
        return sigmas, timesteps

    def timestep_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Scheduler timestep for a noise level ``sigma`` ∈ [0, 1] (same shape)."""
        return sigma.float() * self.scheduler.config.num_train_timesteps

    # ------------------------------------------------------------------ velocity
    def predict_velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: PromptEmbeddings,
        rows: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        conditional: bool = False,
        transformer: torch.nn.Module | None = None,
        detach_uncond: bool = False,
        uncond_velocity: torch.Tensor | None = None,
        return_uncond: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Velocity ``v = ε − x0`` predicted for each row, with guidance in a single forward.

        Args:
            latents: (N, *latent_shape) noisy latents ``x_σ``.
            timesteps: (N,) or scalar, scheduler units.
            embeddings: encoded prompts; ``rows`` (LongTensor (N,)) picks each row's prompt.
            guidance_scale: classifier-free guidance weight; ≤ 1 or ``conditional=True`` runs the
                conditional branch only (guidance-distilled models still receive it as an embedding).
            conditional: force the conditional prediction (what SOLACE queries).
            transformer: the module to call (e.g. the accelerate-wrapped one); defaults to the
                pipeline's transformer.
            detach_uncond: under guidance, stop the gradient through the unconditional prediction (the
                Flow-GRPO reference's training): it is computed in a separate forward without gradients, so
                the backward pass covers the conditional rows only. Same value up to float rounding.
            uncond_velocity: under guidance, an unconditional prediction (N, *latent_shape) computed before
                at the same inputs and weights (e.g. while sampling); only the conditional half is run, and the
                given one is used as a constant.
            return_uncond: also return the unconditional prediction (detached; ``None`` without guidance).

        Returns:
            (N, *latent_shape) float32 velocity; with ``return_uncond``, ``(velocity, uncond velocity)``.
        """
        transformer = self.transformer if transformer is None else transformer
        n = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device, dtype=torch.float32).expand(n)
        rows = torch.as_tensor(rows, device=latents.device, dtype=torch.long)
        use_cfg = (
            not conditional
            and guidance_scale > 1.0
            and self.uses_negative_prompt
            and embeddings.uncond is not None
        )
        shared = embeddings.shared

        def forward(x, t, conditioning):
            return self._transformer_forward(transformer, x, t, {**conditioning, **shared}, guidance_scale).float()

        cond = embeddings.rows(rows)
        if not use_cfg:
            velocity, v_uncond = forward(latents, timesteps, cond), None
        elif uncond_velocity is not None or detach_uncond:
            if uncond_velocity is None:
                with torch.no_grad():
                    uncond_velocity = forward(latents, timesteps, embeddings.rows(rows, negative=True))
            v_uncond = uncond_velocity.float().detach()
            velocity = v_uncond + guidance_scale * (forward(latents, timesteps, cond) - v_uncond)
        else:  # both halves in one forward of 2N rows
            uncond = embeddings.rows(rows, negative=True)
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            v_uncond, v_cond = forward(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both).chunk(2)
            velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
        if return_uncond:
            return velocity, None if v_uncond is None else v_uncond.detach()
        return velocity

    def _transformer_forward(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _transformer_dtype(self, transformer: torch.nn.Module) -> torch.dtype:
        module = getattr(transformer, "module", transformer)
        return next(module.parameters()).dtype

    # ------------------------------------------------------------------ decoding
    def _latents_to_vae(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Map final latents (B, *latent_shape) to the VAE's input scale and layout (B, C, h, w)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """Decode final latents (B, *latent_shape) to B RGB PIL images of ``height`` × ``width``."""
        vae = self.pipeline.vae
        z = self._latents_to_vae(latents.float(), height, width).to(vae.dtype)
        images = vae.decode(z, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images.float(), output_type="pil")


@register_flow_adapter
class StableDiffusion3Adapter(FlowPipelineAdapter):
    """SD3 / SD3.5: CLIP-L + CLIP-G (+ T5) text, pooled projections, unpacked 16-channel latents."""

    pipeline_class = StableDiffusion3Pipeline
    lora_target_modules = MMDIT_LORA_TARGETS

    def _encode(self, prompts, *, negative, **kwargs):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **kwargs,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, {}

    def _scheduler_kwargs(self, height, width):
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        patch = self.transformer.config.patch_size
        seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        mu = _resolution_shift(config, seq_len, default_max_shift=1.16)
        return {"mu": mu}

    def _transformer_forward(self, transformer, latents, timesteps, conditioning, guidance_scale):
        dtype = self._transformer_dtype(transformer)
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]

    def _latents_to_vae(self, latents, height, width):
        config = self.pipeline.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)


@register_flow_adapter
class FluxAdapter(FlowPipelineAdapter):
    """FLUX.1: packed 2×2 latents (B, L, 4C), guidance as an embedding (no unconditional branch).

    FLUX.1-dev is guidance-distilled: ``guidance_scale`` is fed to the transformer's guidance embedding
    for every forward (also the conditional one SOLACE queries), as ``FluxPipeline`` does.
    """

    pipeline_class = FluxPipeline
    lora_target_modules = MMDIT_LORA_TARGETS
    uses_negative_prompt = False

    def _encode(self, prompts, *, negative, **kwargs):
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1, **kwargs
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, {"txt_ids": text_ids}

    def prepare_latents(self, batch_size, height, width, generator):
        channels = self.transformer.config.in_channels // 4
        latents, _ = self.pipeline.prepare_latents(
            batch_size, channels, height, width, torch.float32, self.device, generator
        )
        self._remember_image_ids(height, width)
        return latents.float()

    def _remember_image_ids(self, height: int, width: int) -> None:
        """Positional ids (L, 3) of the packed latent tokens, looked up by sequence length L."""
        h, w = height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2
        ids = self.pipeline._prepare_latent_image_ids(1, h, w, self.device, torch.float32)
        self._image_ids = {**getattr(self, "_image_ids", {}), ids.shape[0]: ids}

    def _image_ids_for(self, latents: torch.Tensor) -> torch.Tensor:
        ids = getattr(self, "_image_ids", {}).get(latents.shape[1])
        if ids is None:
            raise ValueError(
                "Call `set_timesteps` or `prepare_latents` with the image size before predicting."
            )
        return ids.to(latents.device)

    def _scheduler_kwargs(self, height, width):
        config = self.scheduler.config
        seq_len = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        mu = _resolution_shift(config, seq_len, default_max_shift=1.15)
        return {"mu": mu}

    def set_timesteps(self, num_inference_steps, height, width):
        # FluxPipeline passes explicit linear sigmas, shifted by the scheduler with mu.
        self._remember_image_ids(height, width)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        self.scheduler.set_timesteps(
            num_inference_steps, device=self.device, sigmas=sigmas, **self._scheduler_kwargs(height, width)
        )
        return self.scheduler.sigmas.to(self.device, torch.float32), self.scheduler.timesteps.to(
            self.device, torch.float32
        )

    def _transformer_forward(self, transformer, latents, timesteps, conditioning, guidance_scale):
        dtype = self._transformer_dtype(transformer)
        config = getattr(transformer, "module", transformer).config
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full(
                (latents.shape[0],), guidance_scale, device=latents.device, dtype=torch.float32
            )
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=(timesteps / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"].to(dtype),
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            txt_ids=conditioning["txt_ids"],
            img_ids=self._image_ids_for(latents),
            return_dict=False,
        )[0]

    def _latents_to_vae(self, latents, height, width):
        config = self.pipeline.vae.config
        latents = self.pipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        return latents / config.scaling_factor + (config.shift_factor or 0.0)


@register_flow_adapter
class SanaAdapter(FlowPipelineAdapter):
    """Sana: Gemma-2 text with attention masks, DC-AE latents, ``timestep_scale``.

    Sana checkpoints ship a flow-matching ``DPMSolverMultistepScheduler``; the SDE needs Euler steps,
    so such a scheduler is replaced by a ``FlowMatchEulerDiscreteScheduler`` with the same shift.
    """

    pipeline_class = SanaPipeline

    def _flow_scheduler(self, scheduler):
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.get(
            "use_flow_sigmas", False
        ):
            shift = scheduler.config.get("flow_shift", 1.0)
            logger.warning(
                f"Sampling with FlowMatchEulerDiscreteScheduler(shift={shift}) instead of "
                f"{type(scheduler).__name__}: the Flow-GRPO SDE is defined on Euler steps."
            )
            return FlowMatchEulerDiscreteScheduler(shift=shift)
        return super()._flow_scheduler(scheduler)

    def _encode(self, prompts, *, negative, **kwargs):
        # The pipeline prefixes prompts (not the negative prompt) with its default "complex human
        # instruction"; do the same so that sampling matches `SanaPipeline.__call__`.
        instruction = None
        if not negative:
            instruction = (
                inspect.signature(self.pipeline.__call__).parameters["complex_human_instruction"].default
            )
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.device,
            complex_human_instruction=instruction,
            **kwargs,
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}, {}

    def _transformer_forward(self, transformer, latents, timesteps, conditioning, guidance_scale):
        dtype = self._transformer_dtype(transformer)
        config = getattr(transformer, "module", transformer).config
        velocity = transformer(
            latents.to(dtype),
            encoder_hidden_states=conditioning["encoder_hidden_states"].to(dtype),
            encoder_attention_mask=conditioning["encoder_attention_mask"],
            timestep=timesteps * config.timestep_scale,
            return_dict=False,
        )[0]
        if config.out_channels // 2 == config.in_channels:  # learned variance: keep the mean
            velocity = velocity.chunk(2, dim=1)[0]
        return velocity

    def _latents_to_vae(self, latents, height, width):
        return latents / self.pipeline.vae.config.scaling_factor
