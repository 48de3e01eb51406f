import pytest

import trl_intrinsic


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        trl_intrinsic.no_such_name  # noqa: B018


def test_version_matches_distribution_metadata():
    from importlib.metadata import version

    assert version("trl-intrinsic") == trl_intrinsic.__version__


def test_reward_by_name_returns_the_exported_reward_and_lists_the_names_on_a_typo():
    from trl_intrinsic import rewards
    from trl_intrinsic.rewards import reward_by_name

    assert reward_by_name("nsc_reward") is rewards.nsc_reward
    assert reward_by_name("solace_reward") is rewards.solace_reward
    with pytest.raises(ValueError, match=r"Unknown reward name 'nsc'.*'nsc_reward'.*'verifier_reward'"):
        reward_by_name("nsc")
    with pytest.raises(ValueError, match="Unknown reward name 'self_certainty'"):
        reward_by_name("self_certainty")  # the statistic, not a reward
    with pytest.raises(ValueError, match="Unknown reward name 'SolaceReward'"):
        reward_by_name("SolaceReward")  # classes are configured and passed as objects
