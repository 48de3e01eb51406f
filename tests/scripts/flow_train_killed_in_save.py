"""Train FlowGRPOTrainer with a checkpoint every step and SIGKILL the process while checkpoint-2 is being
written (after its weights, before its optimizer and trainer state). Usage: ``python <this> OUTPUT_DIR``."""

import os
import signal
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.testing import tiny_sd3_pipeline


def latent_mean(prompts, images, latents, **kwargs):
    return [float(z.mean()) for z in latents]


latent_mean.requires_images = False


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    args = FlowGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", seed=3, disable_tqdm=True,
        per_device_train_batch_size=2, num_generations=2, steps_per_generation=2, num_iterations=1,
        resolution=32, num_inference_steps=3, guidance_scale=1.0, learning_rate=3e-3, beta=0.01,
        max_steps=3, save_strategy="steps", save_steps=1, logging_steps=1,
    )  # fmt: skip
    trainer = FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [latent_mean],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "two blue squares", "a green triangle"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, lora_dropout=0.0),
    )
    save_optimizer = trainer._save_optimizer_and_scheduler

    def save_then_die(folder):
        if trainer.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        save_optimizer(folder)

    trainer._save_optimizer_and_scheduler = save_then_die
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
