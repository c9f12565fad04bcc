"""Admission control: what cannot be served in time is refused at once, with a hint."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import escalate_everything, write_policy
from tiergate.admission import Admission
from tiergate.client import AsyncClient
from tiergate.engine import RequestError
from tiergate.v1 import classifier_pb2 as pb


def _wait_for(cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_requests_over_the_in_flight_cap_are_refused_at_once(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    limits = {"max_inflight": 2, "max_batch": 2, "max_loop_lag_ms": 0}
    policy = write_policy(
        tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle), limits=limits
    )
    script = Script(default="refund", delay_s=1.5)
    with fake_provider(script) as url:
        r = start(policy, url)
        slow: list[Any] = []
        threads = [
            threading.Thread(target=lambda i=i: slow.append(r.client().classify(f"slow {i}")))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        _wait_for(lambda: r.server.admission.inflight == 2)
        with r.client() as c:
            with pytest.raises(grpc.RpcError) as e:
                c.stub.Classify(pb.ClassifyRequest(text="one too many"), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 requests in flight" in e.value.details()
            trailers = dict(e.value.trailing_metadata())
            assert 0 < float(trailers["retry-after-s"]) <= 1
            # A batch takes a slot per item: refused whole while the cap is reached.
            batch = pb.ClassifyBatchRequest(requests=[pb.ClassifyRequest(text="x")])
            with pytest.raises(grpc.RpcError) as e:
                c.stub.ClassifyBatch(batch, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for t in threads:
                t.join(30)
            assert [a.tier for a in slow] == ["frontier", "frontier"]
            assert r.server.admission.inflight == 0  # every slot given back
            assert c.classify("room again", timeout=30).tier == "frontier"
    assert r.server.admission.refused["inflight"] == 2


def test_a_stream_refuses_single_items_and_goes_on(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    limits = {"max_inflight": 1, "max_batch": 1, "max_loop_lag_ms": 0}
    policy = write_policy(
        tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle), limits=limits
    )
    with fake_provider(Script(default="refund", delay_s=1.0)) as url:
        r = start(policy, url)
        busy = threading.Thread(target=lambda: r.client().classify("holds the slot", timeout=30))
        busy.start()
        _wait_for(lambda: r.server.admission.inflight == 1)
        with r.client() as c:
            msgs = [pb.ClassifyRequest(text=f"item {i}", client_id=str(i)) for i in range(3)]
            refused = list(c.stub.ClassifyStream(iter(msgs), timeout=30))
            busy.join(30)
            after = list(c.stub.ClassifyStream(iter(msgs[:1]), timeout=30))
    assert sorted(a.client_id for a in refused) == ["0", "1", "2"]
    assert all(a.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for a in refused)
    assert all("in flight" in a.error.message for a in refused)
    assert [(a.client_id, a.label) for a in after] == [("0", "refund")]


def test_a_lagging_event_loop_shuts_the_door_until_it_catches_up() -> None:
    async def scenario() -> tuple[str, bool, float]:
        adm = Admission(max_inflight=100, max_lag_ms=25)
        hint = 0.0
        adm.start()
        await asyncio.sleep(0.05)
        adm.admit()  # an idle loop admits
        adm.release()
        time.sleep(0.1)  # one stall alone does not shut the door ...
        await asyncio.sleep(0.006)
        adm.admit()
        adm.release()
        await asyncio.sleep(0.1)
        for _ in range(16):  # ... a backlog that persists does
            time.sleep(0.06)
            await asyncio.sleep(0)
        try:
            adm.admit()
            refused = ""
        except RequestError as e:
            refused = f"{e.code}: {e.message}"
            hint = e.retry_after_s or 0.0
        await asyncio.sleep(0.3)  # the backlog has drained
        adm.admit()
        reopened = adm.inflight == 1
        await adm.stop()
        return refused, reopened, hint

    refused, reopened, hint = asyncio.run(scenario())
    assert refused.startswith("RESOURCE_EXHAUSTED: overloaded: the server runs")
    assert "max_loop_lag_ms 25" in refused
    assert 0.05 <= hint <= 1.0
    assert reopened


def test_limits_reload_with_the_policy(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    path = write_policy(
        tmp_path / "p.yaml", linear_bundle, limits={"max_inflight": 5, "max_batch": 5}
    )
    r = start(path)
    assert r.server.admission.max_inflight == 5
    write_policy(
        path,
        linear_bundle,
        version="v2",
        limits={"max_inflight": 7, "max_batch": 7, "max_loop_lag_ms": 0},
    )
    assert r.server.reload()
    assert (r.server.admission.max_inflight, r.server.admission.max_lag_ms) == (7, 0)


def test_a_batch_limit_over_the_in_flight_cap_is_a_policy_error(
    linear_bundle: Path, tmp_path: Path
) -> None:
    from tiergate._core import ConfigError
    from tiergate.policy import load_policy

    path = write_policy(
        tmp_path / "p.yaml", linear_bundle, limits={"max_batch": 64, "max_inflight": 16}
    )
    with pytest.raises(ConfigError, match=r"max_batch \(64\) exceeds limits\.max_inflight"):
        load_policy(path)


def test_a_stream_works_on_at_most_max_batch_items_at_once(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    limits = {"max_batch": 3, "max_loop_lag_ms": 0}
    policy = write_policy(
        tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle), limits=limits
    )
    peak = 0
    done = threading.Event()

    def watch(r: Any) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, r.server.admission.inflight)
            time.sleep(0.002)

    with fake_provider(Script(default="refund", delay_s=0.05)) as url:
        r = start(policy, url)
        watcher = threading.Thread(target=watch, args=(r,))
        watcher.start()
        with r.client() as c:
            msgs = [pb.ClassifyRequest(text=f"item {i}", client_id=str(i)) for i in range(20)]
            answers = list(c.stub.ClassifyStream(iter(msgs), timeout=60))
        done.set()
        watcher.join()
    assert sorted(int(a.client_id) for a in answers) == list(range(20))
    assert all(a.label == "refund" for a in answers)
    assert 1 <= peak <= 3


def test_an_overloaded_model_refuses_newcomers_with_a_hint_and_answers_the_rest(
    start: Any, full_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real intent model in process, offered ~1,000 texts/s (more than 2 cores
    classify): once its queue stands past limits.max_queue_ms, newcomers get
    RESOURCE_EXHAUSTED at once, and the ones admitted are answered by the model."""
    policy = write_policy(
        tmp_path / "p.yaml", full_bundle, limits={"max_queue_ms": 50, "max_batch": 8}
    )
    r = start(policy)
    caplog.set_level(logging.INFO, logger="tiergate.decisions")

    async def main() -> list[Any]:
        async with AsyncClient(r.address) as c:

            async def one(i: int) -> Any:
                await asyncio.sleep(i / 1000)  # open loop: 1,000 arrivals per second
                try:
                    return await c.classify(
                        f"where is parcel number {i} now", force_tier="intent", timeout=30
                    )
                except grpc.aio.AioRpcError as e:
                    return e

            return list(await asyncio.gather(*(one(i) for i in range(1500))))

    outcomes = asyncio.run(main())
    answered = [o for o in outcomes if not isinstance(o, grpc.aio.AioRpcError)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert answered
    assert refused
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, {
        e.details() for e in refused if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
    }
    assert all("intent model is overloaded" in (e.details() or "") for e in refused)
    assert all(float(dict(e.trailing_metadata())["retry-after-s"]) > 0 for e in refused)
    assert {a.tier for a in answered} == {"intent"}
    assert not any(a.degraded for a in answered)
    # Nothing lost: every request the engine admitted left exactly one record, its
    # decision or its error (the event-loop guard may refuse some before admission).
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "tiergate.decisions"]
    ids = [x["request_id"] for x in lines]
    assert len(ids) == len(set(ids))
    assert {a.request_id for a in answered} <= set(ids)
    in_engine = [e for e in refused if "intent model" in (e.details() or "")]
    assert len(lines) == len(answered) + len(in_engine)
    # Refusals for overload do not count against the tenant's daily requests.
    assert r.engine.ledger.snapshot("anonymous").requests == len(answered)
