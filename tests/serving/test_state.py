"""State that outlives the front end: spend counters and the semantic cache survive
a restart (graceful or SIGKILL); unreadable state files are set aside, not fatal."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import yaml

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import (
    KEY_A,
    escalate_everything,
    serve_subprocess,
    sha,
    write_policy,
)
from tests.serving.test_serve_command import free_port
from tiergate import engine
from tiergate._core import ConfigError
from tiergate.accounting import DAY_S, Ledger
from tiergate.client import Client
from tiergate.policy import Tenant
from tiergate.state import CACHE, LEDGER, REVIEWS, StateDirBusy, StateStore, replay

NOW = 200 * DAY_S + 3600.0  # a fixed wall clock: the books are per day
TENANT = Tenant("a")


def books(directory: Path, clock: float = NOW) -> Ledger:
    ledger = Ledger(clock=lambda: clock)
    store = StateStore(directory)
    store.restore_ledger(ledger)
    store.close()
    return ledger


def test_the_books_survive_and_an_open_reservation_counts_at_its_estimate(
    tmp_path: Path,
) -> None:
    ledger = Ledger(clock=lambda: NOW)
    store = StateStore(tmp_path)
    store.restore_ledger(ledger)
    for _ in range(4):
        ledger.admit(TENANT)
    ledger.unadmit(TENANT)  # refused for overload: not the tenant's to pay
    settled = ledger.reserve_escalation(TENANT, 0.010)
    ledger.settle(settled, 0.004)
    ledger.reserve_escalation(TENANT, 0.020)  # in flight when the process "dies"
    with pytest.raises(StateDirBusy, match="in use"):
        StateStore(tmp_path)  # one front end per directory
    store.close()

    u = books(tmp_path).snapshot("a")
    assert (u.requests, u.escalations) == (3, 2)
    new_dir = tmp_path / "fresh"
    StateStore(new_dir).close()
    assert new_dir.stat().st_mode & 0o077 == 0  # owner only
    assert u.spent_usd == pytest.approx(0.004 + 0.020)
    # Compacted: one usage line per tenant, and replaying it again changes nothing.
    lines = (tmp_path / LEDGER).read_bytes().splitlines()
    assert [orjson.loads(x)["e"] for x in lines] == ["usage"]
    assert books(tmp_path).snapshot("a").spent_usd == pytest.approx(0.024)
    # Tomorrow the books start again.
    assert books(tmp_path, NOW + DAY_S).snapshot("a").spent_usd == 0


def test_an_unreadable_journal_line_is_set_aside_and_the_rest_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    day = int(NOW // DAY_S)
    good = {"e": "settle", "id": 1, "tenant": "a", "day": day, "usd": 0.5}
    (tmp_path / LEDGER).write_bytes(
        orjson.dumps(good) + b"\n" + b'{"e": "settle", "tenant": \n' + b"\xff\xfe\n"
        + orjson.dumps({**good, "id": 2}) + b"\n"
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tiergate.state"):
        u = books(tmp_path).snapshot("a")
    assert u.spent_usd == pytest.approx(1.0)
    assert "2 unreadable journal line(s) (line 2, 3)" in caplog.text
    kept = list(tmp_path.glob(f"{LEDGER}.corrupt-*"))
    assert len(kept) == 1
    assert b"\xff\xfe" in kept[0].read_bytes()  # the original, for a human to read
    assert replay(tmp_path / LEDGER, day).bad_lines == []  # the new journal is clean


@pytest.mark.parametrize("rules_changed", [False, True])
def test_a_restart_keeps_the_semantic_cache_and_the_spend(
    start: Any,
    full_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rules_changed: bool,
) -> None:
    """Unless what the caches keep has changed since the snapshot: its entries were kept
    under other rules, and are not served."""
    tasks = escalate_everything(full_bundle)
    tasks["intents"]["thresholds"]["intent"] = {"general": 1.01}
    policy = write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks,
                          cache={"semantic_threshold": 0.9, "min_confidence": 0})  # fmt: skip
    state = tmp_path / "state"
    script = Script(default="track_order")
    with fake_provider(script) as url:
        r = start(policy, url, state_dir=state)
        with r.client(KEY_A) as a:
            first = a.classify("where is my parcel right now", timeout=30)
        r.stop()
        assert (state / CACHE).exists()
        if rules_changed:
            monkeypatch.setattr(engine, "CACHE_RULES", engine.CACHE_RULES + 1)
        r2 = start(policy, url, state_dir=state)
        assert r2.engine.semantic is not None
        restored = len(r2.engine.semantic)  # those other rules kept are dropped, not held
        with r2.client(KEY_A) as a:
            near = a.classify("where is my parcel right now?", timeout=30)  # not an exact key
    assert (first.tier, first.cost_usd > 0) == ("frontier", True)
    assert restored == (0 if rules_changed else 1)
    if rules_changed:
        assert (near.cached, near.tier, near.cost_usd > 0) == (False, "frontier", True)
        assert script.calls == 2
        return
    assert (near.cached, near.cache, near.label, near.cost_usd) == (
        True, "semantic", "track_order", 0
    )  # fmt: skip
    assert script.calls == 1
    assert r2.engine.ledger.snapshot("a").spent_usd == pytest.approx(first.cost_usd)


@pytest.mark.parametrize("first", ["v1", "x/v3"])
def test_a_snapshot_after_reloads_leaves_out_all_but_the_last_two_versions_entries(
    start: Any, full_bundle: Path, tmp_path: Path, first: str
) -> None:
    """No request reads a replaced policy's namespaces again, except after a rollback to
    the one just replaced: older ones are cleared rather than held in memory, and saved,
    until their TTL. A version with a "/" (x/v3) is no exception, though its namespace
    would end like v3's if the version were not encoded."""
    tasks = escalate_everything(full_bundle)
    tasks["intents"]["thresholds"]["intent"] = {"general": 1.01}
    cache = {"semantic_threshold": 0.9, "min_confidence": 0}
    policy = write_policy(tmp_path / "p.yaml", full_bundle, version=first, tasks=tasks,
                          cache=cache)  # fmt: skip
    texts = ["where is my parcel right now", "is my refund on its way", "cancel it all"]
    with fake_provider(Script(default="track_order")) as url:
        r = start(policy, url, state_dir=tmp_path / "state")
        semantic = r.engine.semantic
        assert semantic is not None
        for version, text in zip([first, "v2", "v3"], texts, strict=True):
            if version != first:
                write_policy(policy, full_bundle, version=version, tasks=tasks, cache=cache)
                assert r.server.reload()
            with r.client(KEY_A) as a:
                a.classify(text, timeout=30)  # an entry under this version
        assert r.engine.semantic is semantic  # same settings: the same cache went on
        assert len(semantic) == 3
        before = semantic.stats()["total"]
        asyncio.run_coroutine_threadsafe(r.server._save_cache(), r.loop).result(30)
        after = semantic.stats()
        # The first version's namespace is gone whole (its index too), not kept empty: every reload
        # would otherwise leave one behind per tenant and task.
        kept = set(after["namespaces"])
        assert kept == {f"a/intents/{v}/rules{engine.CACHE_RULES}" for v in ("v2", "v3")}
        assert len(semantic) == 2
        # Its lookups still count: the totals never go backwards.
        assert {**after["total"], "entries": 3} == before
        assert before["misses"] >= 3
        r.stop()


