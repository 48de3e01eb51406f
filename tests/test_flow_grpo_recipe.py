"""Flow-GRPO recipe knobs from the reference: GRPO-Guard (RatioNorm, per-step reweighting) and dropping
samples with zero advantage."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_intrinsic import FlowGRPOConfig, FlowGRPOTrainer
from trl_intrinsic.flow.sde import sde_step_with_logprob
from trl_intrinsic.testing import tiny_sd3_pipeline
from trl_intrinsic.trainers.grpo_math import ratio_norm_log_ratio

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]


def brightness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]


def _trainer(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_steps=1, resolution=32,
        num_inference_steps=4, logging_steps=1, save_strategy="no", learning_rate=1e-2,
        guidance_scale=1.0, beta=0.0, disable_tqdm=True,
    )  # fmt: skip
    values.update(overrides)
    return FlowGRPOTrainer(
        tiny_sd3_pipeline(),
        [brightness],
        args=FlowGRPOConfig(**values),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", lora_dropout=0.0),
    )


@pytest.mark.parametrize("sde_type", ["flow_sde", "cps"])
def test_ratio_norm_is_the_mean_of_noise_times_mean_shift(sde_type):
    # x' = μ_old + s·ε; for a policy with mean μ = μ_old + Δμ, RatioNorm's log-ratio is mean(ε·Δμ) exactly.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=gen)
    v_old = torch.randn(x.shape, generator=gen)
    v_new = v_old + 0.3 * torch.randn(x.shape, generator=gen)
    old = sde_step_with_logprob(v_old, x, 0.8, 0.55, noise_level=0.7, sde_type=sde_type, generator=gen)
    new = sde_step_with_logprob(
        v_new, x, 0.8, 0.55, noise_level=0.7, sde_type=sde_type, prev_sample=old.prev_sample
    )
    s = old.noise_std
    eps = (old.prev_sample - old.prev_sample_mean) / s
    delta = new.prev_sample_mean - old.prev_sample_mean
    got = ratio_norm_log_ratio(new.log_prob, old.log_prob, new.prev_sample_mean, old.prev_sample_mean, s)
    torch.testing.assert_close(got, (eps * delta).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6)
    # the plain log-ratio is that, divided by s, minus the bias RatioNorm adds back
    bias = delta.pow(2).mean(dim=(1, 2, 3)) / (2 * s.flatten() ** 2)
    torch.testing.assert_close(new.log_prob - old.log_prob, got / s.flatten() - bias, rtol=1e-4, atol=1e-5)


def test_noise_std_is_the_std_of_the_step():
    x, v = torch.zeros(2, 3), torch.ones(2, 3)
    flow = sde_step_with_logprob(v, x, 0.6, 0.35, noise_level=0.7)
    expected = 0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.25)
    torch.testing.assert_close(flow.noise_std.flatten(), torch.full((2,), expected))
    cps = sde_step_with_logprob(v, x, 0.6, 0.35, noise_level=0.7, sde_type="cps")
    torch.testing.assert_close(cps.noise_std, cps.std_dev)


def _step_gradients(trainer, batch, j):
    model = trainer.model
    model.zero_grad()
    trainer._timestep_loss(model, batch, j).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_on_policy_guard_gradient_is_the_plain_one_times_s_over_dt(tmp_path):
    # On the sampling policy Δμ = 0, so ∇ log ρ̂ = s·∇ log ρ; gradient reweighting then divides by |dt|.
    trainer = _trainer(tmp_path, grpo_guard=True)
    trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(inputs)
    assert batch["means"].shape == batch["latents"][:, 1:].shape
    assert batch["advantages"].abs().max() > 0
    sigmas = batch["sigmas"]
    for j in batch["train_steps"]:
        guarded = _step_gradients(trainer, batch, j)
        trainer.args.grpo_guard = False
        plain = _step_gradients(trainer, batch, j)
        trainer.args.grpo_guard = True
        dt = float(sigmas[j] - sigmas[j + 1])
        sigma, sigma_max = float(sigmas[j]), float(sigmas[1])
        s = 0.7 * math.sqrt(sigma / (1 - (sigma_max if sigma >= 1 else sigma))) * math.sqrt(dt)
        assert any(g.abs().max() > 0 for g in plain.values())
        for name in plain:
            torch.testing.assert_close(guarded[name], plain[name] * s / dt, rtol=2e-3, atol=1e-8)


@pytest.mark.parametrize("sde_type", ["flow_sde", "cps"])
def test_first_iteration_is_on_policy_for_either_sde(tmp_path, sde_type, record_train_metrics):
    trainer = _trainer(tmp_path, sde_type=sde_type, noise_level=0.5)
    history = record_train_metrics(trainer)
    trainer.train()
    np.testing.assert_allclose(history[0]["ratio"], 1.0, atol=1e-5)


def test_guarded_off_policy_training_moves_the_ratio_and_the_weights(tmp_path, record_train_metrics):
    trainer = _trainer(tmp_path, grpo_guard=True, num_iterations=2, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    history = record_train_metrics(trainer)
    trainer.train()
    first, second = history[0]["ratio"], history[1]["ratio"]
    np.testing.assert_allclose(first, 1.0, atol=1e-6)  # on-policy: Δμ = 0
    assert all(math.isfinite(r) for r in second) and max(abs(r - 1) for r in second) > 1e-6
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(after[n]).all() for n in before)


def test_the_rollout_keeps_step_means_only_with_the_guard(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "means" not in batch


def first_two_prompts_only(prompts, images, **kwargs):
    """Brightness for two of the four prompts; a constant for the others, whose groups carry no gradient."""
    return [
        float(np.asarray(image, dtype=np.float32).mean() / 255) if prompt in PROMPTS[:2] else 0.5
        for prompt, image in zip(prompts, images, strict=True)
    ]


def test_drop_zero_advantage_trains_only_informative_samples(tmp_path):
    trainer = _trainer(
        tmp_path, drop_zero_advantage=True, per_device_train_batch_size=2, steps_per_generation=4,
        scale_rewards="group", max_steps=1,
    )  # fmt: skip
    trainer.reward_funcs = [first_two_prompts_only]
    trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer._prepare_inputs(inputs)
    chunks = trainer._buffered_inputs
    assert len(chunks) == 4  # still steps_per_generation micro-batches, now of one image each
    kept = torch.cat([c["advantages"] for c in chunks])
    assert kept.shape == (4,) and bool((kept != 0).all())
    assert trainer._metrics["train"]["kept_fraction"] == [0.5]
    for chunk in chunks:
        assert chunk["latents"].shape[0] == chunk["rows"].shape[0] == chunk["log_probs"].shape[0] == 1
        assert chunk["rows"].item() in (0, 1)  # the informative prompts are the first two unique ones


def test_drop_zero_advantage_keeps_a_micro_batch_when_nothing_is_informative(tmp_path):
    trainer = _trainer(tmp_path, drop_zero_advantage=True, max_steps=2)
    trainer.reward_funcs = [lambda prompts, images, **kw: [0.5] * len(prompts)]
    trainer.reward_func_names = ["constant"]
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h["kept_fraction"] for h in trainer.state.log_history if "kept_fraction" in h]
    assert logged == [0.25, 0.25]  # one image of four: the smallest micro-batch, never an empty one


def _count_forwards(trainer):
    """Rows of every transformer forward, in order."""
    rows = []
    trainer.model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    return rows


def test_detached_uncond_is_reused_from_sampling_while_the_weights_are_unchanged(tmp_path):
    trainer = _trainer(
        tmp_path, guidance_scale=4.5, cfg_uncond_gradient=False, num_iterations=2, max_steps=2, beta=0.0,
    )  # fmt: skip
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    steps = batch["train_steps"]
    assert batch["uncond"].shape == (4, len(steps), *batch["latents"].shape[2:])
    assert batch["sampled_at"] == 0

    # the recorded unconditional velocity is what a fresh forward at those weights gives
    j = steps[0]
    with torch.no_grad():
        fresh = trainer.adapter.predict_velocity(
            batch["latents"][:, j], batch["timesteps"][j], batch["embeddings"], batch["rows"],
            guidance_scale=4.5, return_uncond=True, transformer=trainer.model,
        )[1]  # fmt: skip
    torch.testing.assert_close(batch["uncond"][:, 0], fresh, rtol=1e-4, atol=1e-5)

    # on unchanged weights the cached and the recomputed uncond give the same gradient, with half the rows
    rows = _count_forwards(trainer)
    cached = _step_gradients(trainer, batch, j)
    assert rows == [4]  # the conditional half only
    batch["sampled_at"] = -1  # as after an optimizer step: recompute without gradients
    rows.clear()
    recomputed = _step_gradients(trainer, batch, j)
    assert rows == [4, 4]  # the unconditional half without gradients, then the conditional one
    assert any(g.abs().max() > 0 for g in cached.values())
    for name in cached:
        torch.testing.assert_close(cached[name], recomputed[name], rtol=1e-3, atol=1e-7)


def test_cache_is_not_used_after_an_optimizer_step(tmp_path):
    trainer = _trainer(
        tmp_path, guidance_scale=4.5, cfg_uncond_gradient=False, num_iterations=2, max_steps=2, beta=0.0,
    )  # fmt: skip
    rows = _count_forwards(trainer)
    trainer.train()
    # sampling: 4 steps × 8 rows (both halves); iteration 1: 3 trained steps × 4 rows (cached uncond);
    # iteration 2, after the optimizer step: 3 × (4 without gradients + 4 with)
    assert rows == [8] * 4 + [4] * 3 + [4, 4] * 3


def test_async_rewards_run_while_the_sync_ones_compute(tmp_path):
    import asyncio
    import threading

    started, events = threading.Event(), []

    async def slow_remote(prompts, images, **kwargs):
        started.set()
        await asyncio.sleep(0.2)
        events.append("async done")
        return [0.0] * len(prompts)

    def local(prompts, images, **kwargs):
        assert started.wait(5)  # the async reward was already running
        events.append("sync done")
        return brightness(prompts, images)

    trainer = _trainer(tmp_path)
    trainer.reward_funcs, trainer.reward_func_names = [local, slow_remote], ["local", "slow_remote"]
    trainer.reward_weights = torch.ones(2)
    trainer.train()
    assert events == ["sync done", "async done"]


def test_a_failing_async_reward_is_named(tmp_path):
    async def broken(prompts, images, **kwargs):
        raise ConnectionError("server gone")

    trainer = _trainer(tmp_path)
    trainer.reward_funcs, trainer.reward_func_names = [broken], ["broken"]
    with pytest.raises(RuntimeError, match="Reward function 'broken' raised ConnectionError") as info:
        trainer.train()
    assert isinstance(info.value.__cause__, ConnectionError)
