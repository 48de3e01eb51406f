"""Pipeline adapters and rollouts: the deterministic sampler reproduces each diffusers pipeline."""

import pytest
import torch

from trl_intrinsic import testing
from trl_intrinsic.flow import sde_step_with_logprob
from trl_intrinsic.flow.pipelines import get_flow_adapter
from trl_intrinsic.flow.rollout import sample_trajectories, sde_window, train_step_indices

PROMPTS = ["a red circle", "two blue squares"]
G = 2
SIZE = 32
STEPS = 4


def _factories():
    factories = [("sd3", testing.tiny_sd3_pipeline, 4.5, {}, {})]
    if hasattr(testing, "tiny_flux_pipeline"):
        factories.append(("flux", testing.tiny_flux_pipeline, 3.5, {"max_sequence_length": 16}, {}))
    if hasattr(testing, "tiny_sana_pipeline"):
        factories.append(("sana", testing.tiny_sana_pipeline, 4.5, {}, {"use_resolution_binning": False}))
    return factories


@pytest.fixture(params=_factories(), ids=lambda f: f[0])
def pipeline_case(request):
    name, factory, guidance, call_kwargs, pipe_only_kwargs = request.param
    return name, factory(), guidance, call_kwargs, pipe_only_kwargs


def _deterministic_rollout(adapter, guidance, call_kwargs, seed):
    embeddings = adapter.encode_prompts(PROMPTS, negative_prompt="", **call_kwargs)
    rows = torch.arange(len(PROMPTS)).repeat_interleave(G)
    noise = adapter.prepare_latents(len(rows), SIZE, SIZE, torch.Generator().manual_seed(seed))
    sigmas, timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    return sample_trajectories(
        adapter, embeddings, rows, noise, sigmas, timesteps,
        sde_steps=sde_window(STEPS), guidance_scale=guidance, noise_level=0.0,
    )  # fmt: skip


def test_noise_level_zero_reproduces_the_pipeline(pipeline_case):
    _, pipe, guidance, call_kwargs, pipe_only = pipeline_case
    expected = pipe(
        PROMPTS, num_images_per_prompt=G, num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE,
        width=SIZE, generator=torch.Generator().manual_seed(3), output_type="latent", **call_kwargs, **pipe_only,
    ).images  # fmt: skip
    rollout = _deterministic_rollout(get_flow_adapter(pipe), guidance, call_kwargs, seed=3)
    assert rollout.final_latents.shape == expected.shape
    torch.testing.assert_close(rollout.final_latents, expected.float(), rtol=0, atol=2e-5)
    assert torch.all(rollout.log_probs == 0)


def test_decode_matches_the_pipeline_images(pipeline_case):
    _, pipe, guidance, call_kwargs, pipe_only = pipeline_case
    expected = pipe(
        PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
        generator=torch.Generator().manual_seed(5), output_type="np", **call_kwargs, **pipe_only,
    ).images  # fmt: skip
    adapter = get_flow_adapter(pipe)
    embeddings = adapter.encode_prompts(PROMPTS[:1], negative_prompt="", **call_kwargs)
    noise = adapter.prepare_latents(1, SIZE, SIZE, torch.Generator().manual_seed(5))
    sigmas, timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    rollout = sample_trajectories(
        adapter, embeddings, torch.zeros(1, dtype=torch.long), noise, sigmas, timesteps,
        sde_steps=[], guidance_scale=guidance, noise_level=0.0,
    )  # fmt: skip
    (image,) = adapter.decode(rollout.final_latents, SIZE, SIZE)
    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    ours = torch.tensor(list(image.getdata()), dtype=torch.float32).view(SIZE, SIZE, 3) / 255
    assert (ours - torch.from_numpy(expected[0]).float()).abs().max() <= 1 / 255 + 1e-6


def test_stored_transitions_recompute_the_sampled_log_probs(pipeline_case):
    _, pipe, guidance, call_kwargs, _ = pipeline_case
    adapter = get_flow_adapter(pipe)
    embeddings = adapter.encode_prompts(PROMPTS, negative_prompt="", **call_kwargs)
    rows = torch.arange(len(PROMPTS)).repeat_interleave(G)
    noise = adapter.prepare_latents(len(rows), SIZE, SIZE, torch.Generator().manual_seed(0))
    sigmas, timesteps = adapter.set_timesteps(STEPS, SIZE, SIZE)
    window = sde_window(STEPS)
    rollout = sample_trajectories(
        adapter, embeddings, rows, noise, sigmas, timesteps, sde_steps=window, guidance_scale=guidance,
        noise_level=0.7, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert window == list(range(STEPS - 1))
    assert torch.all(rollout.log_probs[:, -1] == 0), "the terminal step must be deterministic"
    assert torch.all(rollout.log_probs[:, :-1] != 0)
    for j in window:
        velocity = adapter.predict_velocity(
            rollout.latents[:, j], timesteps[j], embeddings, rows, guidance_scale=guidance
        )
        step = sde_step_with_logprob(
            velocity, rollout.latents[:, j], sigmas[j], sigmas[j + 1], noise_level=0.7,
            prev_sample=rollout.latents[:, j + 1], sigma_max=sigmas[1],
        )  # fmt: skip
        ratio = torch.exp(step.log_prob - rollout.log_probs[:, j])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)