def test_a_corrupt_cache_snapshot_is_set_aside_and_the_server_starts(
    start: Any, full_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE).write_bytes(b"TGSCACHE" + b"\x01\x00\x00\x00" + b"\x00" * 40)
    with caplog.at_level(logging.WARNING, logger="tiergate.state"):
        r = start(write_policy(tmp_path / "p.yaml", full_bundle), state_dir=state)
    with r.client(KEY_A) as a:
        assert a.classify("where is my parcel", timeout=30).label
    assert "semantic.tgcache" in caplog.text
    assert "checksum" in caplog.text or "payload" in caplog.text
    assert len(list(state.glob(f"{CACHE}.corrupt-*"))) == 1


def _serve(policy: Path, state: Path, url: str, port: int) -> subprocess.Popen[str]:
    proc, _ = serve_subprocess(
        "--config", str(policy), "--address", f"127.0.0.1:{port}", "--metrics-port", "0",
        "--state-dir", str(state), "--frontier-url", url, "--price-in", "10", "--price-out", "10",
    )  # fmt: skip
    return proc


def test_a_killed_server_comes_back_with_its_spend_cap_still_reached(
    linear_bundle: Path, tmp_path: Path
) -> None:
    """SIGKILL, no goodbye: the journal alone carries the books across."""
    doc = {
        "version": "v1",
        "tasks": escalate_everything(linear_bundle),
        # 105 tokens at $10/M: ~$0.00105 per escalation, so the cap allows 3.
        "tenants": {
            "a": {
                "key_sha256": [sha(KEY_A)],
                "on_quota": "reject",
                "quota": {"spend_per_day_usd": 0.0035},
            }
        },
    }
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc))
    state, port = tmp_path / "state", free_port()
    with fake_provider(Script(default="refund")) as url:
        proc = _serve(policy, state, url, port)
        try:
            charged, refused = 0.0, []
            with Client(f"127.0.0.1:{port}", api_key=KEY_A) as c:
                for i in range(6):
                    try:
                        charged += c.classify(f"money question {i}", timeout=10).cost_usd
                    except grpc.RpcError as e:
                        refused.append(e.code())
            assert charged > 0
            # The cap was reached before the kill.
            assert refused
            assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            proc = _serve(policy, state, url, port)
            with Client(f"127.0.0.1:{port}", api_key=KEY_A) as c, pytest.raises(grpc.RpcError) as e:
                c.classify("one more money question", timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "spend cap" in (e.value.details() or "")
        finally:
            proc.kill()
            proc.communicate()
    day = replay(state / LEDGER, int(time.time() // DAY_S))
    assert day.usage["a"].spent_usd == pytest.approx(charged)


def test_an_unusable_state_directory_is_a_clear_config_error(tmp_path: Path) -> None:
    in_the_way = tmp_path / "state"
    in_the_way.write_text("a file where the directory should be")
    with pytest.raises(ConfigError, match=r"state directory .*state.*--state-dir none"):
        StateStore(in_the_way)


@pytest.mark.parametrize("raw_text", [False, True])
def test_requests_routed_to_review_are_kept_in_the_state_directory_and_logged(
    start: Any,
    linear_bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    raw_text: bool,
) -> None:
    """A review system reads reviews.jsonl: it outlives the process, a restart appends
    to it, and it holds the text only where the policy lets texts be kept."""
    policy = write_policy(tmp_path / "p.yaml", linear_bundle, log={"raw_text": raw_text})
    state = tmp_path / "state"
    with caplog.at_level(logging.WARNING, logger="tiergate.review"):
        r = start(policy, state_dir=state)
        with r.client(KEY_A) as c:
            first = c.classify("see you in court", risk_tags=["legal"], timeout=5)
            plain = c.classify("hello", timeout=5)  # not routed to review: no line
        r.stop()
        r2 = start(policy, state_dir=state)
        with r2.client(KEY_A) as c:
            second = c.classify("my lawyer will call", risk_tags=["legal"], timeout=5)
        r2.stop()
    assert (first.tier, second.tier, plain.pending_review) == ("review", "review", False)
    path = state / REVIEWS
    assert path.stat().st_mode & 0o077 == 0  # owner only (its directory is, too)
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [x["request_id"] for x in lines] == [first.request_id, second.request_id]
    one = lines[0]
    assert (one["tenant"], one["task"], one["risk_tags"], one["routed_by"]) == (
        "a", "intents", ["legal"], "legal"
    )  # fmt: skip
    assert one["policy_version"] == "v1"
    assert abs(one["time"] - time.time()) < 120
    assert [("text" in x) for x in lines] == [raw_text, raw_text]
    if raw_text:
        assert [x["text"] for x in lines] == ["see you in court", "my lawyer will call"]
    logged = [orjson.loads(x.getMessage()) for x in caplog.records if x.name == "tiergate.review"]
    assert logged == lines  # the same record, for whoever reads the logs


def test_a_review_file_that_cannot_be_opened_leaves_the_log_as_the_record(
    start: Any, linear_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server starts, and says where its review records go."""
    policy = write_policy(tmp_path / "p.yaml", linear_bundle)
    state = tmp_path / "state"
    (state / REVIEWS).mkdir(parents=True)  # in the way: cannot be opened as a file
    with caplog.at_level(logging.WARNING, logger="tiergate"):
        r = start(policy, state_dir=state)
        with r.client(KEY_A) as c:
            routed = c.classify("see you in court", risk_tags=["legal"], timeout=5)
        r.stop()
    assert routed.pending_review
    assert "review records go to the log only" in caplog.text
    logged = [orjson.loads(x.getMessage()) for x in caplog.records if x.name == "tiergate.review"]
    assert [x["request_id"] for x in logged] == [routed.request_id]
