"""Train IntrinsicGRPOTrainer (tiny causal LM, NSC reward, LoRA) with a checkpoint every step and SIGKILL the
process while checkpoint-2 is being written (after its adapter weights, before its optimizer and trainer
state). Usage: ``python <this> OUTPUT_DIR``. ``make_trainer`` is also used by the tests, so that
the resumed run has the same settings."""

import os
import signal
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import IntrinsicGRPOConfig, IntrinsicGRPOTrainer
from trl_intrinsic.rewards import nsc_reward
from trl_intrinsic.testing import tiny_causal_lm

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def make_trainer(output_dir: str, max_steps: int = 3) -> IntrinsicGRPOTrainer:
    model, tokenizer = tiny_causal_lm(seed=0)
    args = IntrinsicGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", seed=5, disable_tqdm=True,
        per_device_train_batch_size=2, num_generations=2, steps_per_generation=2, max_completion_length=6,
        learning_rate=1e-2, beta=0.0, max_steps=max_steps, logging_steps=1, save_strategy="steps", save_steps=1,
        gradient_checkpointing=False,
    )  # fmt: skip
    return IntrinsicGRPOTrainer(
        model,
        [nsc_reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(output_dir)
    save_optimizer = trainer._save_optimizer_and_scheduler

    def save_then_die(folder):
        if trainer.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        save_optimizer(folder)

    trainer._save_optimizer_and_scheduler = save_then_die
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1])
