"""Loading a flow pipeline for training, making its transformer trainable, saving and loading the result.

LoRA adapters are saved in diffusers format (``pytorch_lora_weights.safetensors``, loadable with
``pipe.load_lora_weights``); a fully fine-tuned transformer is saved as ``transformer/`` in
``save_pretrained`` layout. Everything is safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "LORA_WEIGHTS_NAME",
    "TRANSFORMER_DIR",
    "fused_lora",
    "load_flow_pipeline",
    "load_transformer_weights",
    "prepare_transformer",
    "save_transformer_weights",
]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"


def load_flow_pipeline(
    model: str | os.PathLike | DiffusionPipeline, init_kwargs: dict[str, Any] | None = None
):
    """A diffusers pipeline from a hub id or a local directory (safetensors weights only), or ``model`` itself.

    Args:
        model: a ``DiffusionPipeline``, a hub id or a local path.
        init_kwargs: ``from_pretrained`` keyword arguments; ``torch_dtype`` / ``dtype`` may be a name
            (``"bfloat16"``); the default dtype is float32.
    """
    if isinstance(model, DiffusionPipeline):
        return model
    if not isinstance(model, str | os.PathLike):
        raise TypeError(
            f"`model` must be a DiffusionPipeline, a hub id or a local path, got {type(model).__name__}."
        )
    kwargs = dict(init_kwargs or {})
    dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", False)
    # Components saved as absent (e.g. SD3 without T5: `[null, null]` in model_index.json) must be passed as
    # None explicitly, or diffusers refuses to load the pipeline.
    index = DiffusionPipeline.load_config(str(model))
    for name, entry in index.items():
        if isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is None and name not in kwargs:
            kwargs[name] = None
    return DiffusionPipeline.from_pretrained(
        str(model),
        dtype=dtype if dtype not in (None, "auto") else torch.float32,
        use_safetensors=True,
        **kwargs,
    )


def prepare_transformer(
    pipeline: DiffusionPipeline,
    peft_config: Any | None,
    default_lora_targets: tuple[str, ...],
    *,
    activation_checkpointing: bool = False,
    frozen_copy: bool = False,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Freeze every component of ``pipeline``, then make LoRA adapters (or the whole transformer) trainable.

    Args:
        peft_config: a ``peft.LoraConfig`` (its ``target_modules`` default to ``default_lora_targets``;
            trainable weights are kept in fp32 whatever the base dtype), or ``None`` to train every weight.
        activation_checkpointing: enable the transformer's gradient checkpointing.
        frozen_copy: with full fine-tuning, also return a frozen copy of the initial transformer (the
            reference of a KL term); with LoRA the reference is the transformer with its adapters disabled.

    Returns:
        ``(transformer, frozen_reference_or_None)``.
    """
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    transformer = pipeline.transformer
    reference = None
    if peft_config is not None:
        peft_config = copy.deepcopy(peft_config)
        if not peft_config.target_modules:
            peft_config.target_modules = list(default_lora_targets)
        if getattr(peft_config, "lora_dropout", 0.0) > 0:
            logger.warning(
                f"LoRA dropout {peft_config.lora_dropout} makes the trained policy differ from the one that sampled "
                "the rollouts (rollouts are sampled without dropout), so importance ratios are not 1 on-policy and "
                "updates get clipped; set `lora_dropout=0` (TRL's ModelConfig defaults to 0.05)."
            )
        transformer.add_adapter(peft_config)
        for param in transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    else:
        transformer.requires_grad_(True)
        if frozen_copy:
            reference = copy.deepcopy(transformer).requires_grad_(False).eval()
    if activation_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer, reference


