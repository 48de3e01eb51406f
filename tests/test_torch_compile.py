"""``torch_compile=True``: the flow trainers compile the transformer in place, so every call of it runs compiled
(rollouts, reference forwards, reward probes, training), with the eager numbers."""

import numpy as np
import pytest
import torch
from accelerate.utils import is_compiled_module
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file

from trl_intrinsic import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.testing import tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares"]


def _probing_reward(prompts, images, velocity_fn=None, reference_velocity_fn=None, latents=None, **kwargs):
    """A reward that probes the policy and the reference, as SOLACE does; its value follows the probes."""
    sigma, rows = torch.full((latents.shape[0],), 0.5), torch.arange(latents.shape[0])
    noisy = 0.5 * latents + 0.5 * torch.randn_like(latents)
    gap = (velocity_fn(noisy, sigma, rows) - reference_velocity_fn(noisy, sigma, rows)).flatten(1)
    brightness = [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]
    return [b + 1e-3 * g for b, g in zip(brightness, gap.norm(dim=1).tolist())]


def _train(tmp_path, trainer_cls, config_cls, compile_backend, **overrides):
    """Train 2 optimizer steps and evaluate; return the trainer and the number of transformer calls, counted
    outside dynamo: through the module's compiled entry point when compiled, through its forward when not."""
    values = dict(
        output_dir=str(tmp_path / f"out-{compile_backend}"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=2, resolution=32, num_inference_steps=4,
        eval_num_inference_steps=3, logging_steps=1, save_strategy="no", learning_rate=3e-2,
        guidance_scale=2.0, disable_tqdm=True,
    )  # fmt: skip
    if compile_backend is not None:
        values.update(torch_compile=True, torch_compile_backend=compile_backend)
    values.update(overrides)
    trainer = trainer_cls(
        tiny_sd3_pipeline(),
        [_probing_reward],
        args=config_cls(**values),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", lora_dropout=0.0),
    )
    transformer, calls = trainer.pipeline.transformer, [0]
    name = "forward" if compile_backend is None else "_compiled_call_impl"
    original = getattr(transformer, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(transformer, name, counted)
    torch.manual_seed(0)  # the probing reward's noise
    trainer.train()
    trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS}))
    return trainer, calls[0]


@pytest.mark.parametrize(
    ("trainer_cls", "config_cls", "overrides"),
    [(FlowGRPOTrainer, FlowGRPOConfig, {"beta": 0.04}), (DiffusionNFTTrainer, DiffusionNFTConfig, {})],
    ids=["flow-grpo", "diffusion-nft"],
)
def test_torch_compile_runs_every_transformer_call_compiled_with_the_eager_numbers(
    tmp_path, monkeypatch, trainer_cls, config_cls, overrides
):
    torch._dynamo.reset()
    # A graph that dynamo gives up on runs eagerly with only a warning: make that an error here.
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    eager, eager_calls = _train(tmp_path, trainer_cls, config_cls, None, **overrides)
    compiled, compiled_calls = _train(tmp_path, trainer_cls, config_cls, "eager", **overrides)

    # Every transformer call of the same work (sampling, probes, reference and training forwards, evaluation)
    # went through the compiled module.
    assert eager_calls > 20
    assert compiled_calls == eager_calls
    # accelerate did not wrap the model a second time; the module itself is compiled.
    assert not is_compiled_module(compiled.model)
    assert compiled.pipeline.transformer._compiled_call_impl is not None

    # The same training, up to float rounding, and the same saved adapter (no compile prefix in its keys).
    compiled_params = dict(compiled.model.named_parameters())
    for name, param in eager.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(compiled_params[name], param, rtol=1e-4, atol=1e-5)
    assert any(
        (p.abs().max() > 0) for n, p in compiled.model.named_parameters() if "lora_B" in n
    )  # the adapter trained
    for trainer in (eager, compiled):
        trainer.save_model()
    saved = [
        load_file(str(tmp_path / f"out-{b}" / "pytorch_lora_weights.safetensors")) for b in (None, "eager")
    ]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        torch.testing.assert_close(saved[1][key], saved[0][key], rtol=1e-4, atol=1e-5)


def test_torch_compile_settings_reach_the_transformer(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append((type(self), kwargs)))
    values = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=2,
        num_generations=2, resolution=32, torch_compile_backend="aot_eager", torch_compile_mode="reduce-overhead",
    )  # fmt: skip
    # Full fine-tuning with a KL term keeps a frozen copy of the transformer: it is compiled too.
    FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [_probing_reward],
        args=FlowGRPOConfig(**values, beta=0.04),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    assert [kwargs for _, kwargs in seen] == [{"backend": "aot_eager", "mode": "reduce-overhead"}] * 2
    assert all(cls.__name__ == "SD3Transformer2DModel" for cls, _ in seen)
