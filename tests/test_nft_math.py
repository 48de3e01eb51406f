"""DiffusionNFT maths (trl_intrinsic.flow.nft) against hand computations on fixed small tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_intrinsic.ema import ema_update_
from trl_intrinsic.flow.nft import (
    REFERENCE_DECAY_SCHEDULES,
    forward_noise,
    kl_to_reference,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    sample_nft_timesteps,
)

# Three samples of shape (2, 2): fixed numbers, no randomness.
X0 = np.array(
    [[[0.5, -1.0], [0.25, 2.0]], [[-0.75, 0.1], [1.5, -0.3]], [[0.0, 0.8], [-1.2, 0.6]]], dtype=np.float64
)
EPS = np.array(
    [[[1.0, 0.2], [-0.6, 0.4]], [[-0.9, 1.3], [0.7, -1.1]], [[0.3, -0.5], [1.6, -0.2]]], dtype=np.float64
)
V_OLD = np.array(
    [[[0.4, 1.1], [-0.8, -1.5]], [[-0.2, 1.0], [-0.9, -0.7]], [[0.5, -1.4], [2.5, -0.9]]], dtype=np.float64
)
V_THETA = V_OLD + np.array(
    [[[0.3, -0.2], [0.1, 0.5]], [[-0.4, 0.25], [0.2, -0.1]], [[0.15, 0.35], [-0.3, 0.05]]], dtype=np.float64
)
T = np.array([0.9, 0.45, 0.1], dtype=np.float64)


def _t(array: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


def _expected_loss(r, beta, adaptive, rescale=True, adv_clip_max=5.0, v_theta=V_THETA):
    """The reference's computation, written out sample by sample with numpy."""
    per_sample = []
    for i in range(X0.shape[0]):
        x0, eps, t = X0[i], EPS[i], T[i]
        x_t = (1 - t) * x0 + t * eps
        v = eps - x0
        v_pos = beta * v_theta[i] + (1 - beta) * V_OLD[i]
        v_neg = (1 + beta) * V_OLD[i] - beta * v_theta[i]
        terms = []
        for v_pm in (v_pos, v_neg):
            if adaptive:
                err = (x_t - t * v_pm) - x0
                terms.append(np.mean(err**2) / max(np.mean(np.abs(err)), 1e-5))
            else:
                terms.append(np.mean((v_pm - v) ** 2))
        per_sample.append(r[i] * terms[0] + (1 - r[i]) * terms[1])
    loss = float(np.mean(per_sample))
    return loss * adv_clip_max / beta if rescale else loss


def _module_loss(r, beta, adaptive, rescale=True, grad=False):
    v_theta = _t(V_THETA, grad=grad)
    loss, stats = nft_loss(
        v_theta,
        _t(V_OLD),
        _t(EPS - X0),
        _t(T),
        _t(np.asarray(r, dtype=np.float64)),
        beta,
        adaptive_weighting=adaptive,
        rescale=rescale,
    )
    return loss, stats, v_theta


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("r_value", [0.0, 0.5, 1.0])
def test_loss_matches_hand_computation(r_value, beta, adaptive):
    r = [r_value] * 3
    loss, stats, _ = _module_loss(r, beta, adaptive)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert loss.item() == pytest.approx(_expected_loss(r, beta, adaptive), rel=1e-10)
    assert stats["unscaled_loss"].item() == pytest.approx(
        _expected_loss(r, beta, adaptive, rescale=False), rel=1e-10
    )
    assert stats["r_mean"].item() == pytest.approx(r_value)