def _is_sharded(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a shard or placeholder of a parameter an engine gathers itself (DeepSpeed ZeRO-3,
    FSDP2's DTensor): such a ``.data`` is not the weight the forward uses."""
    from torch.distributed.tensor import DTensor

    return hasattr(weight, "ds_id") or isinstance(weight, DTensor) or isinstance(weight.data, DTensor)


def _fusable_lora_layers(module: torch.nn.Module) -> list[Any] | None:
    """The LoRA ``Linear`` layers of ``module`` with an active adapter, or ``None`` when a forward with their
    deltas folded into the base weights would not compute what the adapters compute: LoRA variants (DoRA, aLoRA,
    …), a LoRA bias, other layer types, active dropout, adapters disabled or already merged, or weights that an
    engine shards (ZeRO-3, FSDP)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    layers = []
    for layer in (m for m in module.modules() if isinstance(m, LoraLayer)):
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:  # no adapter of this layer is active: it already runs the base weight
            continue
        dropout = [layer.lora_dropout[a] for a in active]
        weight = layer.get_base_layer().weight
        if (
            not isinstance(layer, Linear)
            or layer.merged
            or layer.disable_adapters
            or any(a in layer.lora_variant or layer.use_dora.get(a, False) for a in active)
            or any(layer.lora_bias.get(a, False) for a in active)
            or (layer.training and any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in dropout))
            or _is_sharded(weight)
            or any(_is_sharded(layer.lora_A[a].weight) or _is_sharded(layer.lora_B[a].weight) for a in active)
        ):
            return None
        layers.append(layer)
    return layers


@contextlib.contextmanager
def fused_lora(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run no-grad forwards of ``module`` with its LoRA adapters fused into its weights.

    Inside the block, each LoRA ``Linear`` computes ``(W + ΔW) x`` with one matmul instead of
    ``W x + s·B(A x)``: the cost of a forward of the base model, and the same outputs up to float rounding.
    ``W + ΔW`` (``ΔW = s·B A``, summed over the active adapters) is a temporary copy of each targeted weight
    (memory: one copy of the targeted weights), and the original weight tensors are put back on exit, bit for
    bit, with every adapter parameter's ``requires_grad`` as it was; fusing in place and unfusing (``peft``'s
    ``merge_adapter``) would let rounding drift the frozen base weights over a run.

    Does nothing (the adapters run as usual) when gradients are enabled, when ``module`` has no LoRA layer,
    or when fusing would change the numbers beyond rounding (LoRA variants such as DoRA, a LoRA bias, LoRA
    dropout in training mode, adapters already disabled or merged, layer types other than ``Linear``) or
    would not reach the weights the forward uses (DeepSpeed ZeRO-3 or FSDP shards).
    """
    layers = None if torch.is_grad_enabled() else _fusable_lora_layers(module)
    if not layers:
        yield module
        return
    flags = [(p, p.requires_grad) for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
    fused = []
    try:
        for layer in layers:
            weight = layer.get_base_layer().weight
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            fused.append((layer, weight, weight.data))
            weight.data = weight.data + delta.to(weight.dtype)
            layer.enable_adapters(False)
        yield module
    finally:
        # In reverse order, so that a weight shared by two layers ends as it began.
        for layer, weight, data in reversed(fused):
            weight.data = data
            layer.enable_adapters(True)
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def save_transformer_weights(
    pipeline: DiffusionPipeline,
    transformer: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    use_lora: bool,
) -> None:
    """Write the LoRA of ``transformer`` in diffusers format, or the whole transformer under ``transformer/``."""
    os.makedirs(output_dir, exist_ok=True)
    if use_lora:
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
        type(pipeline).save_lora_weights(
            output_dir,
            transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
    else:
        transformer.save_pretrained(os.path.join(output_dir, TRANSFORMER_DIR), safe_serialization=True)


def load_transformer_weights(
    transformer: torch.nn.Module, directory: str | os.PathLike, *, use_lora: bool
) -> None:
    """Load into ``transformer`` what :func:`save_transformer_weights` wrote to ``directory``."""
    from safetensors.torch import load_file

    if use_lora:
        from peft.utils import set_peft_model_state_dict

        path = os.path.join(directory, LORA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"No {LORA_WEIGHTS_NAME} in checkpoint {directory}; cannot resume.")
        prefix = "transformer."
        state = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(transformer, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"Checkpoint {path} has unexpected LoRA keys: {result.unexpected_keys[:5]}")
    else:
        loaded = type(transformer).from_pretrained(
            os.path.join(directory, TRANSFORMER_DIR), torch_dtype=transformer.dtype
        )
        transformer.load_state_dict(loaded.state_dict())
