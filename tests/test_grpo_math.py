import numpy as np
import pytest
import torch

from trl_intrinsic.trainers.grpo_math import (
    clipped_policy_loss,
    combine_rewards,
    gaussian_mean_kl,
    group_advantages,
)


def test_group_advantages_match_numpy():
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    groups = torch.tensor([7, 7, 7, 2, 2, 2])
    adv = group_advantages(rewards, groups, scale_rewards="group")
    r = rewards.numpy().reshape(2, 3)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv.numpy(), expected.ravel(), rtol=1e-5)


def test_batch_std_and_none():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    centered = np.array([-1.0, 1.0, -2.0, 2.0])
    batch = group_advantages(rewards, groups, scale_rewards="batch")
    # the std of the raw rewards of the batch (Flow-GRPO's global_std), not of the within-group residuals
    np.testing.assert_allclose(batch.numpy(), centered / (rewards.numpy().std() + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(group_advantages(rewards, groups, scale_rewards="none").numpy(), centered)
    np.testing.assert_allclose(group_advantages(rewards, groups, scale_rewards=False).numpy(), centered)


def test_nan_rewards_are_ignored():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 1]), scale_rewards="group")
    assert adv[1] == 0 and adv[3] == 0
    assert adv[0] == pytest.approx(-1 / (1 + 1e-4)) and adv[2] == pytest.approx(1 / (1 + 1e-4))


def test_group_order_does_not_matter():
    rewards = torch.randn(12)
    groups = torch.arange(12) % 3
    perm = torch.randperm(12)
    adv = group_advantages(rewards, groups, scale_rewards="group")
    torch.testing.assert_close(
        group_advantages(rewards[perm], groups[perm], scale_rewards="group"), adv[perm]
    )


def test_bad_scale_rewards():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(2), torch.zeros(2), scale_rewards="global")


def test_clipped_loss_on_policy_is_minus_mean_advantage():
    logp = torch.randn(5, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5, 9.0, -9.0])
    loss, stats = clipped_policy_loss(
        logp, logp.detach(), adv, epsilon_low=0.2, epsilon_high=0.2, adv_clip_max=5.0
    )
    assert loss.item() == pytest.approx(-adv.clamp(-5, 5).mean().item())
    assert torch.equal(stats["ratio"], torch.ones(5)) and not stats["clipped"].any()
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv.clamp(-5, 5) / 5)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(2)
    logp = torch.log(torch.tensor([1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = clipped_policy_loss(logp, old, adv, epsilon_low=0.2, epsilon_high=0.2)
    loss.backward()
    assert stats["clipped"].all()
    assert torch.equal(logp.grad, torch.zeros(2))
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_gaussian_mean_kl():
    mean = torch.zeros(2, 3)
    ref = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    std = torch.tensor([[0.5], [1.0]])
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std), torch.tensor([2.0, 4.0 / 2 / 3]))
    assert torch.equal(gaussian_mean_kl(mean, mean, std), torch.zeros(2))


def test_combine_rewards_sum_then_normalize_is_group_advantage_of_weighted_sum():
    rewards = torch.tensor([[1.0, 10.0], [2.0, 30.0], [0.0, 20.0], [4.0, 20.0]])
    groups = torch.tensor([0, 0, 1, 1])
    weights = torch.tensor([1.0, 0.1])
    advantages, summed = combine_rewards(rewards, weights, groups, scale_rewards="group")
    torch.testing.assert_close(summed, torch.tensor([2.0, 5.0, 2.0, 6.0]))
    torch.testing.assert_close(advantages, group_advantages(summed, groups, scale_rewards="group"))


def test_combine_rewards_normalize_then_sum_equalises_reward_scales():
    # The second reward is 1000x larger; normalised per reward, both contribute alike.
    first = torch.tensor([0.0, 1.0, 0.0, 1.0])
    rewards = torch.stack([first, 1000 * (1 - first)], dim=1)
    groups = torch.tensor([0, 0, 1, 1])
    advantages, _ = combine_rewards(
        rewards, torch.tensor([2.0, 1.0]), groups, aggregation="normalize_then_sum"
    )
    expected = (first - 0.5) * 2
    assert torch.all(torch.sign(advantages) == torch.sign(expected))
    torch.testing.assert_close(advantages.abs(), torch.ones(4), atol=1e-3, rtol=0)
    # sum-then-normalise would be dominated by the large reward instead
    dominated, _ = combine_rewards(rewards, torch.tensor([2.0, 1.0]), groups)
    assert torch.all(torch.sign(dominated) == -torch.sign(expected))


def test_combine_rewards_skips_none_and_zeroes_unscored_rows():
    nan = float("nan")
    rewards = torch.tensor([[1.0, nan], [3.0, 1.0], [nan, nan], [0.0, 0.0]])
    groups = torch.tensor([0, 0, 1, 1])
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        advantages, summed = combine_rewards(rewards, torch.ones(2), groups, aggregation=aggregation)
        assert advantages[2] == 0 and torch.isnan(summed[2])
        assert torch.isfinite(advantages).all()
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        combine_rewards(rewards, torch.ones(2), groups, aggregation="mean")
    with pytest.raises(ValueError, match="rewards_per_func"):
        combine_rewards(rewards, torch.ones(3), groups)
