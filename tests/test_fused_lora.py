"""``fused_lora``: no-grad policy forwards with the LoRA fused into temporary copies of the weights."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.flow.weights import fused_lora
from trl_intrinsic.testing import tiny_sd3_pipeline


def _transformer(**lora):
    transformer = tiny_sd3_pipeline().transformer
    config = dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    transformer.add_adapter(LoraConfig(**{**config, **lora}))
    with torch.no_grad():  # non-zero B, so that the adapters change the output
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return transformer.eval()


def _inputs(transformer, rows=3):
    gen = torch.Generator().manual_seed(0)
    config = transformer.config
    return dict(
        hidden_states=torch.randn(rows, config.in_channels, 16, 16, generator=gen),
        encoder_hidden_states=torch.randn(rows, 5, config.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(rows, config.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([900.0, 500.0, 100.0][:rows]),
    )


def _base_weights(transformer):
    return {
        name: param
        for name, param in transformer.named_parameters()
        if "base_layer" in name and "weight" in name
    }


def test_fused_forward_matches_the_adapters_and_restores_the_weights_bit_for_bit():
    transformer = _transformer()
    inputs = _inputs(transformer)
    weights = _base_weights(transformer)
    before = {name: (param.data_ptr(), param.detach().clone()) for name, param in weights.items()}
    with torch.no_grad():
        plain = transformer(**inputs).sample
        transformer.disable_adapters()
        base = transformer(**inputs).sample
        transformer.enable_adapters()
        with fused_lora(transformer) as module:
            assert module is transformer
            assert any(not torch.equal(weights[n], before[n][1]) for n in weights)  # fused inside the block
            fused = transformer(**inputs).sample
    assert (plain - base).abs().max() > 1e-2  # the adapters matter here
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, param in weights.items():  # the very same tensors, unchanged
        assert param.data_ptr() == before[name][0] and torch.equal(param, before[name][1])
    with torch.no_grad():
        assert torch.equal(transformer(**inputs).sample, plain)  # adapters active again
    assert all(p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n)


def test_fused_lora_restores_the_weights_when_the_block_raises():
    transformer = _transformer()
    weights = _base_weights(transformer)
    before = {name: param.detach().clone() for name, param in weights.items()}
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), fused_lora(transformer):
        raise RuntimeError("inside")
    assert all(torch.equal(param, before[name]) for name, param in weights.items())
    assert not any(m.disable_adapters for m in transformer.modules() if hasattr(m, "lora_A"))


def test_fused_lora_keeps_requires_grad_and_sums_only_the_active_adapters():
    transformer = _transformer()
    # A second adapter, inactive, on to_q (beside "default") and to_out.0 (alone): to_q sums "default" only,
    # to_out.0 has no active adapter and keeps its base weight.
    style = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_out.0"])
    transformer.add_adapter(style, adapter_name="style")
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B.style" in name:
                param.fill_(0.5)
    transformer.set_adapter("default")
    frozen = next(p for n, p in transformer.named_parameters() if "lora_A.default" in n)
    frozen.requires_grad_(False)  # a user freezes one matrix
    flags = {n: p.requires_grad for n, p in transformer.named_parameters()}
    inputs = _inputs(transformer)
    with torch.no_grad():
        plain = transformer(**inputs).sample
        with fused_lora(transformer):
            fused = transformer(**inputs).sample
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert {n: p.requires_grad for n, p in transformer.named_parameters()} == flags


def test_the_trainer_samples_and_probes_through_the_fused_weights(tmp_path):
    # A hook on every lora_A counts the adapter matmuls: fused rollouts and velocity_fn calls run none.
    counter = {"all": 0, "velocity_fn": 0}

    def count(*args):
        counter["all"] += 1

    def probing(prompts, images, velocity_fn=None, latents=None, **kwargs):
        before = counter["all"]
        velocity_fn(latents, torch.full((latents.shape[0],), 0.5), torch.arange(latents.shape[0]))
        counter["velocity_fn"] += counter["all"] - before
        return [0.0] * len(prompts)

    counts = {}
    for fuse in (True, False):
        trainer = _trainer(tmp_path, fuse, reward=probing)
        for name, module in trainer.model.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_hook(count)
        counter.update(all=0, velocity_fn=0)
        trainer.evaluate(Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]}))
        counts[fuse] = (counter["all"], counter["velocity_fn"])
    assert counts[True] == (0, 0)
    assert counts[False][0] > counts[False][1] > 0


@pytest.mark.parametrize(
    "case",
    ["grad enabled", "dora", "lora bias", "dropout while training", "adapters disabled", "zero-3", "no lora"],
)
def test_fused_lora_leaves_the_adapters_alone_when_fusing_would_change_the_numbers(case):
    transformer = {
        "dora": lambda: _transformer(use_dora=True),
        "lora bias": lambda: _transformer(lora_bias=True, init_lora_weights=True),
        "dropout while training": lambda: _transformer(lora_dropout=0.5).train(),
        "no lora": lambda: tiny_sd3_pipeline().transformer,
    }.get(case, _transformer)()
    if case == "adapters disabled":
        transformer.disable_adapters()
    if case == "zero-3":  # DeepSpeed marks the parameters it partitions (their .data is a placeholder)
        next(iter(_base_weights(transformer).values())).ds_id = 0
    before = {name: param.detach().clone() for name, param in transformer.named_parameters()}
    grad = torch.enable_grad() if case == "grad enabled" else torch.no_grad()
    with grad, fused_lora(transformer):
        for name, param in transformer.named_parameters():
            assert torch.equal(param, before[name]), name  # nothing fused


def _trainer(tmp_path, fuse, reward=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / f"out-{fuse}"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=2, resolution=32, num_inference_steps=4,
        logging_steps=1, save_strategy="no", learning_rate=3e-2, guidance_scale=2.0, beta=0.0,
        disable_tqdm=True, fuse_lora_for_sampling=fuse,
    )  # fmt: skip
    values.update(overrides)

    def brightness(prompts, images, **kwargs):
        return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]

    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [reward or brightness],
        args=FlowGRPOConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": ["a red circle", "two blue squares"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", lora_dropout=0.0),
    )


def test_training_with_fused_sampling_matches_unfused_sampling(tmp_path, record_train_metrics):
    # Two optimizer steps: the second step's rollouts are sampled with trained (non-zero) LoRA weights, fused
    # or not; the rewards, the on-policy ratio and the trained weights agree up to float rounding.
    runs = {}
    for fuse in (True, False):
        trainer = _trainer(tmp_path, fuse)
        history = record_train_metrics(trainer)
        trainer.train()
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        runs[fuse] = (history, lora)
    (fused_history, fused_weights), (plain_history, plain_weights) = runs[True], runs[False]
    assert len(fused_history) == len(plain_history) == 2
    for fused_log, plain_log in zip(fused_history, plain_history):
        np.testing.assert_allclose(fused_log["ratio"], 1.0, atol=1e-5)
        np.testing.assert_allclose(fused_log["reward"], plain_log["reward"], atol=1e-5)
    assert (
        max(w.abs().max() for n, w in fused_weights.items() if "lora_B" in n) > 1e-3
    )  # the 2nd step sampled trained LoRA
    for name, value in fused_weights.items():
        torch.testing.assert_close(value, plain_weights[name], rtol=1e-4, atol=1e-5)
