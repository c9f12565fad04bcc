"""Calibration: the fitted temperature is the true one, and ECE falls after fitting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiergate import ConfigError, FormatError
from tiergate.calibration import (
    Calibrator,
    expected_calibration_error,
    fit_scaling,
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
        ({"method": "temperature", "temperature": -1.0}, "must be a positive finite"),
        ({"method": "temperature", "temperature": float("inf")}, "must be a positive finite"),
        ("temperature", "must name a method"),
        # A damaged manifest must fail the load, not every request (or none, silently).
        ({"method": "platt", "a": float("nan"), "b": 0.0}, "platt a must be a finite"),
        ({"method": "platt", "a": 1.0, "b": "zero"}, "platt b must be a finite"),
        ({"method": "isotonic", "x": "abc", "y": [1]}, "lists of numbers of one length"),
        ({"method": "isotonic", "x": [0.1, 0.9], "y": [0.5]}, "lists of numbers of one length"),
        ({"method": "isotonic", "x": [0.1, 0.9], "y": [5, 5]}, r"y must lie in \[0, 1\]"),
        ({"method": "isotonic", "x": [0.9, 0.1], "y": [0.2, 0.8]}, "must not decrease"),
    ],
)
def test_broken_calibration_entries_are_rejected(raw: object, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Calibrator.from_json(raw, "manifest.json: tiers.linear")


def test_out_of_scope_bias_is_recovered_with_the_temperature() -> None:
    """Labels drawn from softmax(z / 2 + 1.5 on column 0): the fit finds T=2, bias=1.5."""
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=4.0, size=(8000, 6))
    truth = Calibrator("temperature", {"temperature": 2.0, "bias_index": 0, "bias": 1.5})
    p = truth.probabilities(logits)
    y = np.array([rng.choice(6, p=row) for row in p])
    t, bias = fit_scaling(logits, y, bias_index=0)
    assert t == pytest.approx(2.0, rel=0.1)
    assert bias == pytest.approx(1.5, abs=0.2)
    # without the bias the same data is fitted worse: the bias is doing work
    cal = Calibrator.fit(logits, y, "temperature", bias_index=0)
    plain = Calibrator.fit(logits, y, "temperature")
    nll = [-np.log(c.probabilities(logits)[np.arange(len(y)), y]).mean() for c in (cal, plain)]
    assert nll[0] < nll[1] - 0.01
    # a bias column absent from the labels cannot be fitted: plain temperature then
    assert fit_scaling(logits, np.where(y == 0, 1, y), bias_index=0)[1] == 0.0


def test_mix_weight_rewards_an_informative_second_opinion_only() -> None:
    rng = np.random.default_rng(8)
    n, k = 6000, 10
    y = rng.integers(0, k, n)
    # two classifiers that see the true class through independent noise
    a = rng.normal(size=(n, k))
    b = rng.normal(size=(n, k))
    a[np.arange(n), y] += 2.0
    b[np.arange(n), y] += 2.0
    pb = softmax(b)
    cal = Calibrator.fit(a, y, "temperature", mix_with=pb)
    assert 0.2 <= cal.mix <= 0.8
    mixed = cal.probabilities(a, pb)
    alone = softmax(a, cal.temperature)
    assert (mixed.argmax(1) == y).mean() > (alone.argmax(1) == y).mean()
    # pure noise as the second opinion gets no weight
    noise = softmax(rng.normal(size=(n, k)))
    assert Calibrator.fit(a, y, "temperature", mix_with=noise).mix == 0.0
    with pytest.raises(ConfigError, match="mixes in"):
        cal.probabilities(a)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"method": "temperature", "temperature": 1.0, "bias_index": 3}, "go together"),
        (
            {"method": "temperature", "temperature": 1.0, "bias_index": 9, "bias": 1.0},
            "not a label",
        ),
        ({"method": "temperature", "temperature": 1.0, "bias_index": 1, "bias": "x"}, "numbers"),
        ({"method": "temperature", "temperature": 1.0, "mix": 1.5}, "mix must be"),
    ],
)
def test_broken_bias_and_mix_entries_are_rejected(raw: object, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Calibrator.from_json(raw, "manifest.json: tiers.intent", n_labels=5)


def test_calibration_methods_per_tier_are_parsed_and_checked() -> None:
    from tiergate.calibration import parse_methods

    assert parse_methods("platt") == ("platt", {})
    assert parse_methods("linear=platt, intent=isotonic") == (
        "temperature",
        {"linear": "platt", "intent": "isotonic"},
    )
    for bad, message in (
        ("softmax", "must be one of"),
        ("rules=platt", "unknown tier 'rules'"),
        ("linear=plat", "'plat' is not one of"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_methods(bad)


def test_train_uses_the_method_given_for_each_tier(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "serve/tiergate/examples/intents.jsonl"
    out = tmp_path / "b"
    run = subprocess.run(
        [sys.executable, "-m", "tiergate", "train", "--data", str(examples), "--out", str(out),
         "--no-intent", "--quiet", "--calibration", "linear=platt"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tiers"]["linear"]["calibration"]["method"] == "platt"
    bad = subprocess.run(
        [sys.executable, "-m", "tiergate", "train", "--data", str(examples), "--out",
         str(tmp_path / "c"), "--no-intent", "--calibration", "linear=best"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "'best' is not one of" in bad.stderr


@pytest.mark.parametrize(
    "raw",
    [
        {"method": "temperature", "temperature": 1.7},
        {"method": "temperature", "temperature": 0.8, "bias_index": 2, "bias": 1.25},
        {"method": "temperature", "temperature": 1.3, "bias_index": 0, "bias": -0.5, "mix": 0.3},
        {"method": "platt", "a": 1.4, "b": -0.2, "temperature": 1.1},
        {"method": "isotonic", "x": [0.0, 0.4, 0.7, 1.0], "y": [0.0, 0.3, 0.8, 1.0]},
    ],
)
def test_one_row_at_a_time_agrees_with_the_batch_path(raw: dict[str, object]) -> None:
    """The front end calibrates one row with Calibrator.one: the same distribution,
    class and confidence as probabilities and apply_probabilities on a batch."""
    cal = Calibrator.from_json(raw, "test", n_labels=6)
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=4.0, size=(50, 6))
    before = logits.copy()
    other = softmax(rng.normal(size=(50, 6))).astype(np.float32)  # the linear tier's
    mix = other if cal.mix > 0 else None
    probs = cal.probabilities(logits, mix)
    pred, conf = cal.apply_probabilities(probs)
    for i in range(len(logits)):
        row, p, c = cal.one(logits[i], None if mix is None else mix[i])
        np.testing.assert_array_equal(row, probs[i])  # the same numbers, to the bit
        assert p == pred[i]
        assert c == conf[i]
    np.testing.assert_array_equal(logits, before)  # the rows passed in: left as they were
    if cal.mix > 0:
        with pytest.raises(ConfigError, match="mixes in"):
            cal.one(logits[0])
