"""Calibration: the fitted temperature is the true one, and ECE falls after fitting."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate import FormatError
from tiergate.calibration import (
    Calibrator,
    expected_calibration_error,
    fit_temperature,
    reliability_table,
    softmax,
)


def sampled(n: int, classes: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits / temperature): calibrated at that T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=4.0, size=(n, classes))
    p = softmax(logits, temperature)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return logits, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_temperature_fit_recovers_the_generating_temperature(true_t: float) -> None:
    logits, y = sampled(6000, 8, true_t, seed=1)
    assert fit_temperature(logits, y) == pytest.approx(true_t, rel=0.1)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_every_method_lowers_ece_of_an_overconfident_model(method: str) -> None:
    logits, y = sampled(8000, 10, 3.0, seed=2)  # treating T=1 as truth is overconfident
    fit_logits, fit_y, test_logits, test_y = logits[:4000], y[:4000], logits[4000:], y[4000:]
    raw = softmax(test_logits)
    before = expected_calibration_error(raw.max(axis=1), raw.argmax(axis=1) == test_y)
    cal = Calibrator.fit(fit_logits, fit_y, method)  # type: ignore[arg-type]
    pred, conf = cal.apply(test_logits)
    after = expected_calibration_error(conf, pred == test_y)
    assert before > 0.15
    assert after < 0.03
    # serialisation round trip gives identical confidences
    again = Calibrator.from_json(cal.to_json(), "test")
    assert np.allclose(again.apply(test_logits)[1], conf)


def test_ece_is_zero_when_confidence_matches_accuracy_per_bin() -> None:
    conf = np.array([0.9] * 10 + [0.6] * 5)
    correct = np.array([1] * 9 + [0] + [1] * 3 + [0] * 2)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    rows = reliability_table(conf, correct)
    assert [r["count"] for r in rows] == [5, 10]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "magic"}, "must name a method"),
        ({"method": "platt", "a": 1.0}, "lacks"),
        ({"method": "temperature", "temperature": -1.0}, "must be positive"),
        ("temperature", "must name a method"),
    ],
)
def test_broken_calibration_entries_are_rejected(raw: object, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Calibrator.from_json(raw, "manifest.json: tiers.linear")
