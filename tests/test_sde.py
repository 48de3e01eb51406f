import math

import pytest
import torch

from trl_intrinsic.flow import sde_step_with_logprob


def _inputs(batch=3, shape=(4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)


@pytest.mark.parametrize("sde_type", ["flow_sde", "cps"])
def test_zero_noise_is_the_euler_step(sde_type):
    v, x = _inputs()
    out = sde_step_with_logprob(v, x, 0.7, 0.4, noise_level=0.0, sde_type=sde_type)
    torch.testing.assert_close(out.prev_sample, x + v * (0.4 - 0.7), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_flow_sde_matches_the_formula_in_float64():
    v, x = _inputs()
    a, s, s2 = 0.7, 0.6, 0.45
    g = torch.Generator().manual_seed(1)
    out = sde_step_with_logprob(v, x, s, s2, noise_level=a, generator=g)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x64, v64, dt = x.double(), v.double(), s2 - s
    std = a * math.sqrt(s / (1 - s))
    mean = x64 * (1 + std**2 / (2 * s) * dt) + v64 * (1 + std**2 * (1 - s) / (2 * s)) * dt
    scale = std * math.sqrt(-dt)
    expected = mean + scale * eps.double()
    torch.testing.assert_close(out.prev_sample.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample_mean.double(), mean, rtol=1e-5, atol=1e-5)
    log_density = -(eps.double() ** 2) / 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob.double(), log_density.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    assert out.std_dev.flatten()[0].item() == pytest.approx(std, rel=1e-6)


def test_cps_matches_the_formula():
    v, x = _inputs()
    a, s, s2 = 0.7, 0.6, 0.45
    out = sde_step_with_logprob(
        v, x, s, s2, noise_level=a, sde_type="cps", generator=torch.Generator().manual_seed(2)
    )
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    std = s2 * math.sin(a * math.pi / 2)
    mean = (x - s * v) * (1 - s2) + (x + (1 - s) * v) * math.sqrt(s2**2 - std**2)
    torch.testing.assert_close(out.prev_sample, mean + std * eps, rtol=1e-5, atol=1e-5)
    log_density = -(eps**2) / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob, log_density.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # Coefficient preservation: (1 − σ')² scales x0, and the noise coefficients' squares add up to σ'².
    assert (s2**2 - std**2) + std**2 == pytest.approx(s2**2)


@pytest.mark.parametrize("sde_type", ["flow_sde", "cps"])
def test_recomputed_log_prob_equals_sampled_one(sde_type):
    v, x = _inputs()
    sampled = sde_step_with_logprob(v, x, 0.8, 0.5, noise_level=0.9, sde_type=sde_type)
    again = sde_step_with_logprob(
        v, x, 0.8, 0.5, noise_level=0.9, sde_type=sde_type, prev_sample=sampled.prev_sample
    )
    assert torch.equal(again.log_prob, sampled.log_prob)
    assert torch.equal(torch.exp(again.log_prob - sampled.log_prob), torch.ones(3))


def test_log_prob_gradient_flows_through_the_mean_only():
    v, x = _inputs()
    v.requires_grad_(True)
    out = sde_step_with_logprob(v, x, 0.8, 0.5, noise_level=0.7, prev_sample=torch.randn_like(x))
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_sigma_one_needs_sigma_max_and_uses_it():
    v, x = _inputs()
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_with_logprob(v, x, 1.0, 0.9, noise_level=0.7)
    out = sde_step_with_logprob(v, x, 1.0, 0.9, noise_level=0.7, sigma_max=0.9)
    assert out.std_dev.flatten()[0].item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.9)), rel=1e-6)


def test_per_sample_sigmas_and_per_row_generators():
    v, x = _inputs(batch=2)
    sig, nxt = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    both = sde_step_with_logprob(v, x, sig, nxt, noise_level=0.5, generator=gens)
    for i in range(2):
        one = sde_step_with_logprob(
            v[i : i + 1],
            x[i : i + 1],
            sig[i],
            nxt[i],
            noise_level=0.5,
            generator=[torch.Generator().manual_seed(i)],
        )
        torch.testing.assert_close(both.prev_sample[i : i + 1], one.prev_sample)
        torch.testing.assert_close(both.log_prob[i : i + 1], one.log_prob)


def test_cps_terminal_step_is_deterministic_and_finite():
    v, x = _inputs()
    out = sde_step_with_logprob(v, x, 0.3, 0.0, noise_level=0.7, sde_type="cps")
    torch.testing.assert_close(out.prev_sample, x - 0.3 * v)
    assert torch.equal(out.log_prob, torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"noise_level": -0.1}, "noise_level"), ({"noise_level": 0.5, "sde_type": "ddim"}, "sde_type")],
)
def test_bad_arguments(kwargs, field):
    v, x = _inputs()
    with pytest.raises(ValueError, match=field):
        sde_step_with_logprob(v, x, 0.5, 0.4, **kwargs)
    with pytest.raises(ValueError, match="sigma"):
        sde_step_with_logprob(v, x, torch.tensor([0.5, 0.4]), 0.3, noise_level=0.5)
