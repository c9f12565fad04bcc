"""Confidence calibration: make "0.9 confident" mean "right 9 times in 10".

The gate compares a tier's top-1 confidence with a threshold, so only that
number has to be calibrated. Three methods, all fitted on held-out data:

- ``temperature`` (default): one scalar dividing the logits, fitted by
  minimising the negative log-likelihood. It keeps the ranking of classes and
  cannot overfit a small validation set.
- ``platt``: a logistic fit of correctness on the logit of the top-1 probability.
- ``isotonic``: a monotone step function of the top-1 probability; the most
  flexible, and the most data-hungry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError, FormatError

Method = Literal["temperature", "platt", "isotonic"]
METHODS: tuple[Method, ...] = ("temperature", "platt", "isotonic")
ECE_BINS = 15

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def _nll(logits: FloatArray, y: IntArray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(logits: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on (logits, y)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    # Search log T: the NLL is smooth and unimodal there, and T stays positive.
    result = minimize_scalar(
        lambda log_t: _nll(z, labels, float(np.exp(log_t))),
        bounds=(np.log(0.01), np.log(100.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def expected_calibration_error(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, bins: int = ECE_BINS
) -> float:
    """ECE with equal-width bins: the mean |accuracy - confidence|, weighted by bin size."""
    table = reliability_table(confidence, correct, bins)
    n = sum(row["count"] for row in table)
    if n == 0:
        return 0.0
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / n)


def reliability_table(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin: its range, the examples in it, their mean confidence and accuracy."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes in bin 0.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        mask = which == i
        count = int(mask.sum())
        if count:
            rows.append(
                {
                    "low": float(edges[i]),
                    "high": float(edges[i + 1]),
                    "count": count,
                    "confidence": float(conf[mask].mean()),
                    "accuracy": float(ok[mask].mean()),
                }
            )
    return rows


@dataclass
class Calibrator:
    """A fitted calibration of a tier's logits; serialisable to the bundle manifest."""

    method: Method = "temperature"
    params: dict[str, Any] = field(default_factory=lambda: {"temperature": 1.0})

    @classmethod
    def fit(cls, logits: npt.ArrayLike, y: npt.ArrayLike, method: Method) -> Calibrator:
        z = np.asarray(logits, dtype=np.float64)
        labels = np.asarray(y, dtype=np.int64)
        if len(z) == 0:
            raise ConfigError("calibration needs at least one held-out example")
        if method == "temperature":
            return cls("temperature", {"temperature": fit_temperature(z, labels)})
        probs = softmax(z)
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            x = _logit(conf).reshape(-1, 1)
            if correct.min() == correct.max():  # one class only: nothing to fit
                return cls("platt", {"a": 1.0, "b": 0.0})
            fit = LogisticRegression(C=1e4).fit(x, correct)
            return cls("platt", {"a": float(fit.coef_[0, 0]), "b": float(fit.intercept_[0])})
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, correct)
            return cls(
                "isotonic",
                {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()},
            )
        raise ConfigError(f"calibration method must be one of {METHODS}, not {method!r}")

    @property
    def temperature(self) -> float:
        """The softmax temperature (1 for the methods that map the top-1 value)."""
        return float(self.params["temperature"]) if self.method == "temperature" else 1.0

    def apply(self, logits: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
        """(top-1 class, calibrated confidence) per row of logits."""
        probs = softmax(logits, self.temperature)
        pred = probs.argmax(axis=1).astype(np.int64)
        return pred, self.map_confidence(probs.max(axis=1))

    def map_confidence(self, top1: npt.ArrayLike) -> FloatArray:
        """Calibrated confidence from the top-1 probability at this calibrator's temperature."""
        conf = np.asarray(top1, dtype=np.float64)
        if self.method == "platt":
            out: FloatArray = 1.0 / (
                1.0 + np.exp(-(self.params["a"] * _logit(conf) + self.params["b"]))
            )
            return out
        if self.method == "isotonic":
            mapped: FloatArray = np.interp(conf, self.params["x"], self.params["y"])
            return mapped
        return conf

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_json(cls, raw: object, where: str) -> Calibrator:
        if not isinstance(raw, dict) or raw.get("method") not in METHODS:
            raise FormatError(f"{where}: calibration must name a method in {METHODS}")
        params = {k: v for k, v in raw.items() if k != "method"}
        needed = {"temperature": ["temperature"], "platt": ["a", "b"], "isotonic": ["x", "y"]}
        missing = [k for k in needed[raw["method"]] if k not in params]
        if missing:
            raise FormatError(f"{where}: calibration {raw['method']!r} lacks {missing}")
        if raw["method"] == "temperature" and not float(params["temperature"]) > 0:
            raise FormatError(f"{where}: temperature must be positive")
        return cls(raw["method"], params)


def _logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    out: FloatArray = np.log(q / (1 - q))
    return out
