import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from trl_intrinsic.autoregressive.self_certainty import self_certainty, sequence_mean
from trl_intrinsic.rewards.nsc import nsc_reward, self_certainty_reward


def _reference(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ p) written from the definition, in float64."""
    z = logits.double()
    log_p = torch.log_softmax(z, dim=-1)
    vocab = z.shape[-1]
    return (-math.log(vocab) - log_p.mean(dim=-1)).to(torch.float64)


@pytest.mark.parametrize("vocab", [2, 3, 17, 1000, 16_384, 102_400])
def test_matches_float64_definition(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(2, 3, vocab) * 4.0 + torch.linspace(-3, 3, vocab)
    got = self_certainty(logits)
    assert got.shape == (2, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(logits), rtol=1e-5, atol=1e-5)


def test_uniform_is_zero_and_peaked_is_log_v():
    vocab = 50
    assert torch.allclose(self_certainty(torch.full((4, vocab), 3.7)), torch.zeros(4), atol=1e-6)
    # A one-hot distribution in the limit: SC → −log V − mean log p, which diverges; use a finite peak.
    logits = torch.zeros(vocab)
    logits[0] = 1e3
    expected = torch.logsumexp(logits.double(), 0) - logits.double().mean() - math.log(vocab)
    assert self_certainty(logits).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
def test_chunked_equals_unchunked(chunk_size):
    logits = torch.randn(3, 11, 257) * 2
    full = self_certainty(logits, chunk_size=10_000)
    torch.testing.assert_close(self_certainty(logits, chunk_size=chunk_size), full, rtol=0, atol=0)


def test_bf16_and_non_contiguous_inputs():
    logits = torch.randn(2, 9, 300) * 3
    sliced = logits.to(torch.bfloat16)[:, :-1]
    assert not sliced.is_contiguous()
    torch.testing.assert_close(
        self_certainty(sliced, chunk_size=4).double(), _reference(sliced.float()), rtol=1e-5, atol=1e-5
    )


def test_mask_zeroes_positions_and_sequence_mean():
    logits = torch.randn(2, 5, 40)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    got = self_certainty(logits, mask, chunk_size=2)
    ref = _reference(logits).float()
    assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(got[mask], ref[mask])
    means = sequence_mean(got, mask)
    torch.testing.assert_close(means, torch.stack([ref[0, :2].mean(), ref[1, :4].mean()]))
    assert sequence_mean(got, torch.zeros_like(mask)).tolist() == [0.0, 0.0]


def test_peak_memory_is_one_chunk():
    """No allocation larger than a (chunk, V) fp32 block, although the input is (T, V) bf16."""
    tokens, vocab, chunk = 128, 102_400, 8
    logits = torch.randn(1, tokens + 1, vocab, dtype=torch.bfloat16)[:, :-1]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        self_certainty(logits, chunk_size=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= chunk * vocab * 4
    assert largest < tokens * vocab * 2  # far below a full copy, even in bf16


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="logits"):
        self_certainty(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        self_certainty(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        self_certainty(torch.randn(2, 4), chunk_size=0)


def test_rewards_sign_and_names():
    sc = [0.5, 1.25, 0.0]
    assert nsc_reward(["a", "b", "c"], self_certainty=sc) == [-0.5, -1.25, -0.0]
    assert self_certainty_reward(completions=None, self_certainty=torch.tensor(sc)) == sc
    assert nsc_reward.__name__ == "nsc_reward"
    assert self_certainty_reward.__name__ == "self_certainty_reward"
    assert nsc_reward.requires_images is False and self_certainty_reward.requires_images is False
    assert not isinstance(nsc_reward, torch.nn.Module)
    with pytest.raises(ValueError, match="self_certainty"):
        nsc_reward(["a"])


def test_rewards_export_the_statistic_whatever_the_import_order():
    import trl_intrinsic.autoregressive.self_certainty
    import trl_intrinsic.rewards.nsc
    from trl_intrinsic import rewards

    assert rewards.self_certainty is self_certainty  # the function, never a module
    assert trl_intrinsic.autoregressive.self_certainty.self_certainty is self_certainty