def test_guidance_runs_one_batched_forward():
    pipe = testing.tiny_sd3_pipeline()
    adapter = get_flow_adapter(pipe)
    embeddings = adapter.encode_prompts(PROMPTS, negative_prompt="")
    batch_sizes = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, k, out: batch_sizes.append(k["hidden_states"].shape[0]), with_kwargs=True
    )
    x = torch.randn(3, 4, 4, 4)
    rows = torch.tensor([0, 1, 1])
    guided = adapter.predict_velocity(x, torch.full((3,), 500.0), embeddings, rows, guidance_scale=5.0)
    conditional = adapter.predict_velocity(
        x, torch.full((3,), 500.0), embeddings, rows, guidance_scale=5.0, conditional=True
    )
    handle.remove()
    assert batch_sizes == [6, 3]
    uncond = adapter.predict_velocity(
        x, torch.full((3,), 500.0), adapter.encode_prompts([""] * 2), rows, guidance_scale=1.0
    )
    torch.testing.assert_close(guided, uncond + 5.0 * (conditional - uncond), rtol=1e-5, atol=1e-5)


def test_detached_unconditional_half_trains_the_conditional_prediction_only():
    # Flow-GRPO's reference: v = sg(v_u) + w·(v_c − sg(v_u)), so ∂v/∂θ = w·∂v_c/∂θ; the value is unchanged.
    pipe = testing.tiny_sd3_pipeline()
    adapter = get_flow_adapter(pipe)
    pipe.transformer.requires_grad_(True)
    embeddings = adapter.encode_prompts(PROMPTS, negative_prompt="")
    x, rows, t = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 1]), torch.full((3,), 500.0)
    weight = next(p for p in pipe.transformer.parameters() if p.ndim == 2)

    def gradient(**kwargs):
        pipe.transformer.zero_grad()
        velocity = adapter.predict_velocity(x, t, embeddings, rows, guidance_scale=5.0, **kwargs)
        (velocity * torch.linspace(-1, 1, velocity.numel()).view_as(velocity)).sum().backward()
        return velocity.detach(), weight.grad.clone()

    full_value, full_grad = gradient()
    detached_value, detached_grad = gradient(detach_uncond=True)
    _, conditional_grad = gradient(conditional=True)
    torch.testing.assert_close(detached_value, full_value)
    torch.testing.assert_close(detached_grad, 5.0 * conditional_grad, rtol=1e-4, atol=1e-6)
    assert (full_grad - detached_grad).abs().max() > 1e-6


def test_unique_prompts_are_encoded_once():
    pipe = testing.tiny_sd3_pipeline()
    adapter = get_flow_adapter(pipe)
    embeddings = adapter.encode_prompts(["a", "b"], negative_prompt="")
    assert embeddings.num_prompts == 2
    assert embeddings.uncond["encoder_hidden_states"].shape[0] == 1
    rows = embeddings.rows(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(rows["pooled_projections"][0], embeddings.cond["pooled_projections"][1])


def test_non_flow_scheduler_is_rejected():
    from diffusers import EulerDiscreteScheduler

    pipe = testing.tiny_sd3_pipeline()
    pipe.scheduler = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="flow-matching"):
        get_flow_adapter(pipe)


def test_unsupported_pipeline_is_a_type_error():
    from diffusers import DiffusionPipeline

    with pytest.raises(TypeError, match="register_flow_adapter"):
        get_flow_adapter(DiffusionPipeline())


def test_sde_window_default_and_fast_window():
    assert sde_window(10) == list(range(9))
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        window = sde_window(10, window_size=2, window_range=(0, 5), generator=generator)
        assert (
            len(window) == 2
            and window[0] >= 0
            and window[-1] <= 4
            and window == list(range(window[0], window[0] + 2))
        )
        starts.add(window[0])
    assert starts == {0, 1, 2, 3}
    a = sde_window(10, window_size=3, generator=torch.Generator().manual_seed(7))
    b = sde_window(10, window_size=3, generator=torch.Generator().manual_seed(7))
    assert a == b
    with pytest.raises(ValueError, match="sde_window_size"):
        sde_window(10, window_size=6, window_range=(0, 5))
    with pytest.raises(ValueError, match="sde_window_range"):
        sde_window(10, window_size=2, window_range=(0, 10))


def test_train_step_indices_prefix_and_suffix():
    window = list(range(9))
    assert train_step_indices(window, 1.0) == window
    assert train_step_indices(window, 0.6, "suffix") == [3, 4, 5, 6, 7, 8]  # ceil(0.6 * 9) = 6 later steps
    assert train_step_indices(window, 0.5, "prefix") == [0, 1, 2, 3, 4]
    assert train_step_indices(window, 0.01) == [0]
    with pytest.raises(ValueError, match="timestep_fraction"):
        train_step_indices(window, 0.0)
    with pytest.raises(ValueError, match="timestep_selection"):
        train_step_indices(window, 0.5, "middle")
