"""The per-request metrics, counted without prometheus_client's locks, must scrape
exactly as prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram

from tiergate.metrics import LATENCY_BUCKETS, Metrics


def _samples(registry: CollectorRegistry, family: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        if m.name == family
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_decision_stats_scrape_as_prometheus_client_would() -> None:
    ours = Metrics()
    reference = CollectorRegistry()
    requests = Counter("tiergate_requests", "", ["tier", "outcome"], registry=reference)
    latency = Histogram("tiergate_request_seconds", "", ["tier", "outcome"],
                        buckets=LATENCY_BUCKETS, registry=reference)  # fmt: skip
    hits = Counter("tiergate_cache_hits", "", ["cache"], registry=reference)
    escalations = Counter("tiergate_escalations", "", registry=reference)
    spend = Counter("tiergate_spend_usd", "", ["tenant"], registry=reference)
    rng = random.Random(7)
    # Bounds themselves are included: a latency equal to a bound counts in its bucket.
    seconds = [*LATENCY_BUCKETS, 20.0] + [10 ** rng.uniform(-5.5, 1.5) for _ in range(2000)]
    for s in seconds:
        tier = rng.choice(["rules", "linear", "intent", "frontier"])
        outcome = rng.choice(["ok", "cached", "degraded"])
        cache = rng.choice(["exact", "semantic"]) if outcome == "cached" else ""
        escalated = tier == "frontier" and not cache
        tenant = rng.choice(["acme", "globex"])
        cost = round(rng.uniform(0, 0.01), 6) if escalated else 0.0
        ours.decisions.record(tier, outcome, s, cache, escalated, tenant, cost)
        requests.labels(tier, outcome).inc()
        latency.labels(tier, outcome).observe(s)
        if cache:
            hits.labels(cache).inc()
        if escalated:
            escalations.inc()
        if cost:
            spend.labels(tenant).inc(cost)
    for family in ("tiergate_requests", "tiergate_request_seconds", "tiergate_cache_hits",
                   "tiergate_escalations", "tiergate_spend_usd"):  # fmt: skip
        got, want = _samples(ours.registry, family), _samples(reference, family)
        assert got.keys() == want.keys(), family
        for key, value in want.items():
            assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), (family, key)
    assert ours.decisions.answered() == len(seconds)
    assert ours.decisions.latency_buckets()[float("inf")] == len(seconds)
