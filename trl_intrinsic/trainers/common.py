"""What every trainer of the package shares; trainers never import each other, only this module.

- :class:`EpochRepeatSampler`: TRL's prompt sampler, positioned at any epoch (exact resume);
- complete-checkpoint discovery (:func:`last_complete_checkpoint`, :func:`resolve_resume_checkpoint`);
- the rollout buffer: rollouts sampled but not yet trained on, saved in a checkpoint by each process
  (:func:`save_rollout_buffer`) and restored with strict checks (:func:`load_rollout_buffer`);
- extra trainer state saved beside ``Trainer``'s (:func:`save_extra_state`, :func:`load_extra_state`);
- the training arguments as ``training_args.json`` (:func:`write_training_args`);
- reward value checks (:func:`check_reward_values`, :func:`reward_call_error`);
- model cards from the templates shipped in ``trl_intrinsic/templates`` (:func:`render_model_card`);
- :func:`image_grid` for sample logging.

Random streams are derived with :func:`trl_intrinsic.seeding.derived_generator`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import math
import os
import string
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

import torch
from accelerate.utils import send_to_device
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOConfig
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from trl_intrinsic.ema import ParameterCopy, warmup_ema_decay
from trl_intrinsic.memory import MemoryEstimate, optimizer_state_factor, tensor_bytes
from trl_intrinsic.seeding import derived_generator
from trl_intrinsic.validation import Range, check_choice, check_ranges

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
"""Written last by ``Trainer._save_checkpoint``: its presence marks a complete checkpoint."""
ROLLOUT_BUFFER_NAME = "rollout_buffer_{rank}.safetensors"
EXTRA_STATE_NAME = "trl_intrinsic_state.json"
EMA_NAME = "ema.safetensors"
TRAINING_ARGS_NAME = "training_args.json"

# Metadata a rollout buffer must agree on with the run that resumes it.
BUFFER_CHECKS = ("num_processes", "steps_per_generation", "num_iterations", "step")


# ---------------------------------------------------------------------------------------------- sampling
class EpochRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` that can be positioned at any epoch.

    ``RepeatSampler`` draws each epoch's permutation from one generator that advances epoch after epoch, so a
    run resumed in epoch ``e`` would replay epoch 0's order. ``Trainer`` calls :meth:`set_epoch` at the start
    of every epoch (through accelerate's data loader); it reseeds the generator and skips the permutations of
    the earlier epochs, so the order is TRL's, with or without a resume.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            for _ in range(epoch):
                torch.randperm(self.num_samples, generator=self.generator)


def repeat_sampler(trainer: Any, dataset: Any) -> EpochRepeatSampler:
    """The training sampler of a GRPO-style trainer: each prompt ``num_generations`` times in a row, each
    generation batch reused ``num_iterations × steps_per_generation`` times, TRL's order."""
    args = trainer.args
    return EpochRepeatSampler(
        data_source=dataset,
        mini_repeat_count=trainer.num_generations,
        batch_size=args.generation_batch_size // trainer.num_generations,
        repeat_count=trainer.num_iterations * args.steps_per_generation,
        shuffle=trainer.shuffle_dataset,
        seed=args.seed,
    )


