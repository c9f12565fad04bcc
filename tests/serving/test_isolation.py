"""Tenant isolation of the exact cache, as a property over random request sequences."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiergate.engine import Engine, Request, in_process_runtime, normalise
from tiergate.policy import Tenant, parse_policy

TENANTS = [Tenant("a"), Tenant("b"), Tenant("c")]
TEXTS = ["reset my password", "Reset  my PASSWORD", "where is my package", "refund please",
         "hello there", "cancel my plan"]  # fmt: skip


@pytest.fixture(scope="module")
def engine(full_bundle: Path) -> Iterator[Engine]:
    # The intent model answers every text (the caches keep model answers, not the
    # cheap tiers'), and every answer it gives is kept.
    answer_all = {"general": 0.0, "finance": 0.0}
    never = {"general": 1.01, "finance": 1.01}
    raw = {
        "version": "v",
        "tasks": {"t": {"bundle": str(full_bundle),
                        "thresholds": {"rules": never, "linear": never, "intent": answer_all}}},
        "cache": {"min_confidence": 0.0},
    }  # fmt: skip
    policy = parse_policy(raw, full_bundle.parent)
    engine = Engine(policy, {n: in_process_runtime(t) for n, t in policy.tasks.items()})
    yield engine
    for rt in engine.runtimes.values():
        rt.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(range(3)), st.sampled_from(TEXTS)), max_size=30))
def test_no_cache_answer_crosses_tenants(engine: Engine, ops: list[tuple[int, str]]) -> None:
    engine.exact.entries.clear()
    seen: dict[str, set[str]] = {t.name: set() for t in TENANTS}

    async def run() -> None:
        for tenant_i, text in ops:
            tenant = TENANTS[tenant_i]
            d = await engine.classify(Request(text, tenant))
            key = normalise(text)
            if d.cached:
                # Only this tenant's own earlier request can have put it there.
                assert key in seen[tenant.name], (tenant.name, text)
            seen[tenant.name].add(key)

    asyncio.run(run())


def test_the_property_above_is_not_vacuous(engine: Engine) -> None:
    engine.exact.entries.clear()

    async def run() -> list[bool]:
        out = []
        for tenant, text in ((0, "reset my password"), (0, "Reset  my PASSWORD"),
                             (1, "reset my password")):  # fmt: skip
            out.append((await engine.classify(Request(text, TENANTS[tenant]))).cached)
        return out

    assert asyncio.run(run()) == [False, True, False]  # same tenant hits, another misses
