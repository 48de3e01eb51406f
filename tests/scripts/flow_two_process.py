"""One Flow-GRPO step under ``torchrun --nproc_per_node 2`` (gloo, CPU). Each process writes
``<results>/rank<i>.safetensors`` with what it sampled and the advantages it trained on, and
``<results>/rank<i>.json`` with the files it opened for writing under the trainer's output directory.

Usage: ``torchrun --nproc_per_node 2 <this> OUTPUT_DIR RESULTS_DIR [COMPILE_BACKEND]``; with a backend, the
trainer runs with ``torch_compile=True`` and that backend.
"""

import json
import os
import sys

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.testing import tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def latent_mean(prompts, images, latents, **kwargs):
    """Mean of each final latent: differs within a group, so advantages are not all zero."""
    return [float(z.mean()) for z in latents]


latent_mean.requires_images = False


def make_trainer(output_dir: str, per_device_train_batch_size: int, **overrides) -> FlowGRPOTrainer:
    """One optimizer step with plain SGD, whose update is proportional to the (averaged) gradient."""
    values = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", seed=1, disable_tqdm=True,
        per_device_train_batch_size=per_device_train_batch_size, num_generations=4, max_steps=1,
        resolution=32, num_inference_steps=3, guidance_scale=1.0, beta=0.0, optim="sgd", learning_rate=1.0,
        logging_steps=1, save_strategy="steps", save_steps=1, log_completions=True,
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [latent_mean],
        args=FlowGRPOConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, lora_dropout=0.0),
    )


def record_rollouts(trainer: FlowGRPOTrainer) -> list[dict]:
    """Keep what every call of `_generate_and_score` returns (prompts, final latents, advantages)."""
    records = []
    original = trainer._generate_and_score

    def wrapped(inputs, mode):
        batch = original(inputs, mode)
        records.append({"prompts": [x["prompt"] for x in inputs], **batch})
        return batch

    trainer._generate_and_score = wrapped
    return records


def main(output_dir: str, results_dir: str, compile_backend: str | None = None) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    written = []
    root = os.path.realpath(output_dir)

    def audit(event, args):
        # Python-level file creation (open for writing, mkdir); safetensors writes from Rust and is not seen.
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike) and isinstance(args[1], str):
            writing = any(flag in args[1] for flag in "wax+")
        elif event == "os.mkdir":
            writing = True
        else:
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if writing and path.startswith(root):
            written.append(os.path.relpath(path, root))

    sys.addaudithook(audit)
    compiled = {"torch_compile": True, "torch_compile_backend": compile_backend} if compile_backend else {}
    trainer = make_trainer(output_dir, per_device_train_batch_size=2, **compiled)
    records = record_rollouts(trainer)
    trainer.train()
    (record,) = records
    os.makedirs(results_dir, exist_ok=True)
    save_file(
        {
            "latents": record["latents"][:, -1].contiguous(),
            "advantages": record["advantages"].contiguous(),
            "world_size": torch.tensor(trainer.accelerator.num_processes),
        },
        os.path.join(results_dir, f"rank{rank}.safetensors"),
    )
    with open(os.path.join(results_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"prompts": record["prompts"], "written": sorted(set(written))}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # Every file is written: leave without interpreter teardown, where torch's background threads
    # occasionally abort a rank ("terminate called without an active exception") after a clean run.
    PartialState().wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
