"""How much memory a training run holds: an estimate printed at start-up, and the tensors to check it against.

The estimate covers what stays resident for the whole run, per process:

- **weights**: every parameter and buffer of the model's modules (frozen parts, LoRA adapters included);
- **gradients**: one tensor per trainable parameter, in its dtype;
- **optimizer state**: AdamW's two moments per trainable element (other optimizers: see
  :func:`optimizer_state_factor`);
- **copies**: a frozen reference transformer (full fine-tuning with a KL term) or DiffusionNFT's old policy;
- **rollout buffer**: the tensors one generation batch keeps between sampling and training (latents,
  log-probabilities, advantages, prompt embeddings).

Activations are not included: they depend on the model's implementation and on activation checkpointing,
and the flow trainers back-propagate one timestep at a time, so they are those of one forward and backward
of a ``per_device_train_batch_size`` micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = [
    "MemoryEstimate",
    "optimizer_state_factor",
    "tensor_bytes",
    "unique_tensors",
]

# Optimizer state, in multiples of the trainable parameters' bytes.
_OPTIMIZER_STATE = {
    "adamw": 2.0,
    "adam": 2.0,
    "sgd": 1.0,  # momentum (0 without; counted conservatively)
    "adafactor": 0.05,  # factored second moments: a row and a column per matrix
    "lion": 1.0,
    "rmsprop": 1.0,
    "adagrad": 1.0,
}


def optimizer_state_factor(optim: str) -> float:
    """Bytes of optimizer state per byte of trainable parameters for a ``transformers`` ``optim`` name.

    ``"adamw_torch"``, ``"adamw_torch_fused"`` … keep two moments (2.0); 8-bit variants a quarter of that per
    moment; unknown names are counted as AdamW.
    """
    name = str(getattr(optim, "value", optim)).lower()
    factor = next((v for k, v in _OPTIMIZER_STATE.items() if name.startswith(k)), 2.0)
    return factor / 4 if "8bit" in name else factor


def unique_tensors(objects: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Every tensor reachable through modules, mappings, sequences and dataclasses, each storage once."""
    seen: set[int] = set()
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.nn.Module):
            stack.extend(obj.parameters())
            stack.extend(obj.buffers())
        elif isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                continue
            key = obj.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                yield obj
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set):
            stack.extend(obj)
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(getattr(obj, f.name) for f in fields(obj))


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``objects`` (see :func:`unique_tensors`)."""
    return sum(t.untyped_storage().nbytes() for t in unique_tensors(objects))


@dataclass(frozen=True)
class MemoryEstimate:
    """Resident memory of a training run, in bytes per process (see the module docstring)."""

    weights: int
    trainable: int
    gradients: int
    optimizer_state: int
    copies: int
    rollout_buffer: int

    @property
    def total(self) -> int:
        """Everything but the activations (``trainable`` is part of ``weights``)."""
        return self.weights + self.gradients + self.optimizer_state + self.copies + self.rollout_buffer

    def format(self) -> str:
        """A small table, sizes in MiB."""
        rows = [
            ("weights", self.weights, "all modules, frozen and trainable"),
            ("  of which trainable", self.trainable, ""),
            ("gradients", self.gradients, ""),
            ("optimizer state", self.optimizer_state, ""),
            ("copies", self.copies, "frozen reference / old policy"),
            ("rollout buffer", self.rollout_buffer, "one generation batch"),
            ("total", self.total, "without activations"),
        ]
        lines = ["Memory estimate per process (MiB):"]
        lines += [f"  {name:<21}{size / 2**20:>10.1f}  {note}".rstrip() for name, size, note in rows]
        return "\n".join(lines)
