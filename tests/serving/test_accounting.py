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
    this process, each call after a hop (``delay_s``, per method if a dict): RemoteBooks'
    own code runs unchanged, without a Ray cluster (tests/cluster/test_two_nodes.py runs
    it on one). As with Ray, a call goes on when its caller stops waiting for it."""

    def __init__(self, books: SharedBooks | None, delay_s: float | dict[str, float] = 0.002):
        self.books = books  # None: a Bank that is gone (every call fails)
        self.delay_s = delay_s
        self.calls: list[str] = []
        self.inflight: set[asyncio.Task[Any]] = set()

    def __getattr__(self, method: str) -> Any:
        handle = self
        delay = self.delay_s if isinstance(self.delay_s, float) else self.delay_s[method]

        async def call(args: tuple[Any, ...]) -> Any:
            handle.calls.append(method)
            await asyncio.sleep(delay)
            if handle.books is None:
                raise ConnectionError("replica lost")
            return getattr(handle.books, method)(*args)

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                task = asyncio.ensure_future(call(args))
                handle.inflight.add(task)
                task.add_done_callback(handle.inflight.discard)
                return asyncio.shield(task)

        return Method

    def wait_idle(self) -> None:
        """Until no call is on its way (the engine's loops run on other threads)."""
        for _ in range(200):
            if not self.inflight:
                return
            threading.Event().wait(0.05)
        raise AssertionError("calls to the books still on their way")


def settled(books: SharedBooks, tenant: str = "a") -> Any:
    """The tenant's usage at ``books`` once every settlement on its way has arrived."""
    for _ in range(200):
        if not books.open:
            break
        threading.Event().wait(0.05)
    return books.ledger.snapshot(tenant)


def run_all(calls: list[threading.Thread]) -> None:
    for t in calls:
        t.start()
    for t in calls:
        t.join(60)
        assert not t.is_alive(), "a call hung"


def capped_front_ends(
    start: Any, bundle: Path, tmp_path: Path, url: str, handle: InProcessHandle, n: int
) -> list[Any]:
    tasks = escalate_everything(bundle)
    tenants = {
        **tenant_a_with({"escalations_per_day": 5, "spend_per_day_usd": 10.0}),
        "b": {"key_sha256": [sha(KEY_B)]},  # no cap: its books stay with the front end
    }
    policy = write_policy(tmp_path / "p.yaml", bundle, tasks=tasks, tenants=tenants)
    ray_app = pytest.importorskip("tiergate.ray_app", reason="needs ray[serve]")
    fronts = [start(policy, url, price=1.0) for _ in range(n)]
    for r in fronts:
        r.engine.books = ray_app.RemoteBooks(handle, r.engine.ledger)
    return fronts


def test_front_ends_sharing_books_hold_an_escalation_cap_across_them(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    shared = SharedBooks()
    script = Script(default="refund", delay_s=0.2)  # slow: the calls overlap
    outcomes: list[str] = []
    with fake_provider(script) as url:
        fronts = capped_front_ends(start, linear_bundle, tmp_path, url, InProcessHandle(shared), 2)

        def call(i: int) -> None:
            with fronts[i % 2].client(KEY_A) as c:
                a = c.classify(f"request {i} about money", timeout=10.0)
            outcomes.append("degraded" if a.degraded else a.tier)

        run_all([threading.Thread(target=call, args=(i,)) for i in range(16)])
    # Each front end alone would have let 5 through: 10 in all.
    assert script.calls == 5
    assert sorted(outcomes) == ["degraded"] * 11 + ["frontier"] * 5
    usage = settled(shared)
    assert (usage.escalations, usage.open_reservations, usage.reserved_usd) == (5, 0, 0.0)
    assert usage.spent_usd > 0
    for r in fronts:  # a capped tenant's escalations are not in a front end's own books
        assert r.engine.ledger.snapshot("a").escalations == 0


def test_escalations_cut_short_still_settle_at_the_shared_books(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    shared = SharedBooks()
    script = Script(default="refund", delay_s=3.0)
    codes: list[str] = []
    with fake_provider(script) as url:
        (r,) = capped_front_ends(start, linear_bundle, tmp_path, url, InProcessHandle(shared), 1)

        def call(i: int) -> None:
            # Straight to the frontier, with a deadline shorter than its answer: the
            # engine gives up on it (or the call is cancelled) mid-escalation.
            with r.client(KEY_A) as c:
                try:
                    c.classify(f"request {i}", force_tier="frontier", timeout=1.0)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)

        run_all([threading.Thread(target=call, args=(i,)) for i in range(3)])
    assert codes == ["DEADLINE_EXCEEDED"] * 3
    usage = settled(shared)
    assert shared.open == {}
    assert (usage.escalations, usage.open_reservations, usage.reserved_usd) == (3, 0, 0.0)


def test_shared_books_that_do_not_answer_refuse_capped_escalations_only(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    handle = InProcessHandle(None)  # the Bank is gone
    script = Script(default="refund")
    with fake_provider(script) as url:
        (r,) = capped_front_ends(start, linear_bundle, tmp_path, url, handle, 1)
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
    assert handle.calls[0] == "reserve"  # tenant a's went to the books (and then a release)
    assert "reserve" not in handle.calls[1:]  # tenant b's did not
    assert r.engine.ledger.snapshot("b").escalations == 1


@pytest.mark.parametrize(
    ("delays", "reserved"),
    [
        ({"reserve": 0.4, "settle": 0.8}, 1),  # reserved after the front end gave up, released
        ({"reserve": 0.4, "settle": 0.002}, 0),  # released first: refused when it arrives
    ],
)
def test_a_reservation_that_answers_too_late_is_released(
    start: Any, linear_bundle: Path, tmp_path: Path, delays: dict[str, float], reserved: int
) -> None:
    shared = SharedBooks()
    handle = InProcessHandle(shared, delay_s=delays)
    script = Script(default="refund")
    with fake_provider(script) as url:
        (r,) = capped_front_ends(start, linear_bundle, tmp_path, url, handle, 1)
        r.engine.books.TIMEOUT_S = 0.1
        with r.client(KEY_A) as c:
            late = c.classify("I want my money back")
        handle.wait_idle()
    assert late.degraded_reason == "spend books unavailable"
    assert script.calls == 0
    assert handle.calls == ["reserve", "settle"]
    usage = shared.ledger.snapshot("a")
    assert shared.open == {}
    assert usage.escalations == reserved
    assert (usage.open_reservations, usage.reserved_usd, usage.spent_usd) == (0, 0.0, 0.0)


def test_shared_books_settle_by_key_and_survive_a_restart(tmp_path: Path) -> None:
    from tiergate.policy import Quota, Tenant
    from tiergate.state import StateStore

    t = Tenant("a", (), Quota(escalations_per_day=3, spend_per_day_usd=1.0))
    store = StateStore(tmp_path / "bank")
    books = SharedBooks()
    store.restore_ledger(books.ledger)
    assert books.reserve(t, 0.4, "r1")["ok"]
    assert books.reserve(t, 0.4, "r2")["ok"]
    refused = books.reserve(t, 0.4, "r3")  # 0.8 reserved + 0.4 > the spend cap
    assert not refused["ok"]
    assert "spend cap" in refused["message"]
    assert refused["retry_after_s"] > 0
    assert books.settle("r1", 0.3)
    assert not books.settle("r1", 0.3)  # settled once only
    assert not books.settle("r4", 0.0)  # released before it arrived ...
    assert not books.reserve(t, 0.1, "r4")["ok"]  # ... so it is refused when it does
    usage = books.ledger.snapshot("a")
    assert (usage.spent_usd, usage.reserved_usd, usage.open_reservations) == (0.3, 0.4, 1)
    store.close()  # the Bank stops with r2 open
    again = SharedBooks()
    store = StateStore(tmp_path / "bank")
    store.restore_ledger(again.ledger)
    usage = again.ledger.snapshot("a")
    assert usage.escalations == 2  # r2 counts at its estimate: the cap stays reached
    assert usage.spent_usd == pytest.approx(0.7)
    assert not again.settle("r2", 0.1)  # a settlement from before the restart
    assert not again.reserve(t, 0.4, "r5")["ok"]
    store.close()
