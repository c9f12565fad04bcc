"""The confidence gate: which threshold turns "answer now" into "escalate".

A tier answers when its calibrated confidence reaches the threshold of the
request's risk domain, and escalates otherwise. Thresholds come from a target
the user states (precision of what a tier accepts, or a cap on escalations),
chosen on held-out data by a sweep that is kept and shown, so the choice is a
measured trade-off rather than a guess.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError

GENERAL = "general"
# Risk domains whose mistakes cost more: their precision target is tightened
# (half the allowed error rate) unless the user sets one explicitly.
STRICT_DOMAINS = ("finance", "legal")
SWEEP = tuple(round(float(t), 2) for t in np.arange(0.50, 0.995, 0.01))
# A domain needs this many held-out examples for a threshold of its own;
# below it the domain shares the general threshold (raised, never lowered).
MIN_DOMAIN_SUPPORT = 50


@dataclass(frozen=True)
class Prices:
    """What one request costs at each end of the cascade, in US dollars."""

    frontier_per_request: float = 0.0015
    local_per_request: float = 0.000002

    def per_1k(self, escalation_rate: float) -> float:
        return 1000 * (self.local_per_request + escalation_rate * self.frontier_per_request)


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    accepted_accuracy: float  # accuracy of the answers the tier gives at this threshold
    answered_share: float
    escalation_rate: float
    cost_per_1k: float
    support: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Earlier:
    """What the cascade's earlier tiers already answered, in one population of held-out
    examples: a later tier's threshold is chosen so that *all* local answers together
    meet the target, not each tier on its own."""

    answered: int = 0
    correct: int = 0
    total: int = 0  # the whole population, answered earlier or not


def sweep(
    confidence: npt.ArrayLike,
    correct: npt.ArrayLike,
    prices: Prices,
    thresholds: tuple[float, ...] = SWEEP,
    earlier: Earlier | None = None,
) -> list[SweepPoint]:
    """Per threshold, the local answers so far: earlier tiers' plus this tier's.

    ``confidence``/``correct`` cover the examples that reach this tier.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    before = earlier or Earlier(total=len(conf))
    n = max(before.total, 1)
    points = []
    for t in thresholds:
        accepted = conf >= t
        answered = before.answered + int(accepted.sum())
        right = before.correct + int(ok[accepted].sum())
        acc = right / answered if answered else 1.0
        escalation = 1.0 - answered / n
        points.append(
            SweepPoint(t, acc, answered / n, escalation, prices.per_1k(escalation), before.total)
        )
    return points


@dataclass(frozen=True)
class Target:
    """What the user asks of each tier: a precision floor, an escalation cap, or both.

    ``margin_z``: the precision must hold at the lower end of a Wilson interval this
    many standard errors wide, not only on average. A threshold chosen where held-out
    precision just touches the target lands on either side of it on new traffic;
    one standard error of margin puts it on the right side most of the time, and
    costs little where thousands of examples are answered. When the held-out set is
    too small to show the margin, the point estimate decides (and the reason says so).
    """

    precision: float | None = 0.99
    max_escalation: float | None = None
    margin_z: float = 1.0

    def __post_init__(self) -> None:
        if self.precision is None and self.max_escalation is None:
            raise ConfigError("give a target precision, a maximum escalation rate, or both")
        for name, v in (("precision", self.precision), ("max_escalation", self.max_escalation)):
            if v is not None and not 0 < v <= 1:
                raise ConfigError(f"target {name} must be in (0, 1], not {v}")

    def stricter(self) -> Target:
        """Half the error rate, for high-stakes domains. That is their margin: a domain
        has hundreds of held-out examples, too few to also show a confidence margin
        (and its threshold never falls below the population's, which has one)."""
        if self.precision is None:
            return self
        return Target(1 - (1 - self.precision) / 2, self.max_escalation, margin_z=0.0)


def wilson_lower(accuracy: float, n: int, z: float) -> float:
    """Lower end of the Wilson score interval of a proportion seen on ``n`` examples."""
    if n <= 0 or z <= 0:
        return accuracy
    z2 = z * z
    centre = accuracy + z2 / (2 * n)
    spread = z * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n))
    return (centre - spread) / (1 + z2 / n)


