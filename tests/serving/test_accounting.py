"""Nothing lost: after faults, every admitted request has exactly one decision-log
record, and every spend reservation is settled."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import (
    KEY_A,
    KEY_B,
    escalate_everything,
    sha,
    tenant_a_with,
    write_policy,
)
from tiergate.accounting import SharedBooks


def test_every_admitted_request_leaves_one_record_and_settles_its_spend(
    start: Any, linear_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tiergate.decisions")
    tasks = escalate_everything(linear_bundle)
    # The spend cap lets some escalations through and degrades the rest; the quota
    # refuses requests past the 30th (never admitted: no record).
    tenants = tenant_a_with({"requests_per_day": 30, "spend_per_day_usd": 0.002})
    policy = write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks, tenants=tenants)
    # The provider fails its first calls, then answers slowly: some callers give up
    # (deadline) while their escalation is in flight.
    script = Script(default="refund", fail_first=2, fail_status=500, delay_s=0.3)
    outcomes: list[str] = []
    lock = threading.Lock()
    with fake_provider(script) as url:
        r = start(policy, url, price=1.0)

        def call(i: int) -> None:
            # A third cascade as usual; the others go straight to the frontier (no
            # local answer to fall back on), half of them with too short a deadline.
            force, timeout = [("", 10.0), ("frontier", 0.2), ("frontier", 10.0)][i % 3]
            with r.client(KEY_A) as c:
                try:
                    a = c.classify(f"request {i} about money", force_tier=force, timeout=timeout)
                    outcome = "degraded" if a.degraded else a.tier
                except grpc.RpcError as e:
                    outcome = e.code().name
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(36)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # Let calls abandoned by their callers finish on the server side.
        usage = r.engine.ledger.snapshot("a")
        for _ in range(100):
            usage = r.engine.ledger.snapshot("a")
            if usage.open_reservations == 0:
                break
            threading.Event().wait(0.05)
    records = [json.loads(m) for m in caplog.messages if m.startswith("{")]
    ids = [rec["request_id"] for rec in records]
    refused = outcomes.count("RESOURCE_EXHAUSTED")
    assert len(outcomes) == 36
    assert refused == 6  # the request quota: 30 admitted
    assert len(ids) == len(set(ids)) == 30  # one record per admitted request, no more
    failures = [rec for rec in records if "error" in rec]
    assert {rec["error"] for rec in failures} <= {"DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE"}
    assert usage.requests == 30
    assert usage.open_reservations == 0  # every reservation settled ...
    assert usage.reserved_usd == 0  # ... and nothing stays reserved
    assert 0 < usage.spent_usd <= 0.002 + 1e-12  # the cap held
    assert "frontier" in outcomes  # some escalations were answered ...
    assert "degraded" in outcomes  # ... some fell back on a local answer ...
    # ... and the ones with nothing to fall back on failed, each with its record.
    no_decision = {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert no_decision & set(outcomes)
    assert sum(o in no_decision for o in outcomes) == len(failures)


class InProcessHandle:
    """A Serve handle's shape (``handle.reserve.remote(...)`` awaitable) over books in
    this process, each call after a short hop: RemoteBooks' own code runs unchanged,
    without a Ray cluster (tests/cluster/test_two_nodes.py runs it on one)."""

    def __init__(self, books: SharedBooks | None, failing: bool = False):
        self.books = books
        self.failing = failing
        self.calls = 0

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                async def call() -> Any:
                    handle.calls += 1
                    await asyncio.sleep(0.002)
                    if handle.failing or handle.books is None:
                        raise ConnectionError("replica lost")
                    return getattr(handle.books, method)(*args)

                return call()

        return Method


def test_front_ends_sharing_books_hold_an_escalation_cap_across_them(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    ray_app = pytest.importorskip("tiergate.ray_app", reason="needs ray[serve]")
    tasks = escalate_everything(linear_bundle)
    tenants = tenant_a_with({"escalations_per_day": 5, "spend_per_day_usd": 10.0})
    policy = write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks, tenants=tenants)
    shared = SharedBooks()
    handle = InProcessHandle(shared)
    script = Script(default="refund", delay_s=0.2)  # slow: the calls overlap
    outcomes: list[str] = []
    with fake_provider(script) as url:
        fronts = [start(policy, url, price=1.0) for _ in range(2)]
        for r in fronts:
            r.engine.books = ray_app.RemoteBooks(handle, r.engine.ledger)

        def call(i: int) -> None:
            with fronts[i % 2].client(KEY_A) as c:
                a = c.classify(f"request {i} about money", timeout=10.0)
            outcomes.append("degraded" if a.degraded else a.tier)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    # Each front end alone would have let 5 through: 10 in all.
    assert script.calls == 5
    assert sorted(outcomes) == ["degraded"] * 11 + ["frontier"] * 5
    usage = shared.ledger.snapshot("a")
    assert (usage.escalations, usage.open_reservations, usage.reserved_usd) == (5, 0, 0.0)
    assert usage.spent_usd > 0
    assert shared.open == {}  # every reservation settled at the shared books
    for r in fronts:  # a capped tenant's escalations are not in a front end's own books
        assert r.engine.ledger.snapshot("a").escalations == 0


def test_shared_books_that_do_not_answer_refuse_capped_escalations_only(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    ray_app = pytest.importorskip("tiergate.ray_app", reason="needs ray[serve]")
    tasks = escalate_everything(linear_bundle)
    tenants = {
        **tenant_a_with({"spend_per_day_usd": 10.0}),
        "b": {"key_sha256": [sha(KEY_B)]},  # no cap: its books stay with the front end
    }
    policy = write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks, tenants=tenants)
    handle = InProcessHandle(None, failing=True)
    script = Script(default="refund")
    with fake_provider(script) as url:
        r = start(policy, url, price=1.0)
        r.engine.books = ray_app.RemoteBooks(handle, r.engine.ledger)
        with r.client(KEY_A) as c:
            capped = c.classify("I want my money back")
        with r.client(KEY_B) as c:
            uncapped = c.classify("I want my money back")
    assert capped.degraded
    assert capped.degraded_reason == "spend books unavailable"
    assert capped.tier != "frontier"
    assert any("Bank deployment" in s.note for s in capped.path if s.tier == "frontier")
    assert uncapped.tier == "frontier"
    assert not uncapped.degraded
    assert script.calls == 1  # only tenant b's request was paid for
    assert handle.calls == 1  # and only tenant a's went to the books
    assert r.engine.ledger.snapshot("b").escalations == 1


def test_shared_books_settle_by_id_within_their_own_run(linear_bundle: Path) -> None:
    from tiergate.policy import Quota, Tenant

    t = Tenant("a", (), Quota(escalations_per_day=2, spend_per_day_usd=1.0))
    books = SharedBooks()
    first, second = books.reserve(t, 0.4), books.reserve(t, 0.4)
    assert first["ok"]
    assert second["ok"]
    assert first["id"] != second["id"]
    refused = books.reserve(t, 0.1)  # the escalation quota
    assert not refused["ok"]
    assert "2 escalations per day" in refused["message"]
    assert refused["retry_after_s"] > 0
    assert not books.settle("another run", first["id"], 0.3)  # a restart's stale id
    assert books.settle(books.epoch, first["id"], 0.3)
    assert not books.settle(books.epoch, first["id"], 0.3)  # settled once only
    usage = books.ledger.snapshot("a")
    assert (usage.spent_usd, usage.reserved_usd, usage.open_reservations) == (0.3, 0.4, 1)
