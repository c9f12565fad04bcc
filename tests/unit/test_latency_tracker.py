"""The engine's recent-latency p95 per tier: what decides whether a tier fits a budget."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tiergate.engine import LatencyTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def filled(clock: Clock) -> LatencyTracker:
    """A full window of 100: 95 samples of 10 ms, then 5 of 20 ms (p95 10.5 ms)."""
    t = LatencyTracker(window=100, clock=clock, refresh_s=0.1)
    for ms in [10.0] * 95 + [20.0] * 5:
        t.record("intents/intent", ms)
    assert t.p95("intents/intent") == pytest.approx(10.5)
    return t


def test_too_little_evidence_says_the_tier_fits() -> None:
    t = LatencyTracker(clock=Clock())
    assert t.p95("unknown") == 0.0
    for _ in range(4):
        t.record("k", 500.0)
    assert t.p95("k") == 0.0
    t.record("k", 500.0)
    assert t.p95("k") == 500.0


def test_a_small_window_is_exact_after_every_sample() -> None:
    t = LatencyTracker(clock=Clock())
    samples = [5.0, 6.0, 7.0, 8.0, 9.0]
    for ms in samples:
        t.record("k", ms)
    for ms in (900.0, 1.0, 950.0):  # no time passes: each sample still counts at once
        samples.append(ms)
        t.record("k", ms)
        assert t.p95("k") == pytest.approx(np.percentile(samples, 95))


def test_a_full_windows_p95_is_reused_until_a_twentieth_of_it_is_new() -> None:
    t = filled(Clock())
    for _ in range(4):  # 4 of 100 new: the p95 computed before stands
        t.record("intents/intent", 1000.0)
    assert t.p95("intents/intent") == pytest.approx(10.5)
    t.record("intents/intent", 1000.0)  # the fifth: computed again
    now = [10.0] * 90 + [20.0] * 5 + [1000.0] * 5
    assert t.p95("intents/intent") == pytest.approx(np.percentile(now, 95))  # 69 ms


def test_a_reused_p95_is_computed_again_after_refresh_s() -> None:
    clock = Clock()
    t = filled(clock)
    for _ in range(4):
        t.record("intents/intent", 1000.0)
    clock.now += 0.05
    assert t.p95("intents/intent") == pytest.approx(10.5)
    clock.now += 0.06
    now = [10.0] * 91 + [20.0] * 5 + [1000.0] * 4
    assert t.p95("intents/intent") == pytest.approx(np.percentile(now, 95))  # 20 ms


def test_old_samples_are_forgotten_and_the_p95_follows() -> None:
    clock = Clock()
    t = LatencyTracker(max_age_s=60.0, clock=clock)
    for _ in range(10):
        t.record("k", 800.0)
    assert t.p95("k") == 800.0
    clock.now += 30.0
    for _ in range(10):
        t.record("k", 5.0)
    clock.now += 31.0  # the slow ones are now 61 s old
    assert t.p95("k") == 5.0
    clock.now += 61.0
    assert t.p95("k") == 0.0  # nothing recent: try the tier


def test_a_reused_p95_is_computed_again_once_samples_expire() -> None:
    clock = Clock()
    t = LatencyTracker(window=100, max_age_s=60.0, clock=clock, refresh_s=float("inf"))
    for _ in range(50):
        t.record("k", 900.0)
    clock.now += 30.0
    for _ in range(50):
        t.record("k", 10.0)
    assert t.p95("k") == 900.0
    clock.now += 31.0  # the slow half expires; nothing new, and no refresh by time
    assert t.p95("k") == 10.0


def test_the_first_p95_imports_nothing() -> None:
    # np.percentile loads numpy.ma on its first call (40 ms, on the event loop, in a
    # front end without torch, which loads it at start): the tracker must not.
    code = (
        "import sys; from tiergate.server import build_server; "
        "from tiergate.engine import LatencyTracker; before = set(sys.modules); "
        "t = LatencyTracker(); [t.record('k', float(i)) for i in range(50)]; "
        "assert t.p95('k') > 0; print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_p95_is_numpys_to_the_bit() -> None:
    rng = np.random.default_rng(3)
    for n in [*range(5, 64), 100, 255, 512]:
        for _ in range(20):
            samples = rng.lognormal(2.0, 1.0, n).round(rng.integers(0, 4))  # ties too
            t = LatencyTracker(window=512, clock=Clock())
            for ms in samples:
                t.record("k", float(ms))
            assert t.p95("k") == float(np.percentile(samples, 95)), n
