"""The gRPC front end over real loopback gRPC: answers, status codes, quotas, reload, caches."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import (
    KEY_A,
    KEY_B,
    code_of,
    escalate_everything,
    tenant_a_with,
    write_policy,
)
from tiergate.engine import Engine, in_process_runtime
from tiergate.policy import load_policy
from tiergate.server import build_runtimes
from tiergate.v1 import classifier_pb2 as pb


def test_classify_answers_with_the_path_it_took(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with r.client() as c:
        a = c.classify("I forgot my password, please reset it", timeout=5)
    assert a.label == "reset_password"
    assert a.tier in ("rules", "linear")
    assert [s.tier for s in a.path][: len(a.path)] == ["rules", "linear"][: len(a.path)]
    assert a.path[-1].accepted
    assert a.path[-1].confidence >= a.path[-1].threshold
    assert a.policy_version == "v1"
    assert len(a.request_id) == 32
    assert not a.degraded


def test_status_codes(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "p.yaml", linear_bundle, auth={"required": True})
    r = start(policy)
    with r.client(KEY_A) as c:
        assert code_of(lambda: c.classify("   ", timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            code_of(lambda: c.classify("x" * 2001, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
        )
        # The limit is in UTF-8 bytes: 700 characters of 3 bytes each are over it.
        with pytest.raises(grpc.RpcError) as e:
            c.classify("€" * 700, timeout=5)
        assert "text is 2100 bytes; the limit is 2000" in (e.value.details() or "")
        assert c.classify("€" * 500 + " hello", timeout=5).label  # 1,506 bytes: served
        assert (
            code_of(lambda: c.classify("hi", task="nope", timeout=5))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        with pytest.raises(grpc.RpcError) as e:
            c.classify_batch(["hello", "", "bye"], timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "requests[1]: text is empty" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            c.classify_batch(["hi"] * 9, timeout=5)
        assert "exceeds the limit of 8" in (e.value.details() or "")
        assert c.classify("hello there", timeout=5).label == "greeting"
    with r.client() as anonymous:
        assert (
            code_of(lambda: anonymous.classify("hello", timeout=5))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    with r.client("wrong") as wrong:
        assert (
            code_of(lambda: wrong.classify("hello", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        )
    # invalid UTF-8 never reaches the engine: gRPC's own protobuf parsing refuses it
    channel = grpc.insecure_channel(r.address)
    raw = channel.unary_unary("/tiergate.v1.Classifier/Classify")
    with pytest.raises(grpc.RpcError):
        raw(b"\x0a\x02\xff\xfe", timeout=5, metadata=(("x-api-key", KEY_A),))
    channel.close()


def test_request_quota_refuses_with_a_retry_hint(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    tenants = tenant_a_with({"requests_per_day": 3})
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle, tenants=tenants))
    with r.client(KEY_A) as c:
        for _ in range(3):
            c.classify("hello", timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            c.classify("hello", timeout=5)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 requests per day" in (e.value.details() or "")
    trailers = dict(e.value.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert 0 < float(trailers["retry-after-s"]) <= 86_400


def test_spend_cap_holds_under_concurrency(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    # Every text escalates (the gate never accepts); each call costs 105 tokens x $1/M.
    tenants = tenant_a_with({"spend_per_day_usd": 0.002})
    tasks = escalate_everything(linear_bundle)
    script = Script(default="greeting", delay_s=0.05)
    with fake_provider(script) as url:
        r = start(
            write_policy(tmp_path / "p.yaml", linear_bundle, tenants=tenants, tasks=tasks), url
        )
        with r.client(KEY_A) as c, ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda i: c.classify(f"hello number {i}", timeout=10), range(40))
            )
    usage = r.engine.ledger.snapshot("a")
    escalated = [a for a in answers if a.tier == "frontier"]
    degraded = [a for a in answers if a.degraded]
    assert usage.spent_usd <= 0.002
    assert usage.reserved_usd == pytest.approx(0.0, abs=1e-12)
    assert len(escalated) == script.calls == usage.escalations
    assert escalated
    assert degraded
    assert all("quota reached" in a.degraded_reason for a in degraded)
    assert sum(a.cost_usd for a in escalated) == pytest.approx(usage.spent_usd)


def test_caches_are_per_tenant(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    tasks = escalate_everything(linear_bundle)
    script = Script(answers={"what time is it": "greeting"})
    keep_all = {"min_confidence": 0}  # every frontier answer is kept: this is about whose
    with fake_provider(script) as url:
        r = start(
            write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks, cache=keep_all), url
        )
        with r.client(KEY_A) as a, r.client(KEY_B) as b:
            first = a.classify("what time is it", timeout=5)
            again = a.classify("What  time is it", timeout=5)  # same after normalisation
            other = b.classify("what time is it", timeout=5)
    assert (first.tier, first.cached) == ("frontier", False)
    assert (again.cached, again.cache, again.label) == (True, "exact", "greeting")
    # The exact cache sits behind the cheap tiers (it keeps none of their answers):
    # they ran and declined before it answered.
    assert [(s.tier, s.accepted) for s in again.path] == [
        ("rules", False), ("linear", False), ("exact_cache", True)
    ]  # fmt: skip
    assert again.cost_usd == 0
    assert not other.cached  # tenant b never sees tenant a's entry
    assert script.calls == 2


def test_review_route_and_idempotency(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with r.client(KEY_A) as c:
        a = c.classify("hello", risk_tags=["legal"], timeout=5)
        one = c.classify("hello friend", idempotency_key="k1", timeout=5)
        two = c.classify("hello friend", idempotency_key="k1", timeout=5)
    assert (a.label, a.tier, a.pending_review) == ("pending_review", "review", True)
    assert r.engine.review_queue[-1]["request_id"] == a.request_id
    assert one.request_id == two.request_id
    assert r.engine.ledger.snapshot("a").requests == 2


def test_stream_answers_each_item_and_reports_bad_ones(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))

    async def run() -> list[pb.ClassifyResponse]:
        from tiergate.client import AsyncClient

        async with AsyncClient(r.address) as c:
            call = c.stream()
            for i, text in enumerate(["hello", "", "reset my password"]):
                await call.write(pb.ClassifyRequest(text=text, client_id=str(i)))
            await call.done_writing()
            return [m async for m in call]

    answers = {a.client_id: a for a in asyncio.run(run())}
    assert set(answers) == {"0", "1", "2"}
    assert answers["1"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["0"].label == "greeting"
    assert answers["2"].label == "reset_password"


def test_policy_reload_under_load(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    path = write_policy(tmp_path / "p.yaml", linear_bundle)
    r = start(path)
    versions: list[str] = []
    failures: list[Exception] = []
    stop = threading.Event()

    def load() -> None:
        with r.client() as c:
            while not stop.is_set():
                try:
                    versions.append(c.classify("hello", timeout=5).policy_version)
                except grpc.RpcError as e:
                    failures.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    write_policy(path, linear_bundle, version="v2")
    deadline = time.monotonic() + 10
    while r.engine.policy.version != "v2" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    path.write_text("version: v3\ntasks: {intents: {bundle: 12}}\n")  # invalid: rejected
    deadline = time.monotonic() + 10
    while r.server.reloads["rejected"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert not failures
    assert r.server.reloads == {"ok": 1, "rejected": 1}
    assert r.engine.policy.version == "v2"
    assert versions[0] == "v1"
    assert versions[-1] == "v2"
    assert "v3" not in versions


def test_health_reflection_and_metrics(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    channel = grpc.insecure_channel(r.address)
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="tiergate.v1.Classifier"), timeout=5
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "tiergate.v1.Classifier" in names
    channel.close()
    with r.client() as c:
        c.classify("hello", timeout=5)
    sample = r.server.metrics.registry.get_sample_value
    assert sample("tiergate_requests_total", {"tier": "linear", "outcome": "ok"}) or sample(
        "tiergate_requests_total", {"tier": "rules", "outcome": "ok"}
    )


def test_short_deadline_degrades_instead_of_timing_out(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    tasks = escalate_everything(full_bundle)
    r = start(write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks))
    with r.client() as c:
        for i in range(8):  # the engine learns the intent model's latency
            c.classify(f"hello there number {i}", timeout=30)
        p95 = r.engine.latency.p95("intents/intent")
        # Half the model's p95: ample for the cheap tiers and loopback gRPC (~1 ms),
        # too short for the model, so the engine must not even try it.
        answer = c.classify("hello again", timeout=p95 / 2 / 1000)
    assert p95 > 4.0, f"the intent model answered implausibly fast ({p95:.1f} ms)"
    assert answer.degraded
    assert "latency budget" in answer.degraded_reason
    assert answer.tier == "linear"  # the best answer so far
    assert any(s.tier == "intent" and s.note.startswith("skipped") for s in answer.path)


def test_task_latency_targets_bound_the_tiers(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    tasks = escalate_everything(full_bundle)
    tasks["intents"]["latency"] = {"p95_ms": 0.5, "p99_ms": 30_000}
    r = start(write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks))
    with r.client() as c:
        answers = [c.classify(f"hello number {i}", timeout=30) for i in range(8)]
    # the first calls measure the model; once its p95 is known to exceed 0.5 ms it is skipped
    assert not answers[0].degraded or "not configured" in answers[0].degraded_reason
    last = answers[-1]
    assert last.degraded
    assert "exceeds the task's p95 target of 0.5 ms" in last.degraded_reason
    assert last.tier == "linear"


def test_classify_command(
    start: Any, linear_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiergate.cli import main

    r = start(write_policy(tmp_path / "p.yaml", linear_bundle, auth={"required": True}))
    assert main(["classify", "--address", r.address, "--api-key", KEY_A, "hello there"]) == 0
    assert capsys.readouterr().out.startswith("greeting\t")
    assert main(["classify", "--address", r.address, "--api-key", KEY_A, "--json", "hi"]) == 0
    assert '"policyVersion": "v1"' in capsys.readouterr().out
    assert main(["classify", "--address", r.address, "hello"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    # Each text on its own: one that cannot be sent (bytes that are not UTF-8, as
    # a shell passes them) or is refused does not stop the ones after it.
    texts = ["hi", "caf\udcc3", "", "hello there"]
    assert main(["classify", "--address", r.address, "--api-key", KEY_A, *texts]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[-1] for line in out.splitlines()] == ["hi", "hello there"]
    assert "not valid UTF-8" in err
    assert "INVALID_ARGUMENT" in err
    # Bad options are told, not raised.
    for bad in (["--timeout", "inf"], ["--timeout", "-1"], ["--tls-cert", str(tmp_path)],
                ["--tls-ca", str(tmp_path)], ["--api-key", "clé"]):  # fmt: skip
        try:
            code = main(["classify", "--address", r.address, *bad, "hi"])
        except SystemExit as e:  # argparse refusing a value
            code = int(e.code or 0)
        assert code == 2, bad
        assert capsys.readouterr().err.strip(), bad


def test_deadline_and_unavailable_codes(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    slow = Script(default="greeting", delay_s=1.0)
    with fake_provider(slow) as url:
        tasks = escalate_everything(linear_bundle)
        r2 = start(write_policy(tmp_path / "q.yaml", linear_bundle, tasks=tasks), url)
        with r2.client(KEY_A) as c:
            # Only the frontier may answer, and it is slower than the deadline.
            with pytest.raises(grpc.RpcError) as e:
                c.classify("hello", force_tier="frontier", timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # With a local answer in hand, the same wait ends in a degraded answer in time.
            answer = c.classify("hello there", timeout=0.5)
        assert answer.degraded
        assert "no answer within the request's deadline" in answer.degraded_reason
        assert answer.tier in ("rules", "linear")
        time.sleep(1.2)  # the abandoned provider calls finish; their reservations are settled
        usage = r2.engine.ledger.snapshot("a")
        assert usage.reserved_usd == pytest.approx(0.0, abs=1e-12)
        assert usage.spent_usd > 0  # a call cut short may have been paid: it is charged
    with r.client() as c:
        # stopping at the rules tier with no rule matching leaves nobody to answer
        with pytest.raises(grpc.RpcError) as e:
            c.classify("what a lovely day", max_tier="rules", timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no tier could answer" in (e.value.details() or "")
        assert c.classify("hello", timeout=5).label == "greeting"  # still serving


def test_model_calls_are_batched(start: Any, full_bundle: Path, tmp_path: Path) -> None:
    r = start(
        write_policy(tmp_path / "p.yaml", full_bundle, tasks=escalate_everything(full_bundle))
    )
    with r.client() as c, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: c.classify(f"order number {i}", timeout=60), range(32)))
    runtime = r.engine.runtimes["intents"]
    assert runtime.batcher is not None
    visits = sum(any(s.tier == "intent" and s.label for s in a.path) for a in answers)
    assert visits == 32
    assert runtime.batcher.batches < visits  # concurrent misses shared forward passes


def test_decision_log_lines(
    start: Any, linear_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json as json_

    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with caplog.at_level("INFO", logger="tiergate.decisions"), r.client(KEY_A) as c:
        answer = c.classify("my secret text says hello", timeout=5)
    lines = [
        json_.loads(rec.getMessage()) for rec in caplog.records if rec.name == "tiergate.decisions"
    ]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == answer.request_id
    assert line["tenant"] == "a"
    assert line["policy_version"] == "v1"
    assert line["path"][0][0] == "rules"
    assert "text" not in line  # raw text only when the policy allows it
    assert "secret" not in json_.dumps(line)
    assert KEY_A not in json_.dumps(line)


def test_semantic_cache_is_per_tenant_and_per_policy_version(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    tasks = escalate_everything(full_bundle)
    tasks["intents"]["thresholds"]["intent"] = {"general": 1.01}
    cache = {"semantic_threshold": 0.9, "min_confidence": 0}  # keep all: this is about whose
    script = Script(default="track_order")
    path = tmp_path / "p.yaml"
    with fake_provider(script) as url:
        r = start(write_policy(path, full_bundle, tasks=tasks, cache=cache), url)
        with r.client(KEY_A) as a, r.client(KEY_B) as b:
            first = a.classify("where is my parcel right now", timeout=30)
            near = a.classify("where is my parcel right now?", timeout=30)  # not an exact match
            other = b.classify("where is my parcel right now?", timeout=30)
            write_policy(path, full_bundle, tasks=tasks, cache=cache, version="v2")
            deadline = time.monotonic() + 10
            while r.engine.policy.version != "v2" and time.monotonic() < deadline:
                time.sleep(0.1)
            after = a.classify("where is my parcel right now?", timeout=30)
    assert (first.tier, first.cached) == ("frontier", False)
    assert (near.cached, near.cache, near.label) == (True, "semantic", "track_order")
    assert near.cost_usd == 0
    assert near.path[-1].tier == "semantic_cache"
    assert near.path[-1].confidence >= 0.9
    assert not other.cached  # tenant b never sees tenant a's entries
    assert not after.cached  # a new policy version never serves the old decisions
    assert after.policy_version == "v2"
    assert script.calls == 3


def test_on_skip_escalate_sends_a_too_slow_model_tier_to_the_frontier(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    tasks = escalate_everything(full_bundle)
    tasks["intents"]["thresholds"]["intent"] = {"general": 1.01}
    tasks["intents"]["latency"] = {"p95_ms": 0.5, "on_skip": "escalate"}
    script = Script(default="greeting")
    with fake_provider(script) as url:
        r = start(write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks), url)
        with r.client() as c:
            answers = [c.classify(f"hello number {i}", timeout=30) for i in range(8)]
    last = answers[-1]
    assert any(s.tier == "intent" and s.note.startswith("skipped") for s in last.path)
    assert (last.tier, last.label, last.degraded, last.cached) == (
        "frontier",
        "greeting",
        False,
        False,
    )
    assert script.calls == sum(a.tier == "frontier" and not a.cached for a in answers)


def test_reload_reuses_loaded_tiers_and_shared_bundles_load_once(
    linear_bundle: Path, tmp_path: Path
) -> None:
    tasks = {"one": {"bundle": str(linear_bundle)}, "two": {"bundle": str(linear_bundle),
             "thresholds": {"linear": {"general": 0.99}}}}  # fmt: skip
    path = write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks)
    loads: list[str] = []

    def counting_factory(task: Any) -> Any:
        loads.append(task.name)
        return in_process_runtime(task)

    policy = load_policy(path)
    runtimes = build_runtimes(policy, counting_factory)
    assert loads == ["one"]  # "two" shares the bundle
    assert runtimes["two"].linear is runtimes["one"].linear
    assert runtimes["two"].gates["linear"].threshold("general") == 0.99
    again = build_runtimes(load_policy(path), counting_factory, runtimes)
    assert loads == ["one"]  # the reload read nothing from disk
    assert again["one"].linear is runtimes["one"].linear


@contextmanager
def escalating(start: Any, bundle: Path, tmp_path: Path, script: Script) -> Iterator[Any]:
    """A running server that escalates every request to a loopback provider playing
    ``script``."""
    with fake_provider(script) as url:
        tasks = escalate_everything(bundle)
        yield start(write_policy(tmp_path / "p.yaml", bundle, tasks=tasks), url)


def test_concurrent_retries_with_one_idempotency_key_decide_once(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    script = Script(default="greeting", delay_s=0.3)
    with (
        escalating(start, linear_bundle, tmp_path, script) as r,
        r.client(KEY_A) as c,
        ThreadPoolExecutor(5) as pool,
    ):
        answers = list(
            pool.map(lambda _: c.classify("hi", idempotency_key="k", timeout=10), range(5))
        )
    assert {a.request_id for a in answers} == {answers[0].request_id}
    assert script.calls == 1
    assert r.engine.ledger.snapshot("a").escalations == 1


def test_a_quota_reached_inside_a_batch_fails_only_that_item(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    tenants = tenant_a_with({"requests_per_day": 2})
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle, tenants=tenants))
    with r.client(KEY_A) as c:
        answers = c.classify_batch(["hello", "hello there", "hi"], timeout=5)
    errors = [a for a in answers if a.error.code]
    assert len(answers) == 3
    assert len(errors) == 1
    assert errors[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert all(a.label == "greeting" for a in answers if not a.error.code)


def test_a_reload_applies_new_semantic_cache_settings(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    path = write_policy(tmp_path / "p.yaml", full_bundle, cache={"semantic_threshold": 0.9})
    r = start(path)
    assert r.engine.semantic is not None
    assert r.engine.semantic.threshold == pytest.approx(0.9)
    write_policy(path, full_bundle, version="v2", cache={"semantic_threshold": 0.97})
    assert r.server.reload()
    assert r.engine.policy.version == "v2"
    assert r.engine.semantic.threshold == pytest.approx(0.97)


def test_a_retry_waiting_on_a_cancelled_first_attempt_is_told_to_send_again(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    script = Script(default="greeting", delay_s=1.0)
    with escalating(start, linear_bundle, tmp_path, script) as r, r.client(KEY_A) as c:
        msg = pb.ClassifyRequest(text="hi", idempotency_key="k")
        first = c.stub.Classify.future(msg, timeout=10, metadata=c.metadata)
        time.sleep(0.3)  # the first attempt is at the frontier
        retry = c.stub.Classify.future(msg, timeout=10, metadata=c.metadata)
        time.sleep(0.3)  # the retry waits for the first attempt's answer
        first.cancel()
        with pytest.raises(grpc.RpcError) as failed:
            retry.result()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "send it again" in failed.value.details()
        assert c.classify("hi", idempotency_key="k", timeout=10).label == "greeting"


def test_a_first_attempt_evicted_from_the_key_table_still_answers_its_retries(
    start: Any, linear_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Engine, "IDEMPOTENCY_KEYS", 1)
    script = Script(default="greeting", delay_s=1.0)
    with escalating(start, linear_bundle, tmp_path, script) as r, r.client(KEY_A) as c:

        def call(key: str) -> Any:
            msg = pb.ClassifyRequest(text="hi", idempotency_key=key)
            return c.stub.Classify.future(msg, timeout=5, metadata=c.metadata)

        first = call("a")
        time.sleep(0.3)
        retry = call("a")  # waits on the first attempt
        time.sleep(0.1)
        other = call("b")  # a newer key pushes "a" out of the table
        answers = [f.result() for f in (first, retry, other)]
    assert [a.label for a in answers] == ["greeting"] * 3
    assert answers[1].request_id == answers[0].request_id


def test_a_stream_nobody_reads_does_not_shut_out_other_calls(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """Answers waiting to be sent hold their stream's queue, not admission slots: a
    client that writes and never reads must not make every other call overloaded."""
    limits = {"max_text_bytes": 2000, "max_batch": 8, "max_inflight": 8}
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle, limits=limits))
    with r.client(KEY_A) as c:
        n = 40_000  # more answers than flow control lets through unread
        requests = (pb.ClassifyRequest(text="hello there") for _ in range(n))
        stream = c.stub.ClassifyStream(requests, metadata=c.metadata)
        try:
            answered = r.server.metrics.decisions.answered
            before, deadline = -1, time.monotonic() + 60
            while answered() != before and time.monotonic() < deadline:  # until it stalls
                before = answered()
                time.sleep(1.0)
            assert answered() < n, "the stream never stalled: nothing was tested"
            assert c.classify("hello", timeout=5).label
        finally:
            stream.cancel()


def test_each_label_is_gated_at_its_domain_threshold(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(linear_bundle, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["label_domains"] = {"reset_password": "finance"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    never, open_ = 1.01, 0.0
    thresholds = {"linear": {"general": open_, "finance": never}}
    tasks = {"intents": {"bundle": str(bundle), "tiers": ["linear"], "thresholds": thresholds}}
    r = start(write_policy(tmp_path / "p.yaml", bundle, tasks=tasks, risk={"finance": "gate"}))
    with r.client() as c:
        general = c.classify("where is my package", timeout=5)
        finance_label = c.classify("I forgot my password, please reset it", timeout=5)
        finance_tag = c.classify("where is my package", risk_tags=["finance"], timeout=5)
    assert (general.label, general.tier, general.degraded) == ("track_order", "linear", False)
    assert general.path[-1].threshold == open_
    # A label of the finance domain meets the finance threshold; so does any label of a
    # request tagged finance (a strict domain). Neither passes: the answers are degraded.
    for a, label in ((finance_label, "reset_password"), (finance_tag, "track_order")):
        (step,) = [s for s in a.path if s.tier == "linear"]
        assert (step.label, step.accepted) == (label, False)
        assert step.threshold == pytest.approx(never)
        assert a.degraded