@pytest.mark.parametrize("adaptive", [True, False])
def test_mixed_r_and_no_rescale(adaptive):
    r = [0.0, 0.3, 1.0]
    loss, _, _ = _module_loss(r, 0.4, adaptive, rescale=False)
    assert loss.item() == pytest.approx(_expected_loss(r, 0.4, adaptive, rescale=False), rel=1e-10)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_gradient_vanishes_on_policy_with_half_optimality(beta, adaptive):
    v_theta = _t(V_OLD, grad=True)
    r = torch.full((3,), 0.5, dtype=torch.float64)
    loss, _ = nft_loss(v_theta, _t(V_OLD), _t(EPS - X0), _t(T), r, beta, adaptive_weighting=adaptive)
    (grad,) = torch.autograd.grad(loss, v_theta)
    assert grad.abs().max().item() < 1e-12
    # ...while a positive sample does pull v_θ.
    loss, _ = nft_loss(v_theta, _t(V_OLD), _t(EPS - X0), _t(T), torch.ones(3, dtype=torch.float64), beta)
    (grad,) = torch.autograd.grad(loss, v_theta)
    assert grad.abs().max().item() > 1e-3


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_positive_only_is_flow_matching_towards_the_positive_policy(beta, adaptive):
    loss, _, v_theta = _module_loss([1.0] * 3, beta, adaptive, rescale=False, grad=True)
    # Explicit flow-matching loss of v⁺ = (1 − β)·v_old + β·v_θ onto v = ε − x0.
    v_theta_fm = _t(V_THETA, grad=True)
    v_pos = (1 - beta) * _t(V_OLD) + beta * v_theta_fm
    v = _t(EPS - X0)
    t = _t(T).view(-1, 1, 1)
    if adaptive:
        x_t = (1 - t) * _t(X0) + t * _t(EPS)
        err = (x_t - t * v_pos) - _t(X0)
        norm = err.detach().abs().mean(dim=(1, 2), keepdim=True)
        fm = ((err**2) / norm).mean(dim=(1, 2)).mean()
    else:
        fm = ((v_pos - v) ** 2).mean()
    assert loss.item() == pytest.approx(fm.item(), rel=1e-10)
    (g_nft,) = torch.autograd.grad(loss, v_theta)
    (g_fm,) = torch.autograd.grad(fm, v_theta_fm)
    torch.testing.assert_close(g_nft, g_fm, rtol=1e-9, atol=1e-12)


def test_adaptive_weight_is_floored():
    # v⁺ = v exactly for sample 0: the x0 error is 0 and the normaliser falls back to the floor.
    target = _t(EPS - X0)
    v_theta = target.clone()
    loss, stats = nft_loss(
        v_theta, target, target, _t(T), torch.ones(3, dtype=torch.float64), 1.0, rescale=False
    )
    assert loss.item() == 0.0 and torch.isfinite(stats["negative_loss"])


def test_optimality_probability():
    adv = torch.tensor([0.0, 2.5, -2.5, 5.0, 7.0, -9.0, 1.0])
    r = optimality_probability(adv, adv_clip_max=5.0)
    np.testing.assert_allclose(r.numpy(), [0.5, 0.75, 0.25, 1.0, 1.0, 0.0, 0.6], rtol=1e-6)
    assert optimality_probability(torch.tensor([1.0]), adv_clip_max=1.0).item() == 1.0


