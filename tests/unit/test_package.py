"""The package imports and exposes its error hierarchy."""

import pytest

import tiergate


def test_errors_form_one_hierarchy_under_value_error() -> None:
    for cls in (tiergate.ConfigError, tiergate.InputError, tiergate.FormatError):
        assert issubclass(cls, tiergate.TiergateError)
        assert issubclass(cls, ValueError)
    with pytest.raises(ValueError, match="boom"):
        raise tiergate.InputError("boom")


def test_version_and_limits_are_exported() -> None:
    assert tiergate.__version__.count(".") == 2
    assert tiergate.DEFAULT_MAX_TEXT_BYTES == 1 << 20
