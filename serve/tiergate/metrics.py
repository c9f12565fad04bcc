"""Prometheus metrics of the front end, on their own registry (one per server)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Buckets from 50 µs (cheap tiers) to 10 s (frontier calls).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = DecisionStats()
        r.register(self.decisions)
        self.frontier_attempts = Counter(
            "tiergate_frontier_attempts", "Calls to frontier providers by outcome",
            ["provider", "outcome"], registry=r,
        )  # fmt: skip
        self.circuit_open = Gauge(
            "tiergate_frontier_circuit_open", "1 while a provider's circuit is not closed",
            ["provider"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "tiergate_errors", "Refused requests by gRPC status", ["code"], registry=r
        )
        # Admission control's two signals (read when scraped).
        self.inflight = Gauge(
            "tiergate_inflight_requests", "Requests admitted and not yet answered", registry=r
        )
        self.loop_lag = Gauge(
            "tiergate_loop_lag_ms", "How far behind the front end's event loop runs (smoothed)",
            registry=r,
        )  # fmt: skip

    def serve_http(self, port: int, address: str = "127.0.0.1") -> None:
        start_http_server(port, addr=address, registry=self.registry)


class _Route:
    """The answers of one (tier, outcome): a count per latency bucket and their sum."""

    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0


class DecisionStats(Collector):
    """What every answered request adds to the metrics, counted in plain numbers.

    prometheus_client's Counter and Histogram take a lock on each update; the four
    updates of a request cost a fifth of the service's own per-request work. These
    counts are written by the event loop's thread alone, and turned into the usual
    families (``tiergate_requests_total``, ``tiergate_request_seconds``,
    ``tiergate_cache_hits_total``, ``tiergate_escalations_total``,
    ``tiergate_spend_usd_total``) only when Prometheus scrapes.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], _Route] = {}
        self.cache_hits: dict[str, int] = {}
        self.escalations = 0
        self.spend: dict[str, float] = {}

    def record(
        self,
        tier: str,
        outcome: str,
        seconds: float,
        cache: str = "",
        escalated: bool = False,
        tenant: str = "",
        cost_usd: float = 0.0,
    ) -> None:
        route = self.routes.get((tier, outcome))
        if route is None:
            route = self.routes[tier, outcome] = _Route()
        # bisect_left: a latency equal to a bound belongs to that bucket (le is inclusive).
        route.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        route.seconds += seconds
        if cache:
            self.cache_hits[cache] = self.cache_hits.get(cache, 0) + 1
        if escalated:
            self.escalations += 1
        if cost_usd:
            self.spend[tenant] = self.spend.get(tenant, 0.0) + cost_usd

    def answered(self) -> int:
        return sum(sum(r.buckets) for r in list(self.routes.values()))

    def latency_buckets(self) -> dict[float, int]:
        """Cumulative counts per upper bound (seconds), all routes together."""
        bounds = (*LATENCY_BUCKETS, float("inf"))
        total = [0] * len(bounds)
        for r in list(self.routes.values()):
            for i, n in enumerate(itertools.accumulate(r.buckets)):
                total[i] += n
        return dict(zip(bounds, total, strict=True))

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "tiergate_requests", "Answered requests by deciding tier and outcome",
            labels=["tier", "outcome"],
        )  # fmt: skip
        latency = HistogramMetricFamily(
            "tiergate_request_seconds", "Server-side latency by deciding tier and outcome",
            labels=["tier", "outcome"],
        )  # fmt: skip
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
        for (tier, outcome), r in sorted(self.routes.items()):
            counts = list(itertools.accumulate(r.buckets))  # a copy: the loop keeps counting
            requests.add_metric([tier, outcome], counts[-1])
            latency.add_metric([tier, outcome], list(zip(bounds, counts, strict=True)), r.seconds)
        yield requests
        yield latency
        hits = CounterMetricFamily("tiergate_cache_hits", "Answers from a cache", labels=["cache"])
        for cache, n in sorted(self.cache_hits.items()):
            hits.add_metric([cache], n)
        yield hits
        yield CounterMetricFamily(
            "tiergate_escalations", "Requests sent to the frontier", value=self.escalations
        )
        spend = CounterMetricFamily(
            "tiergate_spend_usd", "Frontier spend per tenant", labels=["tenant"]
        )
        for tenant, usd in sorted(self.spend.items()):
            spend.add_metric([tenant], usd)
        yield spend
