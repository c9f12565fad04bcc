"""The gate: thresholds meet the stated target on held-out data."""

from __future__ import annotations

import numpy as np
import pytest

from tiergate import ConfigError
from tiergate.gate import (
    GENERAL,
    Prices,
    Target,
    choose,
    fit_domain_gate,
    sweep,
    wilson_lower,
)


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
    # and it is the lowest such threshold: one step down misses the target's margin
    below = conf >= threshold - 0.01
    assert wilson_lower(ok[below].mean(), int(below.sum()), 1.0) < 0.97
    # without a margin the point estimate decides, and one step down misses the target itself
    bare, why = choose(sweep(conf, ok, Prices()), Target(precision=0.97, margin_z=0.0))
    assert bare <= threshold
    assert "margin" not in why
    assert ok[conf >= bare].mean() >= 0.97
    assert ok[conf >= bare - 0.01].mean() < 0.97


def test_the_margin_gives_way_to_the_point_estimate_on_a_small_held_out_set() -> None:
    # 30 answers, all right: 100% on average, but a one-sigma Wilson bound is only 97%
    conf = np.linspace(0.6, 1.0, 30)
    ok = np.ones(30, dtype=bool)
    assert wilson_lower(1.0, 30, 1.0) < 0.99
    threshold, why = choose(sweep(conf, ok, Prices()), Target(precision=0.99))
    assert threshold == 0.5
    assert "too few held-out answers" in why
    # with a thousand answers the margin holds, and costs some: a stricter threshold
    conf, ok = calibrated_scores(2_000, seed=4)
    with_margin, _ = choose(sweep(conf, ok, Prices()), Target(precision=0.95))
    without, _ = choose(sweep(conf, ok, Prices()), Target(precision=0.95, margin_z=0.0))
    assert with_margin > without


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


def two_tiers(n: int, seed: int) -> tuple[np.ndarray, list[tuple]]:
    """A calibrated but weak linear tier and a sharper intent model on the same texts: both
    find the same texts easy, and the intent model is right more often on every one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    easy = rng.uniform(size=n)

    def tier(conf: np.ndarray, p_right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        right = rng.uniform(size=n) < p_right
        return np.where(right, y, (y + 1) % 10), conf

    lin_conf = 0.3 + 0.7 * easy
    int_conf = 0.5 + 0.5 * easy
    stages = [
        ("linear", *tier(lin_conf, lin_conf), [GENERAL] * n),
        ("intent", *tier(int_conf, np.minimum(1.0, int_conf + 0.04)), [GENERAL] * n),
    ]
    return y, stages


def cascade_on(y: np.ndarray, stages: list[tuple], gates: dict) -> tuple[float, float]:
    answered = np.zeros(len(y), dtype=bool)
    right = np.zeros(len(y), dtype=bool)
    for name, pred, conf, domains in stages:
        takes = ~answered & gates[name].accepts(conf, domains)
        answered |= takes
        right |= takes & (pred == y)
    return float(answered.mean()), float(right.sum() / answered.sum())


def test_the_cascade_is_gated_as_a_whole_not_tier_by_tier() -> None:
    """Gating the linear tier at the target on its own spends the error budget on it; raising
    its threshold lets the sharper intent model answer more, so the local tiers answer more
    in total, at the same precision, on val and on fresh data alike."""
    from tiergate.train import TrainOptions, _fit_gates

    options = TrainOptions(intent=None, target=Target(0.97))
    y, stages = two_tiers(20_000, seed=7)
    joint, raised = _fit_gates(stages, y, options)
    assert raised is not None
    assert raised["tier"] == "linear"
    assert raised["floor"] > 0
    assert "raised to" in joint["linear"].reasons[GENERAL]
    greedy, none = _fit_gates(stages[:1], y, options)  # the linear tier gated on its own
    assert none is None
    assert greedy["linear"].thresholds[GENERAL] < joint["linear"].thresholds[GENERAL]
    fresh_y, fresh = two_tiers(20_000, seed=8)
    answered, precision = cascade_on(fresh_y, fresh, joint)
    assert precision >= 0.965
    assert raised["answered_val"] > raised["answered_val_unraised"] + 0.02
    # the tier-by-tier choice, replayed on the fresh data, answers less
    plain = dict(joint, linear=greedy["linear"])
    from tiergate.train import _ValCascade

    cascade = _ValCascade(y, options)
    cascade.gate(stages[0][1], stages[0][2], stages[0][3])
    plain["intent"] = cascade.gate(stages[1][1], stages[1][2], stages[1][3])
    assert cascade_on(fresh_y, fresh, plain)[0] < answered - 0.02
