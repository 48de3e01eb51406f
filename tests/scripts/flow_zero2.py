"""FlowGRPOTrainer for two steps under DeepSpeed ZeRO-2 in one CPU process (run with torchrun).

Usage: torchrun --standalone --nproc_per_node 1 flow_zero2.py OUTPUT_DIR RESULT_JSON
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.testing import tiny_sd3_pipeline


def brightness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def main(output_dir: str, result_path: str) -> None:
    zero2 = {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    args = FlowGRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", seed=0, deepspeed=zero2,
        per_device_train_batch_size=4, num_generations=2, max_steps=2, resolution=32, num_inference_steps=3,
        logging_steps=1, save_strategy="no", learning_rate=1e-2, disable_tqdm=True,
    )  # fmt: skip
    pipeline = tiny_sd3_pipeline()
    before = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    trainer = FlowGRPOTrainer(
        pipeline,
        [brightness],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    )
    trainer.train()
    trainer.save_model()
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    base_changed = sorted(
        k
        for k, v in after.items()
        if "lora_" not in k and not torch.equal(v, before[k.replace(".base_layer", "")])
    )
    lora_b_moved = any(v.abs().max().item() > 0 for k, v in after.items() if "lora_B" in k)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "global_step": trainer.state.global_step,
        "base_changed": base_changed,
        "lora_b_moved": lora_b_moved,
        "ratio": [h["ratio"] for h in logs],
        "kl": [h["kl"] for h in logs],
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Every file is written: leave without interpreter teardown, where torch's background threads
    # occasionally abort a rank ("terminate called without an active exception") after a clean run.
    PartialState().wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