def choose(points: list[SweepPoint], target: Target) -> tuple[float, str]:
    """The threshold meeting the target, and a sentence saying why it was chosen.

    With a precision target: the lowest threshold whose accepted accuracy
    reaches it (answering as much as the target allows). With an escalation
    cap: the highest threshold whose escalation rate stays under it. With both,
    precision wins and the cap is reported as missed if it is. If nothing meets
    a precision target the tier never answers (threshold above 1).
    """
    if target.precision is not None:
        goal, z = target.precision, target.margin_z

        def lower(p: SweepPoint) -> float:
            return wilson_lower(p.accepted_accuracy, round(p.answered_share * p.support), z)

        ok = [p for p in points if p.answered_share > 0 and lower(p) >= goal]
        margin = f" with a {z:g}-sigma margin" if z > 0 else ""
        if not ok and z > 0:
            ok = [p for p in points if p.answered_share > 0 and p.accepted_accuracy >= goal]
            margin = f" (too few held-out answers to show a {target.margin_z:g}-sigma margin)"
        if not ok:
            return 1.01, f"no threshold reaches precision {goal:.3f}: the tier escalates all"
        best = min(ok, key=lambda p: p.threshold)
        why = (
            f"lowest threshold with accepted accuracy >= {goal:.3f}{margin} "
            f"(got {best.accepted_accuracy:.4f}, answers {best.answered_share:.1%})"
        )
        if target.max_escalation is not None and best.escalation_rate > target.max_escalation:
            why += f"; escalation {best.escalation_rate:.1%} exceeds the cap"
        return best.threshold, why
    assert target.max_escalation is not None
    ok = [p for p in points if p.escalation_rate <= target.max_escalation]
    if not ok:
        return points[0].threshold, "no threshold meets the escalation cap; using the lowest"
    best = max(ok, key=lambda p: p.threshold)
    return best.threshold, (
        f"highest threshold with escalation <= {target.max_escalation:.1%} "
        f"(accepted accuracy {best.accepted_accuracy:.4f})"
    )


@dataclass
class DomainGate:
    """Per-domain thresholds of one tier, with the sweeps and reasons behind them."""

    thresholds: dict[str, float]
    reasons: dict[str, str]
    sweeps: dict[str, list[SweepPoint]]

    def threshold(self, domain: str) -> float:
        return self.thresholds.get(domain, self.thresholds[GENERAL])

    def accepts(self, confidence: npt.ArrayLike, domains: list[str]) -> npt.NDArray[np.bool_]:
        t = np.array([self.threshold(d) for d in domains], dtype=np.float64)
        out: npt.NDArray[np.bool_] = np.asarray(confidence, dtype=np.float64) >= t
        return out


def fit_domain_gate(
    confidence: npt.ArrayLike,
    correct: npt.ArrayLike,
    domains: list[str],
    target: Target,
    prices: Prices,
    domain_targets: dict[str, Target] | None = None,
    earlier: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
) -> DomainGate:
    """Thresholds for the general population and each risk domain present.

    ``earlier``: (answered, correct) masks over the same examples from the tiers
    before this one. Those examples never reach this tier, but count towards
    the precision the target asks of the local answers together.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    dom = np.asarray(domains, dtype=object)
    done = np.zeros(len(conf), dtype=bool) if earlier is None else np.asarray(earlier[0], bool)
    done_ok = np.zeros(len(conf), dtype=bool) if earlier is None else np.asarray(earlier[1], bool)
    explicit = domain_targets or {}

    def sweep_of(mask: npt.NDArray[np.bool_]) -> list[SweepPoint]:
        taken = mask & done
        before = Earlier(int(taken.sum()), int((taken & done_ok).sum()), int(mask.sum()))
        open_ = mask & ~done
        return sweep(conf[open_], ok[open_], prices, earlier=before)

    points = sweep_of(np.ones(len(conf), dtype=bool))
    t_general, why = choose(points, target)
    gate = DomainGate({GENERAL: t_general}, {GENERAL: why}, {GENERAL: points})
    for domain in sorted(set(domains) - {GENERAL}):
        mask = dom == domain
        d_target = explicit.get(domain) or (
            target.stricter() if domain in STRICT_DOMAINS else target
        )
        d_points = sweep_of(mask)
        gate.sweeps[domain] = d_points
        if int(mask.sum()) < MIN_DOMAIN_SUPPORT:
            gate.thresholds[domain] = t_general
            gate.reasons[domain] = (
                f"only {int(mask.sum())} held-out examples: shares the general threshold"
            )
            continue
        t, why = choose(d_points, d_target)
        # A domain may be stricter than the population, never laxer.
        gate.thresholds[domain] = max(t, t_general)
        gate.reasons[domain] = why + ("" if t >= t_general else "; raised to the general one")
    return gate
