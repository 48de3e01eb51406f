"""The start-up memory estimate against the tensors a flow trainer really holds, and the CPU rollout buffer."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.memory import MemoryEstimate, optimizer_state_factor, tensor_bytes
from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.toyworld.models import load_toy_pipeline

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]
COMMON = dict(
    use_cpu=True, bf16=False, report_to="none", seed=0, per_device_train_batch_size=4, num_generations=2,
    steps_per_generation=2, max_steps=1, resolution=32, num_inference_steps=4, logging_steps=1,
    save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
)  # fmt: skip


def brightness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def _flow_grpo(tmp_path, lora=True, toy=False, **overrides):
    args = FlowGRPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **overrides})
    peft = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0) if lora else None
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    pipeline = load_toy_pipeline() if toy else tiny_sd3_pipeline()
    return FlowGRPOTrainer(pipeline, [brightness], args=args, train_dataset=dataset, peft_config=peft)


def _measured(trainer) -> MemoryEstimate:
    """The same quantities read off the trainer after a training step: storages, not formulas."""
    modules = [m for m in trainer.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    batch = trainer._buffered_inputs[0]
    trainer.model.zero_grad()
    trainer.training_step(trainer.model, batch).item()  # fills every gradient
    trainer._step -= 1
    copies = tensor_bytes(trainer.ref_transformer) + tensor_bytes(trainer._old.tensors if hasattr(trainer, "_old") else [])
    return MemoryEstimate(
        weights=tensor_bytes(*modules),
        trainable=tensor_bytes(trainable),
        gradients=tensor_bytes([p.grad for p in trainable]),
        optimizer_state=tensor_bytes(list(trainer.optimizer.state.values())),
        copies=copies,
        rollout_buffer=tensor_bytes(trainer._buffered_inputs),
    )


def _assert_close(estimate, measured, rel=0.25):
    for name in ("weights", "trainable", "gradients", "optimizer_state", "copies", "rollout_buffer", "total"):
        got, want = getattr(estimate, name), getattr(measured, name)
        assert abs(got - want) <= rel * want + 1024, f"{name}: estimated {got} B, measured {want} B"


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # LoRA, CFG, no frozen copy
        {"grpo_guard": True, "guidance_scale": 1.0},  # the buffer also holds the step means
        {"lora": False, "beta": 0.04},  # full fine-tuning keeps a frozen reference
        {"toy": True},  # the shipped toy SD3
    ],
    ids=["lora-cfg", "guard", "full-fine-tuning", "toy-sd3"],
)
def test_flow_grpo_estimate_matches_the_tensors_held(tmp_path, overrides, capsys):
    trainer = _flow_grpo(tmp_path, **overrides)
    trainer.train()
    assert "Memory estimate per process (MiB)" in capsys.readouterr().out
    estimate, measured = trainer.memory_estimate(), _measured(trainer)
    assert measured.rollout_buffer > 0 and measured.optimizer_state > 0
    _assert_close(estimate, measured)


def test_diffusion_nft_estimate_counts_the_old_policy(tmp_path):
    args = DiffusionNFTConfig(output_dir=str(tmp_path / "out"), **COMMON)
    trainer = DiffusionNFTTrainer(
        tiny_sd3_pipeline(),
        [brightness],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0),
    )
    trainer.train()
    estimate, measured = trainer.memory_estimate(), _measured(trainer)
    assert estimate.copies == estimate.trainable > 0
    _assert_close(estimate, measured)


def test_optimizer_state_factors():
    assert optimizer_state_factor("adamw_torch") == optimizer_state_factor("adamw_torch_fused") == 2.0
    assert optimizer_state_factor("adamw_8bit") == 0.5
    assert optimizer_state_factor("sgd") == 1.0
    assert optimizer_state_factor("something_new") == 2.0
    assert "total" in MemoryEstimate(10, 1, 1, 2, 0, 5).format()


def test_offloaded_buffer_lives_on_the_cpu_and_trains_identically(tmp_path):
    runs = {}
    for offload in (False, True):
        trainer = _flow_grpo(tmp_path / str(offload), offload_rollout_buffer=offload, max_steps=2)
        trainer.train()
        runs[offload] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        if offload:
            for tensor in (trainer._buffered_inputs[0]["latents"], *trainer._buffered_inputs[0]["embeddings"].cond.values()):
                assert tensor.device.type == "cpu"
    torch.testing.assert_close(runs[True], runs[False], rtol=0, atol=0)
