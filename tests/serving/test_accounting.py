"""Nothing lost: after faults, every admitted request has exactly one decision-log
record, and every spend reservation is settled."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import KEY_A, escalate_everything, tenant_a_with, write_policy


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