# ---------------------------------------------------------------------------------------------- checkpoints
def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a finished ``Trainer`` checkpoint: its trainer state, written last, parses."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-<step>`` of ``output_dir`` with the highest step, or ``None``."""
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit():
            steps[int(step)] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return steps[step]
        logger.warning(f"Skipping incomplete checkpoint {steps[step]} (its save was interrupted).")
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` should load: ``True`` means the newest
    complete checkpoint of ``output_dir``; a path must hold a complete checkpoint; falsy means none."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_complete_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(
                f"`resume_from_checkpoint=True` but {output_dir} has no complete checkpoint; pass a checkpoint path "
                "or start without resuming."
            )
    if not resume_from_checkpoint:
        return None
    if not is_complete_checkpoint(resume_from_checkpoint):
        raise ValueError(
            f"Checkpoint {resume_from_checkpoint} is incomplete (no readable {TRAINER_STATE_NAME}: the save was "
            "interrupted); resume from an earlier checkpoint or pass `resume_from_checkpoint=True`."
        )
    return str(resume_from_checkpoint)


def checkpoint_folder(trainer: Any, trial: Any = None) -> str:
    """The folder ``Trainer._save_checkpoint`` writes for the current global step."""
    return os.path.join(
        trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    )


# ---------------------------------------------------------------------------------------------- rollout buffer
def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor], extras: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous().clone()
    elif isinstance(value, Mapping):
        extras[prefix] = {}  # marks a (possibly empty) mapping
        for key, item in value.items():
            if "/" in str(key):
                raise ValueError(f"Rollout buffer keys must not contain '/': {key!r} in {prefix!r}.")
            _flatten(f"{prefix}/{key}", item, tensors, extras)
    else:
        extras[prefix] = value


def _insert(root: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    node = root
    for part in parents:
        node = node.setdefault(part, {})
    if isinstance(value, dict) and leaf in node:  # a mapping marker met after its entries
        return
    node[leaf] = value


def save_rollout_buffer(
    folder: str | os.PathLike, chunks: Sequence[Mapping[str, Any]], *, rank: int, metadata: Mapping[str, int]
) -> None:
    """Write one process's unconsumed micro-batches to ``folder/rollout_buffer_<rank>.safetensors``.

    Args:
        chunks: the micro-batches; each a mapping of names to tensors, nested mappings of them, or
            JSON-serialisable values (lists of ints, strings, None).
        metadata: integers the resuming run must reproduce (see :data:`BUFFER_CHECKS`).
    """
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, Any] = {}
    for i, chunk in enumerate(chunks):
        _flatten(str(i), dict(chunk), tensors, extras)
    try:
        encoded = json.dumps(extras)
    except TypeError as err:
        raise ValueError(
            f"The buffered rollouts hold entries that cannot be checkpointed: {err}. Save checkpoints at "
            "multiples of steps_per_generation × num_iterations micro-steps."
        ) from err
    os.makedirs(folder, exist_ok=True)
    header = {key: str(int(value)) for key, value in metadata.items()}
    header.update(num_chunks=str(len(chunks)), extras=encoded)
    save_file(tensors, os.path.join(folder, ROLLOUT_BUFFER_NAME.format(rank=rank)), metadata=header)


def load_rollout_buffer(
    checkpoint: str | os.PathLike,
    *,
    rank: int,
    expected: Mapping[str, int],
    generate_every: int,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]] | None:
    """Read the micro-batches :func:`save_rollout_buffer` wrote for process ``rank``.

    Returns ``None`` when the checkpoint sits at a generation boundary (``expected["step"]`` a multiple of
    ``generate_every``) and holds no buffer: the next micro-step samples afresh, as the uninterrupted run
    does. Raises ``ValueError`` naming the setting to restore when the buffer is missing between two
    generations or was saved with other values of ``expected``'s keys.
    """
    name = ROLLOUT_BUFFER_NAME.format(rank=rank)
    path = os.path.join(checkpoint, name)
    if not os.path.isfile(path):
        if expected["step"] % generate_every == 0:
            return None
        raise ValueError(
            f"Checkpoint {checkpoint} falls between two generations but has no {name} with the rollouts this "
            "process had not trained on yet (saved by another number of processes, with other "
            "steps_per_generation / num_iterations / gradient_accumulation_steps?). Resume with the launch setup "
            "and batch settings of the run that saved it, or from a checkpoint at a multiple of "
            f"steps_per_generation × num_iterations = {generate_every} micro-steps."
        )
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    for key, value in expected.items():
        saved = int(metadata.get(key, -1))
        if saved == int(value):
            continue
        if key == "step":
            raise ValueError(
                f"Checkpoint {checkpoint} was saved at micro-step {saved}, but its global step × "
                f"gradient_accumulation_steps gives {value}; resume with the gradient_accumulation_steps of the run "
                "that saved it."
            )
        raise ValueError(
            f"Checkpoint {checkpoint} was saved between two generations with {key}={saved}; resume it with "
            f"{key}={saved} (now {value}), or from a checkpoint at a generation boundary."
        )
    root: dict[str, Any] = {}
    for key, value in json.loads(metadata.get("extras", "{}")).items():
        _insert(root, key, value)
    for key, value in load_file(path).items():
        _insert(root, key, value.to(device))
    return [root[str(i)] for i in range(int(metadata.get("num_chunks", len(root))))]


# ---------------------------------------------------------------------------------------------- extra state
def save_extra_state(folder: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write the trainer state ``Trainer`` does not know about (JSON) into a checkpoint folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, EXTRA_STATE_NAME), "w") as f:
        json.dump(dict(state), f)


def load_extra_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`save_extra_state` wrote, or ``{}`` for a checkpoint without it."""
    path = os.path.join(checkpoint, EXTRA_STATE_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_training_args(output_dir: str | os.PathLike, args: Any) -> None:
    """Save the training arguments as readable JSON (``training_args.json``) rather than ``Trainer``'s pickle."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w") as f:
        f.write(args.to_json_string())


# ---------------------------------------------------------------------------------------------- rewards
def reward_call_error(
    name: str, error: Exception, step: int, num_samples: int, first_prompt: str
) -> RuntimeError:
    """The error raised when reward function ``name`` fails: names it, the step and the batch."""
    return RuntimeError(
        f"Reward function '{name}' raised {type(error).__name__} at global step {step} on a batch of "
        f"{num_samples} samples (first prompt: {first_prompt!r})."
    )


def check_reward_values(
    name: str, values: Any, num_samples: int, step: int, prompts: Sequence[Any] | None = None
) -> list[float]:
    """Validate what reward function ``name`` returned for ``num_samples`` samples.

    Returns one float per sample, NaN where the reward returned ``None`` (it does not apply to that sample).
    Raises ``ValueError`` for a wrong number of values or an infinite one, naming the function, the step and
    the prompt.
    """
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    values = list(values)
    if len(values) != num_samples:
        raise ValueError(
            f"Reward function '{name}' returned {len(values)} rewards for a batch of {num_samples} samples at global "
            f"step {step}; return exactly one value (or None) per sample."
        )
    floats = [math.nan if v is None else float(v) for v in values]
    for i, value in enumerate(floats):
        if math.isinf(value):
            where = f" (prompt {prompts[i]!r})" if prompts is not None else ""
            raise ValueError(
                f"Reward function '{name}' returned an infinite reward at global step {step}{where}; return None to "
                "skip a sample."
            )
    return floats


# ---------------------------------------------------------------------------------------------- model cards
def render_model_card(template: str, **fields: Any) -> str:
    """Fill ``trl_intrinsic/templates/<template>`` (``string.Template`` syntax: ``$name``)."""
    text = resources.files("trl_intrinsic").joinpath("templates", template).read_text(encoding="utf-8")
    return string.Template(text).substitute({key: str(value) for key, value in fields.items()})


def front_matter(entries: Mapping[str, Any]) -> str:
    """YAML front matter lines (JSON values are valid YAML) for the entries that are not ``None``."""
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in entries.items() if value is not None)


# ---------------------------------------------------------------------------------------------- images
def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row, ``columns`` per row."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


# ---------------------------------------------------------------------------------------------- flow configs
@dataclass
class FlowTrainingConfig(GRPOConfig):
    r"""
    The knobs every flow trainer shares: TRL's [`~trl.GRPOConfig`] plus sampling and saving of diffusers
    flow pipelines. [`FlowGRPOConfig`] and [`DiffusionNFTConfig`] add their algorithm's knobs.

    Shared knobs keep their TRL names and meanings: `num_generations` (G images per prompt),
    `per_device_train_batch_size` (images per micro-batch — sampling and training micro-batches have this
    same size), `steps_per_generation`, `num_iterations`, `beta` (KL to the base model), `scale_rewards`
    (`"group"`, `"batch"` or `"none"`), `reward_weights`, `multi_objective_aggregation`, `log_completions`,
    `model_init_kwargs`. Text-generation knobs of `GRPOConfig` (`max_completion_length`, `temperature`,
    vLLM, …) are ignored. LoRA settings come with the `peft_config`; without target modules, the pipeline
    adapter's defaults are used. Activation checkpointing is off by default; the learning rate defaults
    to 3e-4 and `scale_rewards` to `"batch"`.

    Parameters:
        resolution (`int`, *optional*, defaults to `512`):
            Side of the generated square images, in pixels.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            Sampler steps of training rollouts.
        eval_num_inference_steps (`int`, *optional*, defaults to `40`):
            Sampler steps of evaluation samples (deterministic, `noise_level=0`).
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            Classifier-free guidance weight of rollouts (`≤ 1` trains without guidance; for guidance-distilled
            models such as FLUX.1-dev it is the guidance embedding).
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional branch of classifier-free guidance.
        max_sequence_length (`int` or `None`, *optional*):
            Token budget of the long text encoder (T5 / Gemma); the pipeline's default when `None`.
        same_latent (`bool`, *optional*, defaults to `False`):
            Start the `num_generations` images of a prompt from the same initial noise (Flow-GRPO's
            `sample.same_latent`). The images of a group then differ only through the stochastic steps the
            policy takes, so the group baseline removes the reward variance that comes from the initial
            noise, which no update can change.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `±adv_clip_max`.
        save_full_pipeline (`bool`, *optional*, defaults to `False`):
            When fine-tuning without LoRA, also save the whole pipeline at the end of training.
        collapse_warning_ratio (`float`, *optional*, defaults to `0.5`):
            Warn when the texture of the final latents (`collapse/texture_ratio`, see
            `trl_intrinsic.flow.diagnostics`) falls below this fraction of its value at the first
            training step, or when more than half of the decoded images are blank: the signs of
            SOLACE's known collapse to textureless images. `0` disables the warning; the statistics
            are logged either way.
        collapse_action (`str`, *optional*, defaults to `"warn"`):
            What a collapse (as above) does: `"warn"` once, or `"stop"` training at that step without
            checkpointing it, so that the last checkpoint holds the model from before the collapse.
        ema (`bool`, *optional*, defaults to `False`):
            Keep an exponential moving average of the trainable weights, as Flow-GRPO's reference does
            (`train.ema`), and use it for `evaluate()` and `save_model()` (checkpoints keep the raw weights
            for an exact resume, plus the average in `ema.safetensors`). After optimizer step `s`, every
            `ema_update_interval` steps: `ema ← d·ema + (1 − d)·θ` with `d = min((1 + s)/(10 + s), ema_decay)`.
            Costs one copy of the trainable weights.
        ema_decay (`float`, *optional*, defaults to `0.9`):
            Largest EMA decay (the reference's 0.9 with an interval of 8 averages over about 80 steps).
        ema_update_interval (`int`, *optional*, defaults to `8`):
            Optimizer steps between two EMA updates.
        drop_zero_advantage (`bool`, *optional*, defaults to `False`):
            Train only on the samples whose advantage is not zero (groups whose rewards all agree carry no
            policy gradient), as Flow-GRPO's reference does: the kept samples are split into the
            `steps_per_generation` micro-batches, which shrink accordingly, and random dropped samples are put
            back so that every micro-batch has the same size. Saves the training compute of those samples;
            each kept sample weighs more in the micro-batch mean, and dropped samples add no KL term.
            `kept_fraction` is logged.
        offload_rollout_buffer (`bool`, *optional*, defaults to `False`):
            Keep the generation batch's tensors (latents, log-probabilities, prompt embeddings, …) in CPU memory
            between sampling and training, and move each micro-batch to the accelerator when it is trained on.
            Frees `trainer.memory_estimate().rollout_buffer` bytes of accelerator memory for one host-to-device
            copy per micro-batch; the numbers are unchanged. No effect when training on the CPU.
        fuse_lora_for_sampling (`bool`, *optional*, defaults to `True`):
            Run the policy's no-grad forwards (rollout sampling, and the `velocity_fn` of rewards such as
            SOLACE) with each LoRA fused into a temporary copy of its weight
            (:func:`~trl_intrinsic.flow.weights.fused_lora`): one matmul per layer instead of three, the same
            outputs up to float rounding, and memory for one copy of the LoRA-targeted weights while sampling.
            No effect without LoRA or with LoRA dropout in training mode; training forwards are unchanged.
        torch_compile (`bool`, *optional*, defaults to `False`):
            `transformers`' knob, with a wider reach here: the transformer is compiled in place
            (`torch.nn.Module.compile`, with `torch_compile_backend` and `torch_compile_mode`), so rollouts,
            reference forwards and reward probes (`velocity_fn`) run compiled as well as the training forward,
            which is all `transformers.Trainer` would compile. The same numbers up to float rounding. The first
            calls of each kind (training, no-grad, adapters off, a new batch shape) pay the compilation: tens of
            seconds to minutes, less with a warm inductor cache. Worth it for long runs; the speed-up on a CPU is
            measured in `docs/benchmarks.md`. Tested in one process and under DDP, not under DeepSpeed or FSDP.
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "The initial learning rate for AdamW."})
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "Reward scaling: 'group', 'batch' (Flow-GRPO's default) or 'none'."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute the transformer's activations in the backward pass."}
    )

    resolution: int = field(default=512, metadata={"help": "Side of the generated square images, in pixels."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampler steps of training rollouts."})
    eval_num_inference_steps: int = field(
        default=40, metadata={"help": "Sampler steps of evaluation samples."}
    )
    guidance_scale: float = field(
        default=4.5, metadata={"help": "Classifier-free guidance weight of rollouts."}
    )
    negative_prompt: str = field(default="", metadata={"help": "Prompt of the unconditional branch."})
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Token budget of the long text encoder; pipeline default when None."}
    )
    same_latent: bool = field(
        default=False, metadata={"help": "The images of a prompt group start from the same initial noise."}
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to ±adv_clip_max."})
    save_full_pipeline: bool = field(
        default=False, metadata={"help": "Without LoRA, also save the whole pipeline at the end."}
    )
    collapse_action: str = field(
        default="warn",
        metadata={"help": "On a collapse (see collapse_warning_ratio): 'warn', or 'stop' training."},
    )
    collapse_warning_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Warn when latent texture falls below this fraction of its first value; 0 disables."
        },
    )
    ema: bool = field(
        default=False, metadata={"help": "Evaluate and save an EMA of the trainable weights (Flow-GRPO's train.ema)."}
    )
    ema_decay: float = field(default=0.9, metadata={"help": "Largest EMA decay."})
    ema_update_interval: int = field(default=8, metadata={"help": "Optimizer steps between EMA updates."})
    drop_zero_advantage: bool = field(
        default=False, metadata={"help": "Train only on samples with a non-zero advantage (Flow-GRPO's filter)."}
    )
    offload_rollout_buffer: bool = field(
        default=False,
        metadata={"help": "Keep the generation batch in CPU memory between sampling and training."},
    )
    fuse_lora_for_sampling: bool = field(
        default=True,
        metadata={"help": "Fuse the LoRA into the weights for no-grad policy forwards (rollouts, probes)."},
    )

    def _field_rules(self) -> list[Range]:
        """The numeric fields' valid ranges (a subclass adds its own)."""
        return list(FLOW_FIELD_RULES)

    def __post_init__(self):
        # Checked before GRPOConfig's own validation, so that every message names the field and the fix.
        check_ranges(self, self._field_rules())
        for i, weight in enumerate(self.reward_weights or []):
            if not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"`reward_weights[{i}]` must be a finite number, got {weight!r}.")
        check_generation_batch(self)
        super().__post_init__()
        check_choice("collapse_action", self.collapse_action, ("warn", "stop"))
        if self.resolution % 8:
            raise ValueError(
                f"`resolution` must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}."
            )


def check_generation_batch(config: Any) -> None:
    """Refuse a generation batch that would split a prompt group, naming the fields to change (TRL's own
    check runs later and names no fix). The number of processes is read from ``WORLD_SIZE`` (set by
    ``accelerate launch`` and ``torchrun``)."""
    if getattr(config, "generation_batch_size", None) is not None:
        return
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    steps = config.steps_per_generation or config.gradient_accumulation_steps
    images = config.per_device_train_batch_size * processes * steps
    if images % config.num_generations:
        raise ValueError(
            f"A generation batch holds per_device_train_batch_size={config.per_device_train_batch_size} × "
            f"{processes} processes × steps_per_generation={steps} = {images} samples, which is not a multiple of "
            f"num_generations={config.num_generations}: a prompt group would be split. Change "
            "`per_device_train_batch_size`, `steps_per_generation` (or `gradient_accumulation_steps`) or "
            "`num_generations` so that the product is a multiple of num_generations."
        )


GRPO_FIELD_RULES = (
    Range("num_generations", 2, integer=True, fix="GRPO compares the images of a prompt group, at least 2."),
    Range("num_iterations", 1, integer=True),
    Range("per_device_train_batch_size", 1, integer=True),
    Range("per_device_eval_batch_size", 1, integer=True),
    Range("gradient_accumulation_steps", 1, integer=True),
    Range("steps_per_generation", 1, integer=True, optional=True),
    Range("learning_rate", 0),
    Range("weight_decay", 0),
    Range("max_grad_norm", 0, optional=True, fix="0 disables gradient clipping."),
    Range("beta", 0, fix="it weights the KL term to the base model; 0 disables it."),
)
"""Ranges of the inherited ``GRPOConfig`` fields the package's trainers use."""

FLOW_FIELD_RULES = (
    *GRPO_FIELD_RULES,
    Range("resolution", 0, low_open=True, integer=True),
    Range("num_inference_steps", 2, integer=True),
    Range("eval_num_inference_steps", 2, integer=True),
    Range("guidance_scale", 0, fix="1 (or less) samples without classifier-free guidance."),
    Range("max_sequence_length", 1, integer=True, optional=True),
    Range("adv_clip_max", 0, low_open=True, fix="the references use 5."),
    Range("collapse_warning_ratio", 0, 1, high_open=True, fix="0 disables the warning."),
    Range("ema_decay", 0, 1, high_open=True, fix="Flow-GRPO's reference uses 0.9."),
    Range("ema_update_interval", 1, integer=True, fix="Flow-GRPO's reference updates every 8 steps."),
)


# ---------------------------------------------------------------------------------------------- flow trainers
# What the trainers of diffusers flow pipelines (Flow-GRPO, DiffusionNFT) share: the pipeline and its trainable
# transformer, the flow reward contract, the generation buffer, logging, saving, resume and the model card.
# diffusers is imported by `trl_intrinsic.flow`, only when a flow trainer is built.


class FlowTrainerBase(_BaseTrainer):
    """Machinery shared by the trainers of diffusers flow-matching pipelines; a subclass adds its algorithm.

    A subclass implements :meth:`_generate_and_score` (sample a generation batch, score it, return the
    per-image tensors named in ``per_row_keys`` plus shared entries) and the training step, and sets
    ``config_class``, ``_name``, ``_paper``, ``_tag_names`` and ``_method_summary``. The generation batch is
    sampled every ``steps_per_generation × num_iterations`` micro-steps, split into
    ``per_device_train_batch_size`` micro-batches and, at checkpoints, saved for an exact resume.
    """

    config_class: ClassVar[type] = object
    per_row_keys: ClassVar[tuple[str, ...]] = ()
    _name = ""
    _method_summary = ""
    _paper: ClassVar[dict[str, str]] = {}
    _tag_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: Any | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
    ):
        from trl_intrinsic.flow.pipelines import get_flow_adapter
        from trl_intrinsic.flow.weights import load_flow_pipeline, prepare_transformer

        # 1. Check every input before loading anything.
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = self.config_class(f"{str(name).split('/')[-1]}-{self._name}")
        if not isinstance(args, self.config_class):
            raise TypeError(f"`args` must be a {self.config_class.__name__}, got {type(args).__name__}.")
        self.reward_funcs, self.reward_func_names = resolve_flow_rewards(reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(args.reward_weights)} entries but there are {len(self.reward_funcs)} "
                "reward functions; give one weight per reward."
            )
        check_prompt_datasets(args, train_dataset, eval_dataset)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.requires_images = any(getattr(f, "requires_images", True) for f in self.reward_funcs)

        # 2. The pipeline, frozen, with LoRA adapters (or the whole transformer) trainable. LoRA matrices are
        # initialised randomly: seed first so that a run is reproducible from `args.seed`.
        self.pipeline = load_flow_pipeline(model, args.model_init_kwargs)
        self.adapter = get_flow_adapter(self.pipeline)
        set_seed(args.seed)
        self.use_lora = peft_config is not None
        transformer, self.ref_transformer = prepare_transformer(
            self.pipeline,
            peft_config,
            self.adapter.lora_target_modules,
            activation_checkpointing=args.activation_checkpointing,
            frozen_copy=self._needs_frozen_reference(args),
        )
        # diffusers models have their own checkpointing switch; Trainer's would look for a transformers method.
        args.activation_checkpointing = args.gradient_checkpointing = False
        self.num_generations = args.num_generations
        self.num_iterations = args.num_iterations
        self.shuffle_dataset = args.shuffle_dataset

        # 3. transformers.Trainer around the transformer.
        super().__init__(
            model=transformer,
            args=args,
            data_collator=lambda features: features,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False
        self.pipeline.to(self.accelerator.device)
        if self.ref_transformer is not None:
            self.ref_transformer.to(self.accelerator.device)
        self._step = 0  # micro-steps taken; a resume restores it
        self._eval_batches = 0  # batches sampled by the current `evaluate()` call
        self._buffered_inputs: list[dict] | None = None
        self._resume_checkpoint: str | None = None
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logged_samples: dict[str, list] = {"prompt": [], "image": [], "reward": []}
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._collapse_reference: float | None = None  # latent texture of the first training rollout
        self._collapse_warned = False
        self._collapse_stop = False  # set by the collapse statistics with `collapse_action="stop"`
        self.add_callback(_StopOnCollapse(self))
        self._trainable = [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        self._ema = self._init_ema() if args.ema else None
        self._compile_transformers()

    def _compile_transformers(self) -> None:
        """With `torch_compile`, compile the transformer (and a frozen copy) in place, so that every call of it
        runs compiled (rollouts, reference forwards, reward probes), not only the training forward."""
        if not self.args.torch_compile:
            return
        for module in (self.accelerator.unwrap_model(self.model), self.ref_transformer):
            if module is not None:
                module.compile(backend=self.args.torch_compile_backend, mode=self.args.torch_compile_mode)

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        # With `torch_compile`, the transformer is compiled in place after the Trainer is built; accelerate's
        # wrapper would only compile the training forward, and compile the module a second time.
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.torch_compile and "dynamo_plugin" in accelerator_args:
            from accelerate.utils import TorchDynamoPlugin

            accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return accelerator_args

    def _needs_frozen_reference(self, args: Any) -> bool:
        """Whether full fine-tuning keeps a frozen copy of the initial transformer (for a KL term)."""
        return args.beta > 0

    def _send_telemetry(self):
        # TRL's telemetry reads `model.config.model_type`, which diffusers models do not have.
        return

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    # ------------------------------------------------------------------ data and the generation buffer
    def get_train_dataloader(self):
        # The dataloader yields whole generation batches (per_device_train_batch_size × steps_per_generation).
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        return repeat_sampler(self, self.train_dataset if dataset is None else dataset)

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(
            data_source=eval_dataset, mini_repeat_count=self.num_generations, seed=self.args.seed
        )

    @property
    def generate_every(self) -> int:
        """Micro-steps between two generation batches."""
        return self.args.steps_per_generation * self.num_iterations

    def _prepare_inputs(self, generation_batch: list[dict]) -> dict[str, Any]:
        if not self.model.training:
            return self._generate_and_score(generation_batch, mode="eval")
        if self._resume_checkpoint is not None:
            self._restore_from_checkpoint(self._resume_checkpoint)
            self._resume_checkpoint = None
        offload = self.args.offload_rollout_buffer
        if self._step % self.generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score(generation_batch, mode="train")
            if self.args.drop_zero_advantage:
                batch = self._keep_informative(batch)
            batch = send_to_device(batch, "cpu") if offload else batch
            self._buffered_inputs = self._split(batch, self.args.steps_per_generation)
        chunk = self._buffered_inputs[self._step % self.args.steps_per_generation]
        return send_to_device(chunk, self.accelerator.device) if offload else chunk

    def _keep_informative(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The rows of a generation batch with a non-zero advantage, plus random others so that the count is a
        positive multiple of ``steps_per_generation`` (``drop_zero_advantage``)."""
        advantages, chunks = batch["advantages"], self.args.steps_per_generation
        keep = advantages != 0
        kept = int(keep.sum())
        target = max(chunks, math.ceil(kept / chunks) * chunks)
        if target > kept:
            dropped = (~keep).nonzero().flatten()
            order = torch.randperm(len(dropped), generator=self._generator("keep")).to(dropped.device)
            keep[dropped[order[: target - kept]]] = True
        index = keep.nonzero().flatten()
        self._metrics["train"]["kept_fraction"].append(len(index) / len(advantages))
        return {k: (v[index] if k in self.per_row_keys else v) for k, v in batch.items()}

    def _split(self, batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
        size = len(batch[self.per_row_keys[0]]) // num_chunks
        return [
            {k: (v[i * size : (i + 1) * size] if k in self.per_row_keys else v) for k, v in batch.items()}
            for i in range(num_chunks)
        ]

    def _generate_and_score(self, inputs: list[dict], mode: str) -> dict[str, Any]:
        """Sample and score one generation batch (``mode`` "train" or "eval"); the algorithm's own step."""
        raise NotImplementedError(f"{type(self).__name__} must implement `_generate_and_score`, its rollout step.")

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``Trainer.evaluate``. Evaluation samples start from the same noise on every call, whatever the
        training step, so successive evaluations compare models, not noise draws."""
        self._eval_batches = 0
        with self._ema_weights():
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _init_ema(self) -> ParameterCopy:
        """An EMA of the trainable weights for evaluation and saving (Flow-GRPO's ``train.ema``), updated by a
        callback after each optimizer step."""
        self.add_callback(_EMAStep(self))
        return ParameterCopy(self._trainable)

    def _ema_weights(self) -> contextlib.AbstractContextManager:
        """The EMA weights swapped into the model for a block (with ``ema=True``; otherwise nothing changes)."""
        return self._ema.swapped() if self._ema is not None else contextlib.nullcontext()

    def _update_ema(self) -> None:
        """After optimizer step ``s``: blend the weights into the EMA every ``ema_update_interval`` steps."""
        step = self.state.global_step
        if (step + 1) % self.args.ema_update_interval == 0:
            decay = warmup_ema_decay(step, self.args.ema_decay)
            self._ema.blend_(decay)
            self._metrics["train"]["ema/decay"].append(decay)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._prepare_inputs(inputs)  # samples deterministically and records the eval rewards
        return None, None, None

    # ------------------------------------------------------------------ shared steps of a generation batch
    def _generator(self, *key: int | str, step: int | None = None) -> torch.Generator:
        """A generator determined by (seed, ``step`` (default: the global step), *key): identical across resumes."""
        return derived_generator(self.args.seed, self.state.global_step if step is None else step, *key)

    def _encode(self, inputs: list[dict], use_cfg: bool) -> tuple[list[str], torch.Tensor, Any]:
        """Prompts of the batch, the row of each in the unique-prompt table, and the table's embeddings."""
        prompts = [example["prompt"] for example in inputs]
        unique = list(dict.fromkeys(prompts))
        rows = torch.tensor([unique.index(p) for p in prompts], device=self.accelerator.device)
        embeddings = self.adapter.encode_prompts(
            unique,
            negative_prompt=self.args.negative_prompt if use_cfg else None,
            max_sequence_length=self.args.max_sequence_length,
        )
        return prompts, rows, embeddings

    def _decode_if_needed(self, final: torch.Tensor, mode: str, micro: int) -> list | None:
        """PIL images of the final latents when a reward, the evaluation or sample logging needs pixels."""
        args = self.args
        if not (self.requires_images or mode == "eval" or args.log_completions):
            return None
        images = []
        for start in range(0, final.shape[0], micro):
            images += self.adapter.decode(final[start : start + micro], args.resolution, args.resolution)
        return images

    def _sample_rollouts(
        self,
        mode,
        rows,
        embeddings,
        sigmas,
        timesteps,
        window,
        noise_level,
        micro,
        sde_type="flow_sde",
        record_means=False,
        record_uncond=(),
    ) -> list:
        """Trajectories of every row, ``micro`` rows per transformer batch, in eval mode (no dropout).

        One generator per sample, seeded by (seed, step, global position): the noise of a sample does not depend
        on how the batch is split across processes and micro-batches, and resumes reproduce it. Evaluation
        batches are seeded by their place in the evaluation, not by the training step. With ``same_latent`` the
        initial noise comes from a generator per prompt group (groups may span processes).
        """
        from trl_intrinsic.flow.rollout import sample_trajectories

        args = self.args
        offset = self.accelerator.process_index * len(rows)
        if mode == "eval":
            batch_index, self._eval_batches = self._eval_batches, self._eval_batches + 1
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        rollouts = []
        with torch.no_grad(), self._fused_lora(transformer):
            for start in range(0, len(rows), micro):
                chunk = rows[start : start + micro]
                positions = range(offset + start, offset + start + len(chunk))
                if mode == "eval":
                    generator = [self._generator("eval", batch_index, p, step=0) for p in positions]
                else:
                    generator = [self._generator("sample", p) for p in positions]
                if args.same_latent and mode == "train":
                    noise_generator = [self._generator("group", p // self.num_generations) for p in positions]
                else:
                    noise_generator = generator
                noise = self.adapter.prepare_latents(
                    len(chunk), args.resolution, args.resolution, noise_generator
                )
                rollouts.append(
                    sample_trajectories(
                        self.adapter,
                        embeddings,
                        chunk,
                        noise,
                        sigmas,
                        timesteps,
                        sde_steps=window,
                        guidance_scale=args.guidance_scale,
                        noise_level=noise_level,
                        sde_type=sde_type,
                        generator=generator,
                        transformer=transformer,
                        record_means=record_means,
                        record_uncond=record_uncond,
                    )
                )
        transformer.train(was_training)
        return rollouts

    def _fused_lora(self, transformer) -> contextlib.AbstractContextManager:
        """No-grad policy forwards with the LoRA fused into the weights (``fuse_lora_for_sampling``)."""
        from trl_intrinsic.flow.weights import fused_lora

        return fused_lora(transformer) if self.args.fuse_lora_for_sampling else contextlib.nullcontext()

    def _score(
        self,
        mode: str,
        inputs: list[dict],
        prompts: list[str],
        images,
        final,
        embeddings,
        rows,
        sigmas,
        train_sigmas,
    ) -> tuple[torch.Tensor, torch.Tensor, slice]:
        """Call the rewards on the local batch, gather every process's, log the collapse statistics.

        Returns ``(all_rewards (N, R), all_group_ids (N,), local)`` over the gathered batch of N images (NaN
        where a reward does not apply; equal group ids = one prompt group), and the slice of this process's rows.
        """
        from accelerate.utils import gather

        device, n = self.accelerator.device, len(prompts)
        offset = self.accelerator.process_index * n
        group_ids = (torch.arange(n, device=device) + offset) // self.num_generations
        started = time.perf_counter()
        local = self._calculate_rewards(
            inputs, prompts, images, final, embeddings, rows, sigmas, train_sigmas, group_ids
        )
        all_rewards, all_groups = gather(local), gather(group_ids)
        self._metrics[mode]["timing/rewards_s"].append(time.perf_counter() - started)
        self._log_collapse_statistics(mode, final, images, all_groups)
        return all_rewards, all_groups, slice(offset, offset + n)

    def _velocity_fn(self, embeddings: Any, rows: torch.Tensor, reference: bool = False):
        """The flow reward contract's ``velocity_fn`` (current policy) or ``reference_velocity_fn``."""

        @torch.no_grad()
        def velocity_fn(x_t: torch.Tensor, sigma: torch.Tensor, call_rows: torch.Tensor) -> torch.Tensor:
            """Conditional velocity (N, *latent_shape) at ``x_t`` (N, ...), ``sigma`` (N,) ∈ [0, 1]; row i is
            conditioned on the prompt of image ``call_rows[i]`` of the reward call. No guidance, no grad."""
            sigma = torch.as_tensor(sigma, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])
            call_rows = torch.as_tensor(call_rows, device=rows.device, dtype=torch.long)
            policy = self.accelerator.unwrap_model(self.model)
            with self._reference_model() if reference else self._fused_lora(policy) as module:
                return self.adapter.predict_velocity(
                    x_t,
                    self.adapter.timestep_from_sigma(sigma),
                    embeddings,
                    rows[call_rows],
                    guidance_scale=self.args.guidance_scale,
                    conditional=True,
                    transformer=module or policy,
                )

        return velocity_fn

    @contextlib.contextmanager
    def _reference_model(self):
        """Yield the frozen base transformer: the policy with its LoRA adapters disabled, or a frozen copy."""
        if self.ref_transformer is not None:
            yield self.ref_transformer
            return
        if not self.use_lora:  # full fine-tuning with beta = 0: the reference is the initial policy
            raise ValueError("No reference model: full fine-tuning keeps a frozen copy only when `beta > 0`.")
        transformer = self.accelerator.unwrap_model(self.model)
        transformer.disable_adapters()
        try:
            yield transformer
        finally:
            transformer.enable_adapters()

    def _calculate_rewards(
        self, inputs, prompts, images, latents, embeddings, rows, sigmas, train_sigmas, group_ids
    ) -> torch.Tensor:
        """Call every reward on the local batch; returns (B, num_rewards) float32, NaN where a reward gave None."""
        columns = {key: [example[key] for example in inputs] for key in inputs[0] if key != "prompt"}
        kwargs = {
            **columns,
            "latents": latents,
            "velocity_fn": self._velocity_fn(embeddings, rows),
            "reference_velocity_fn": self._velocity_fn(embeddings, rows, reference=True),
            "sigmas": sigmas,
            "train_sigmas": train_sigmas,
            "group_ids": group_ids.tolist(),
            "trainer_state": self.state,
        }
        step, outputs, running = self.state.global_step, {}, {}
        # Async rewards (e.g. a reward server) are called first and run while the sync ones compute.
        funcs = list(enumerate(zip(self.reward_funcs, self.reward_func_names, strict=True)))
        for i, (func, name) in sorted(funcs, key=lambda item: not _is_async(item[1][0])):
            try:
                images_arg = images if getattr(func, "requires_images", True) else None
                result = func(prompts=prompts, images=images_arg, **kwargs)
            except Exception as error:
                raise reward_call_error(name, error, step, len(prompts), prompts[0]) from error
            if inspect.isawaitable(result):
                running[i] = self._start_async(result)
            else:
                outputs[i] = result
        for i, future in running.items():
            try:
                outputs[i] = future.result()
            except Exception as error:
                name = self.reward_func_names[i]
                raise reward_call_error(name, error, step, len(prompts), prompts[0]) from error
        rewards = torch.tensor(
            [
                check_reward_values(name, outputs[i], len(prompts), step, prompts)
                for i, name in enumerate(self.reward_func_names)
            ],
            dtype=torch.float32,
        ).T.reshape(len(prompts), len(self.reward_funcs))
        unscored = torch.isnan(rewards).all(dim=1)
        if unscored.any():
            first = int(unscored.nonzero()[0])
            raise ValueError(
                f"No reward function applies to {int(unscored.sum())} sample(s) at global step {step} (every one "
                f"returned None; first prompt: {prompts[first]!r}). Each sample needs at least one reward: add a "
                "reward that applies to it or remove such prompts from the dataset."
            )
        return rewards.to(self.accelerator.device)

    def _start_async(self, awaitable) -> concurrent.futures.Future:
        """Run an async reward on the trainer's private event-loop thread; returns its future."""
        if self._async_loop is None:
            self._async_loop = asyncio.new_event_loop()
            threading.Thread(target=self._async_loop.run_forever, daemon=True).start()

        async def _await():
            return await awaitable

        return asyncio.run_coroutine_threadsafe(_await(), self._async_loop)

    def _backward_pieces(
        self, model, num_pieces: int, piece_loss: Callable[[int], torch.Tensor]
    ) -> torch.Tensor:
        """Back-propagate ``piece_loss(k)`` for ``k < num_pieces`` one piece at a time (the activation memory of
        one piece), each scaled by ``1 / (num_pieces × gradient accumulation steps)``; gradients are synchronised
        across processes once, after the last piece (DeepSpeed: one backward of the sum). Returns the detached
        scaled total."""
        scale = 1.0 / (num_pieces * self.current_gradient_accumulation_steps)
        total = torch.zeros((), device=self.accelerator.device)
        deepspeed_loss = None
        for k in range(num_pieces):
            with self.compute_loss_context_manager():
                loss = piece_loss(k) * scale
            if self.is_deepspeed_enabled:  # the engine expects a single backward per micro-batch
                deepspeed_loss = loss if deepspeed_loss is None else deepspeed_loss + loss
            else:
                last = k == num_pieces - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    self.accelerator.backward(loss)
            total += loss.detach()
        if deepspeed_loss is not None:
            self.accelerator.backward(deepspeed_loss, scale_wrt_gas=False)
        return total

    # ------------------------------------------------------------------ logging
    def _log_rollout_metrics(
        self, mode, rewards_per_func, rewards, group_ids, advantages, prompts, images, local
    ):
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            valid = rewards_per_func[:, i][~torch.isnan(rewards_per_func[:, i])]
            metrics[f"rewards/{name}/mean"].append(valid.mean().item() if valid.numel() else math.nan)
            metrics[f"rewards/{name}/std"].append(
                valid.std(unbiased=False).item() if valid.numel() else math.nan
            )
        valid = rewards[~torch.isnan(rewards)]
        metrics["reward"].append(valid.mean().item() if valid.numel() else math.nan)
        metrics["reward_std"].append(valid.std(unbiased=False).item() if valid.numel() > 1 else 0.0)
        _, inverse = torch.unique(group_ids, return_inverse=True)
        zero_std = [
            bool(torch.nan_to_num(rewards[inverse == g]).std(unbiased=False) < 1e-8)
            for g in range(int(inverse.max()) + 1)
        ]
        metrics["frac_reward_zero_std"].append(sum(zero_std) / len(zero_std))
        metrics["advantages/abs_mean"].append(advantages.abs().mean().item())
        if images is not None and self.args.log_completions:
            self._logged_samples = {"prompt": prompts, "image": images, "reward": rewards[local].tolist()}

    def _log_collapse_statistics(
        self, mode: str, final: torch.Tensor, images, all_groups: torch.Tensor
    ) -> None:
        """Log `collapse/*` (see `trl_intrinsic.flow.diagnostics`) over the whole gathered batch, and warn
        once when training drifts towards textureless or blank images."""
        import numpy as np
        from accelerate.utils import gather

        from trl_intrinsic.flow import diagnostics

        metrics, args = self._metrics[mode], self.args
        stats = diagnostics.latent_statistics(final)
        texture = gather(stats["texture"]).mean().item()
        metrics["collapse/latent_std"].append(gather(stats["std"]).mean().item())
        metrics["collapse/latent_texture"].append(texture)
        pooled = gather(diagnostics.pooled(final))
        metrics["collapse/group_diversity"].append(diagnostics.group_diversity(pooled, all_groups).item())
        blank = None
        if images is not None:
            pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images]))
            pixel_std = gather(
                diagnostics.image_std(pixels.permute(0, 3, 1, 2).float().div(255)).to(final.device)
            )
            blank = (pixel_std < diagnostics.BLANK_IMAGE_STD).float().mean().item()
            metrics["collapse/image_std"].append(pixel_std.mean().item())
            metrics["collapse/blank_fraction"].append(blank)
        if mode != "train":
            return
        if self._collapse_reference is None:
            self._collapse_reference = texture
        ratio = texture / max(self._collapse_reference, 1e-12)
        metrics["collapse/texture_ratio"].append(ratio)
        collapsing = ratio < args.collapse_warning_ratio or (blank is not None and blank > 0.5)
        if collapsing and args.collapse_warning_ratio > 0 and args.collapse_action == "stop":
            logger.warning(
                f"Step {self.state.global_step}: stopping (`collapse_action='stop'`): latent texture at {ratio:.2f}× "
                f"its first value{'' if blank is None else f', {blank:.0%} blank images'}. The weights of this "
                "step are not saved as a checkpoint; the last checkpoint holds the model before the collapse."
            )
            self._collapse_stop = True
        if collapsing and args.collapse_warning_ratio > 0 and not self._collapse_warned:
            logger.warning(
                f"Step {self.state.global_step}: the samples are losing texture (latent texture at {ratio:.2f}× its "
                f"first value{'' if blank is None else f', {blank:.0%} blank images'}), the known collapse of "
                "intrinsic rewards such as SOLACE. Train fewer timesteps (`timestep_fraction` ≤ 0.6 with "
                "`timestep_selection='suffix'`), keep CFG in rollouts (`guidance_scale` > 1), raise `beta`, or mix "
                "in an external reward."
            )
        self._collapse_warned = collapsing

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if self.args.log_completions and self._logged_samples["image"] and self.accelerator.is_main_process:
            self._log_images()

    def _log_images(self) -> None:
        """Save the last rollout's image grid (one row per prompt group) and completions table under
        ``output_dir/samples/``, and send both to wandb / trackio when they are in ``report_to``."""
        import pandas as pd

        samples, step = self._logged_samples, self.state.global_step
        directory = os.path.join(self.args.output_dir, "samples")
        os.makedirs(directory, exist_ok=True)
        image_grid(samples["image"], columns=self.num_generations).save(
            os.path.join(directory, f"step_{step:06d}.png")
        )
        table = pd.DataFrame({"step": step, "prompt": samples["prompt"], "reward": samples["reward"]})
        table.to_parquet(os.path.join(directory, f"completions_{step:06d}.parquet"))
        backends = []
        if "wandb" in (self.args.report_to or []):
            import wandb

            if wandb.run is not None:
                backends.append(wandb)
        if "trackio" in (self.args.report_to or []):
            import trackio

            backends.append(trackio)
        for backend in backends:
            images = [backend.Image(image) for image in samples["image"]]
            backend.log({"completions": backend.Table(dataframe=table.assign(image=images))})
        self._logged_samples = {"prompt": [], "image": [], "reward": []}

    # ------------------------------------------------------------------ checkpoints, resume and saving
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` picks the newest *complete* checkpoint of
        ``output_dir`` (a run killed while saving leaves a newer, incomplete one behind). The main process
        first prints :meth:`memory_estimate`."""
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if self.is_world_process_zero():
            print(self.memory_estimate().format())
        self._resume_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def memory_estimate(self) -> MemoryEstimate:
        """The memory this run keeps resident per process, without activations (:mod:`trl_intrinsic.memory`).

        The rollout buffer holds ``per_device_train_batch_size × steps_per_generation`` images (the per-image
        tensors of :meth:`_rollout_bytes_per_image`) and the embeddings of their unique prompts, measured by
        encoding one prompt.
        """
        args = self.args
        modules = [m for m in self.pipeline.components.values() if isinstance(m, torch.nn.Module)]
        trainable = sum(p.numel() * p.element_size() for p in self._trainable)
        images = args.per_device_train_batch_size * args.steps_per_generation
        latent_numel = math.prod(self.adapter.latent_shape(args.resolution, args.resolution))
        use_cfg = args.guidance_scale > 1.0
        with torch.no_grad():
            one = self.adapter.encode_prompts(
                [""],
                negative_prompt=args.negative_prompt if use_cfg else None,
                max_sequence_length=args.max_sequence_length,
            )
        prompts = math.ceil(images / self.num_generations)
        embeddings = prompts * tensor_bytes(one.cond) + tensor_bytes(one.uncond, one.shared)
        return MemoryEstimate(
            weights=tensor_bytes(*modules),
            trainable=trainable,
            gradients=trainable,
            optimizer_state=int(trainable * optimizer_state_factor(args.optim)),
            copies=tensor_bytes(self.ref_transformer) + self._copy_bytes(),
            rollout_buffer=images * self._rollout_bytes_per_image(latent_numel) + embeddings,
        )

    def _rollout_bytes_per_image(self, latent_numel: int) -> int:
        """Bytes of the per-image tensors a generation batch keeps (``per_row_keys``) for a latent of
        ``latent_numel`` elements; the algorithm's own layout."""
        raise NotImplementedError(f"{type(self).__name__} must implement `_rollout_bytes_per_image`.")

    def _copy_bytes(self) -> int:
        """Bytes of the copies of trainable weights (the EMA; a subclass adds its own), besides a frozen
        reference transformer."""
        return self._ema.nbytes() if self._ema is not None else 0

    def _extra_state(self) -> dict[str, Any]:
        """Trainer state saved beside ``Trainer``'s in every checkpoint (restored by :meth:`_restore_extra_state`)."""
        return {"latent_texture": self._collapse_reference}

    def _restore_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("latent_texture") is not None:
            self._collapse_reference = float(state["latent_texture"])

    def _buffer_metadata(self) -> dict[str, int]:
        return {
            "step": self._step,
            "num_processes": self.accelerator.num_processes,
            "steps_per_generation": self.args.steps_per_generation,
            "num_iterations": self.num_iterations,
        }

    def _save_checkpoint(self, model, trial) -> None:
        # Rollouts sampled before this step and not consumed yet are saved by each process, and the extra state
        # by the main one, before `Trainer` writes the trainer state that marks the checkpoint complete.
        folder = checkpoint_folder(self, trial)
        if self._buffered_inputs is not None and self._step % self.generate_every != 0:
            save_rollout_buffer(
                folder,
                [self._to_buffer(chunk) for chunk in self._buffered_inputs],
                rank=self.accelerator.process_index,
                metadata=self._buffer_metadata(),
            )
        if self.accelerator.is_main_process:
            save_extra_state(folder, self._extra_state())
            if self._ema is not None:
                self._ema.save(os.path.join(folder, EMA_NAME))
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

    def _restore_from_checkpoint(self, checkpoint: str) -> None:
        """Put the trainer where it stopped: the micro-step counter, extra state and the rollouts in use."""
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        self._restore_extra_state(load_extra_state(checkpoint))
        if self._ema is not None:
            self._ema.load(os.path.join(checkpoint, EMA_NAME), "EMA weights (`ema=True`)")
        chunks = load_rollout_buffer(
            checkpoint,
            rank=self.accelerator.process_index,
            expected=self._buffer_metadata(),
            generate_every=self.generate_every,
            device=self.accelerator.device,
        )
        self._buffered_inputs = None if chunks is None else [self._from_buffer(chunk) for chunk in chunks]

    def _to_buffer(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """A micro-batch in the rollout-buffer format (tensors, nested mappings, JSON values)."""
        embeddings = chunk["embeddings"]
        return {
            **chunk,
            "embeddings": {"cond": embeddings.cond, "uncond": embeddings.uncond, "shared": embeddings.shared},
        }

    def _from_buffer(self, chunk: dict[str, Any]) -> dict[str, Any]:
        from trl_intrinsic.flow.pipelines import PromptEmbeddings

        return {**chunk, "embeddings": PromptEmbeddings(**chunk["embeddings"])}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the LoRA in diffusers format (``pytorch_lora_weights.safetensors``), or the full transformer,
        plus the training arguments as JSON. Called on the main process only."""
        from trl_intrinsic.flow.weights import save_transformer_weights

        output_dir = output_dir or self.args.output_dir
        transformer = self.accelerator.unwrap_model(self.model)
        save_transformer_weights(self.pipeline, transformer, output_dir, use_lora=self.use_lora)
        write_training_args(output_dir, self.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # sharded engines need every process to take part in collecting the state dict
            self.accelerator.wait_for_everyone()
        if self.args.should_save:
            # The EMA (with `ema=True`) is what a user gets; checkpoints keep the raw weights for a resume.
            with self._ema_weights() if not _internal_call else contextlib.nullcontext():
                self._save(output_dir)
                if not _internal_call and self.args.save_full_pipeline and not self.use_lora:
                    self.pipeline.save_pretrained(output_dir, safe_serialization=True)
            self.create_model_card(output_dir=output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from trl_intrinsic.flow.weights import load_transformer_weights

        transformer = self.accelerator.unwrap_model(model or self.model)
        load_transformer_weights(transformer, resume_from_checkpoint, use_lora=self.use_lora)

    def _model_card_settings(self) -> str:
        """The method's sampling and training settings, one line of the model card."""
        return ""

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """Write ``README.md`` from ``templates/flow_model_card.md``: base model, method, rewards, usage."""
        from trl_intrinsic.flow.weights import TRANSFORMER_DIR

        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        base = getattr(self.pipeline, "name_or_path", None) or self.pipeline.config.get("_name_or_path", "")
        pipeline_class = type(self.pipeline).__name__
        repo = self.args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
        load = (
            f"pipe.load_lora_weights({repo!r})"
            if self.use_lora
            else f"# replace pipe.transformer with {TRANSFORMER_DIR}/"
        )
        card = render_model_card(
            "flow_model_card.md",
            front_matter=front_matter(
                {
                    "base_model": base if base and not os.path.isdir(base) else None,
                    "library_name": "diffusers",
                    "pipeline_tag": "text-to-image",
                    "tags": list(self._tag_names) + (["lora"] if self.use_lora else []),
                }
            ),
            repo=repo,
            what="A LoRA adapter for" if self.use_lora else "A fine-tuned transformer of",
            base=base or pipeline_class,
            method=self._name,
            method_summary=self._method_summary,
            paper_id=self._paper["id"],
            rewards=", ".join(
                f"`{n}` (weight {w:g})"
                for n, w in zip(self.reward_func_names, self.reward_weights.tolist(), strict=True)
            ),
            steps=self.state.global_step,
            num_generations=self.args.num_generations,
            settings=self._model_card_settings(),
            resolution=self.args.resolution,
            pipeline_class=pipeline_class,
            usage=f"pipe = {pipeline_class}.from_pretrained({base!r})\n{load}",
            eval_steps=self.args.eval_num_inference_steps,
            citation=self._paper["citation"],
        )
        with open(os.path.join(output_dir, "README.md"), "w") as f:
            f.write(card)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision=None,
        **kwargs,
    ):
        """Upload the final weights and the model card (no checkpoints, samples or logs)."""
        from huggingface_hub import HfApi

        from trl_intrinsic.flow.weights import LORA_WEIGHTS_NAME, TRANSFORMER_DIR

        if self.hub_model_id is None and not self.args.hub_model_id:
            raise ValueError(
                f"`push_to_hub` needs a repository: set `hub_model_id` in the {type(self.args).__name__}."
            )
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        weights = [LORA_WEIGHTS_NAME] if self.use_lora else [f"{TRANSFORMER_DIR}/*"]
        return HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token or self.args.hub_token,
            revision=revision or self.args.hub_revision,
            allow_patterns=["README.md", *weights],
            run_as_future=not blocking,
        )


def check_prompt_datasets(args: Any, train_dataset: Any, eval_dataset: Any) -> None:
    """Refuse empty datasets, datasets without a ``prompt`` column, and eval batches that split prompt groups."""
    check_nonempty_datasets(train_dataset, eval_dataset)
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        columns = getattr(dataset, "column_names", None)
        if columns is not None and "prompt" not in columns:
            raise ValueError(
                f"`{name}` has no 'prompt' column (columns: {columns}); rename the prompt column to 'prompt' "
                "or load it with `trl_intrinsic.data.load_prompt_dataset`."
            )
    if (
        eval_dataset is not None
        and (args.per_device_eval_batch_size * args.world_size) % args.num_generations
    ):
        raise ValueError(
            f"The global eval batch ({args.per_device_eval_batch_size} per device × {args.world_size} processes) "
            f"must hold whole groups of num_generations={args.num_generations}; set `per_device_eval_batch_size` "
            "to a multiple of num_generations / num_processes."
        )


def check_nonempty_datasets(train_dataset: Any, eval_dataset: Any) -> None:
    """Refuse a training or evaluation dataset without rows (e.g. everything filtered out)."""
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(
                f"`{name}` has no rows; pass a dataset with at least one prompt (check the filters and the split)."
            )


class _StopOnCollapse(TrainerCallback):
    """Ends training at the step whose rollouts collapsed (``collapse_action="stop"``), without checkpointing it:
    the last checkpoint keeps the weights from before the collapse."""

    def __init__(self, trainer: FlowTrainerBase):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._collapse_stop:
            control.should_training_stop = True
            control.should_save = False
        return control


class _EMAStep(TrainerCallback):
    """Updates the trainer's EMA of the trainable weights after each optimizer step (``ema=True``)."""

    def __init__(self, trainer: FlowTrainerBase):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_ema()
        return control


def _is_async(func: Any) -> bool:
    """Whether calling ``func`` returns a coroutine (an ``async def`` function or ``__call__``)."""
    call = type(func).__call__ if not inspect.isfunction(func) else func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)


def resolve_flow_rewards(reward_funcs: Any) -> tuple[list[Callable], list[str]]:
    """Flow reward functions (callables or names of rewards in :mod:`trl_intrinsic.rewards`) and their names."""
    funcs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not funcs:
        raise ValueError("`reward_funcs` is empty; pass at least one reward function.")
    resolved, names = [], []
    for func in funcs:
        if isinstance(func, str):
            from trl_intrinsic.rewards import reward_by_name

            func = reward_by_name(func)
        if isinstance(func, torch.nn.Module) or not callable(func):
            raise TypeError(
                f"Flow rewards must be plain callables `f(prompts, images, **kwargs)`, got {type(func).__name__}; "
                "wrap a scoring model in a function or a class with `__call__`."
            )
        resolved.append(func)
        names.append(getattr(func, "__name__", type(func).__name__))
    return resolved, names
