import pytest

import trl_intrinsic


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        trl_intrinsic.no_such_name  # noqa: B018


def test_version_matches_distribution_metadata():
    from importlib.metadata import version

    assert version("trl-intrinsic") == trl_intrinsic.__version__