def test_forward_noise_identities():
    x0, eps, t = _t(X0), _t(EPS), _t(T)
    x_t, v = forward_noise(x0, t, eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(x_t, x0 + t.view(-1, 1, 1) * v)
    torch.testing.assert_close(x_t[0], 0.1 * x0[0] + 0.9 * eps[0])
    ends, _ = forward_noise(x0[:2], torch.tensor([0.0, 1.0], dtype=torch.float64), eps[:2])
    torch.testing.assert_close(ends[0], x0[0])
    torch.testing.assert_close(ends[1], eps[1])
    assert forward_noise(x0.half(), t, eps.half())[0].dtype == torch.float32
    with pytest.raises(ValueError, match="noise"):
        forward_noise(x0, t, eps[:2])
    with pytest.raises(ValueError, match="`t`"):
        forward_noise(x0, t[:2], eps)


def test_sampler_timesteps():
    sigmas = torch.tensor([1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.278, 0.0089, 0.0])
    t = sample_nft_timesteps(64, torch.Generator().manual_seed(0), sigmas=sigmas, k=9)
    assert t.shape == (64, 9) and t.dtype == torch.float32
    pool = set(sigmas[:-1].tolist())
    assert all(value in pool for value in t.flatten().tolist())  # the terminal 0 is never drawn
    assert all(len(set(row)) == 9 for row in t.tolist())  # distinct within a sample
    again = sample_nft_timesteps(64, torch.Generator().manual_seed(0), sigmas=sigmas, k=9)
    torch.testing.assert_close(t, again)
    single = sample_nft_timesteps(5, torch.Generator().manual_seed(1), sigmas=sigmas.tolist())
    assert single.shape == (5,)
    with pytest.raises(ValueError, match="sigmas"):
        sample_nft_timesteps(4)
    with pytest.raises(ValueError, match="`k`"):
        sample_nft_timesteps(4, sigmas=sigmas, k=11)
    with pytest.raises(ValueError, match="sigmas"):
        sample_nft_timesteps(4, sigmas=sigmas * 1000)


def test_uniform_timesteps():
    t = sample_nft_timesteps(2000, torch.Generator().manual_seed(0), schedule="uniform")
    assert t.shape == (2000,) and t.min() >= 0.0 and t.max() < 1.0
    assert abs(t.mean().item() - 0.5) < 0.03
    u = sample_nft_timesteps(
        7, torch.Generator().manual_seed(3), schedule="uniform", t_min=0.2, t_max=0.4, k=2
    )
    shifted = sample_nft_timesteps(
        7, torch.Generator().manual_seed(3), schedule="uniform", t_min=0.2, t_max=0.4, k=2, shift=3.0
    )
    assert u.shape == (7, 2) and bool(((u >= 0.2) & (u < 0.4)).all())
    torch.testing.assert_close(shifted, 3 * u / (1 + 2 * u))
    with pytest.raises(ValueError, match="t_min"):
        sample_nft_timesteps(3, schedule="uniform", t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="schedule"):
        sample_nft_timesteps(3, schedule="logit_normal")  # type: ignore[arg-type]


def _reference_decay(step: int, decay_type: int) -> float:
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


@pytest.mark.parametrize(("name", "decay_type"), [("on_policy", 0), ("default", 1), ("ocr", 2)])
def test_old_policy_decay_matches_reference(name, decay_type):
    for step in (0, 1, 10, 74, 75, 76, 100, 208, 209, 250, 499, 500, 501, 5000):
        expected = _reference_decay(step, decay_type)
        assert old_policy_decay(step, **REFERENCE_DECAY_SCHEDULES[name]) == pytest.approx(expected, abs=1e-12)
    assert old_policy_decay(300) == pytest.approx(0.3)  # defaults = decay_type 1


def test_ema_update_matches_hand_computation():
    target = [
        torch.tensor([1.0, 2.0, -3.0], requires_grad=True),
        torch.tensor([[4.0, 0.0]], dtype=torch.float64),
    ]
    source = [torch.tensor([0.0, 4.0, 1.0]), torch.tensor([[2.0, 10.0]])]
    ema_update_(target, source, 0.25)
    torch.testing.assert_close(target[0].detach(), torch.tensor([0.25, 3.5, 0.0]))
    torch.testing.assert_close(target[1], torch.tensor([[2.5, 7.5]], dtype=torch.float64))
    assert target[0].grad is None
    ema_update_(target, source, 0.0)  # decay 0 copies the source
    torch.testing.assert_close(target[0].detach(), source[0])
    before = target[1].clone()
    ema_update_(target, source, 1.0)  # decay 1 keeps the target
    torch.testing.assert_close(target[1], before)
    with pytest.raises(ValueError, match="source_params"):
        ema_update_(target, source[:1], 0.5)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(target, source, 1.5)


def test_kl_to_reference():
    v_theta = _t(V_THETA, grad=True)
    kl = kl_to_reference(v_theta, _t(V_OLD))
    expected = [np.mean((V_THETA[i] - V_OLD[i]) ** 2) for i in range(3)]
    np.testing.assert_allclose(kl.detach().numpy(), expected, rtol=1e-12)
    (grad,) = torch.autograd.grad(kl.sum(), v_theta)
    torch.testing.assert_close(grad, 2 * (_t(V_THETA) - _t(V_OLD)) / 4)
    with pytest.raises(ValueError, match="v_ref"):
        kl_to_reference(v_theta, _t(V_OLD)[:2])


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, float("nan")])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match=r"`beta` must be in \(0, 1\], got .*reference"):
        _module_loss([0.5] * 3, beta, True)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"`adv_clip_max` must be .* got -1.0; the reference uses 5"):
        optimality_probability(torch.zeros(2), adv_clip_max=-1.0)
    args = (_t(V_THETA), _t(V_OLD), _t(EPS - X0), _t(T), torch.full((3,), 0.5, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"`adv_clip_max` .* got -2"):
        nft_loss(*args, adv_clip_max=-2)
    with pytest.raises(ValueError, match=r"`v_old` must have the shape .* got \(2, 2, 2\); evaluate"):
        nft_loss(args[0], args[1][:2], *args[2:])
    with pytest.raises(ValueError, match=r"`target` must have the shape"):
        nft_loss(args[0], args[1], args[2][..., :1], *args[3:])
    with pytest.raises(ValueError, match=r"`t` must have shape \(batch,\) = \(3,\), got \(3, 1\)"):
        nft_loss(*args[:3], args[3].view(3, 1), *args[4:])
    with pytest.raises(ValueError, match=r"`r` must lie in \[0, 1\].*optimality_probability"):
        nft_loss(*args[:4], torch.tensor([0.5, 1.5, 0.0], dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"`t` must lie in \[0, 1\].*×1000"):
        nft_loss(*args[:3], args[3] * 1000, *args[4:])
    with pytest.raises(ValueError, match=r"`step` must be an int ≥ 0, got -1"):
        old_policy_decay(-1)
    with pytest.raises(ValueError, match=r"`max_decay` must be in \[0, 1\], got 2"):
        old_policy_decay(3, max_decay=2)
