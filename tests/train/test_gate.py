"""The gate: thresholds meet the stated target on held-out data."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate import ConfigError
from tiergate.gate import GENERAL, Prices, Target, choose, fit_domain_gate, sweep


def calibrated_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidences with P(correct | c) = c: what a calibrated tier produces."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, n)
    return conf, rng.uniform(size=n) < conf


def test_sweep_columns_agree_with_a_direct_count() -> None:
    conf = np.array([0.55, 0.75, 0.95, 0.99])
    ok = np.array([False, True, True, True])
    points = {p.threshold: p for p in sweep(conf, ok, Prices(frontier_per_request=0.01))}
    p = points[0.7]
    assert p.answered_share == 0.75
    assert p.accepted_accuracy == 1.0
    assert p.escalation_rate == 0.25
    assert p.cost_per_1k == pytest.approx(1000 * (0.000002 + 0.25 * 0.01))


def test_precision_target_holds_on_fresh_data() -> None:
    conf, ok = calibrated_scores(20_000, seed=1)
    threshold, why = choose(sweep(conf, ok, Prices()), Target(precision=0.97))
    assert "lowest threshold" in why
    test_conf, test_ok = calibrated_scores(20_000, seed=2)
    assert test_ok[test_conf >= threshold].mean() >= 0.96
    # and it is the lowest such threshold: one step down misses the target
    lower = threshold - 0.01
    assert ok[conf >= lower].mean() < 0.97


def test_escalation_cap_and_impossible_targets() -> None:
    conf, ok = calibrated_scores(5000, seed=3)
    high = conf >= 0.5
    threshold, _ = choose(
        sweep(conf[high], ok[high], Prices()), Target(precision=None, max_escalation=0.2)
    )
    assert 0.1 <= (conf[high] < threshold).mean() <= 0.2
    # 29% sit below the lowest threshold swept (0.50): the cap cannot be met, and it says so
    lowest, why = choose(sweep(conf, ok, Prices()), Target(precision=None, max_escalation=0.2))
    assert lowest == 0.5
    assert "no threshold meets the escalation cap" in why
    never, why = choose(sweep(conf, np.zeros_like(ok), Prices()), Target(precision=0.99))
    assert never > 1.0
    assert "escalates all" in why
    with pytest.raises(ConfigError):
        Target(precision=None, max_escalation=None)
    with pytest.raises(ConfigError):
        Target(precision=1.5)


def test_finance_is_gated_more_strictly_than_general() -> None:
    conf, ok = calibrated_scores(10_000, seed=4)
    domains = ["finance" if i % 3 == 0 else GENERAL for i in range(len(conf))]
    gate = fit_domain_gate(conf, ok, domains, Target(precision=0.95), Prices())
    assert gate.thresholds["finance"] > gate.thresholds[GENERAL]
    accepted = gate.accepts(conf, domains)
    fin = np.array([d == "finance" for d in domains])
    assert ok[accepted & fin].mean() >= 0.97
    # unknown domains fall back to the general threshold
    assert gate.threshold("legal") == gate.thresholds[GENERAL]


def test_small_domains_share_the_general_threshold() -> None:
    conf, ok = calibrated_scores(2000, seed=5)
    domains = ["legal" if i < 10 else GENERAL for i in range(len(conf))]
    gate = fit_domain_gate(conf, ok, domains, Target(precision=0.95), Prices())
    assert gate.thresholds["legal"] == gate.thresholds[GENERAL]
    assert "only 10 held-out examples" in gate.reasons["legal"]


def test_a_later_tier_is_gated_on_what_the_earlier_ones_left() -> None:
    """Earlier tiers answered half the examples, all correctly: the later tier may then
    accept answers below the target on its own, as long as all local answers together
    meet it, and it never sees the examples already answered."""
    conf, ok = calibrated_scores(20_000, seed=6)
    done = np.arange(len(conf)) % 2 == 0
    alone = fit_domain_gate(conf, ok, [GENERAL] * len(conf), Target(0.95), Prices())
    after = fit_domain_gate(
        conf, ok, [GENERAL] * len(conf), Target(0.95), Prices(), earlier=(done, done)
    )
    t = after.thresholds[GENERAL]
    assert t < alone.thresholds[GENERAL]
    mine = ~done & (conf >= t)
    together = (done.sum() + ok[mine].sum()) / (done.sum() + mine.sum())
    assert together >= 0.95 > ok[mine].mean()
    point = next(p for p in after.sweeps[GENERAL] if p.threshold == t)
    assert point.answered_share == pytest.approx((done.sum() + mine.sum()) / len(conf))
