"""Prometheus metrics of the front end, on their own registry (one per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Buckets from 50 µs (cheap tiers) to 10 s (frontier calls).
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tiergate_requests", "Answered requests by deciding tier and outcome",
            ["tier", "outcome"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "tiergate_request_seconds", "Server-side latency by deciding tier and outcome",
            ["tier", "outcome"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.escalations = Counter(
            "tiergate_escalations", "Requests sent to the frontier", registry=r
        )
        self.cache_hits = Counter(
            "tiergate_cache_hits", "Answers from a cache", ["cache"], registry=r
        )
        self.spend = Counter(
            "tiergate_spend_usd", "Frontier spend per tenant", ["tenant"], registry=r
        )
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
