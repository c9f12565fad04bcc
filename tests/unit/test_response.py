"""The gRPC response carries every field of the engine's decision."""

from __future__ import annotations

import dataclasses

import pytest

from tiergate.engine import Decision, Step
from tiergate.server import to_proto
from tiergate.v1 import classifier_pb2 as pb


def test_every_decision_field_reaches_the_response() -> None:
    steps = [
        Step("rules", "", 0.25, 0.9, False, 3, "no rule matched"),
        Step("frontier", "refund", 1.0, 0.0, True, 812, "offered 20 of 151 labels"),
    ]
    d = Decision("refund", 0.5, "frontier", steps, "ab" * 16, "v7", True, "semantic", 0.0125,
                 True, "quota reached", ["finance", "pii"], True, "client-9")  # fmt: skip
    r = to_proto(d)
    for f in dataclasses.fields(Decision):
        if f.name == "path":
            continue
        got, want = getattr(r, f.name), getattr(d, f.name)
        assert (list(got) if f.name == "risk_tags" else got) == pytest.approx(want), f.name
    assert len(r.path) == len(steps)
    for step, s in zip(r.path, steps, strict=True):
        for f in dataclasses.fields(Step):
            assert getattr(step, f.name) == pytest.approx(getattr(s, f.name)), f.name


def test_unset_optionals_stay_at_their_defaults() -> None:
    r = to_proto(Decision("x", 0.5, "linear", [], "0" * 32, "v1"))
    assert r == pb.ClassifyResponse(
        label="x", confidence=0.5, tier="linear", request_id="0" * 32, policy_version="v1"
    )


def test_every_request_field_reaches_the_engine() -> None:
    """The servicer builds the engine's Request by position (cheaper): a field added or
    moved in one place and not the other must fail here."""
    import time

    from tiergate.policy import Tenant
    from tiergate.server import ClassifierService

    class Context:
        def time_remaining(self) -> float:
            return 2.0

    msg = pb.ClassifyRequest(
        text="where is my order", task="intents", idempotency_key="idem-1", client_id="c-7",
        hints=pb.Hints(risk_tags=["finance"], force_tier="linear", max_tier="intent"),
    )  # fmt: skip
    tenant = Tenant("a")
    sent = time.monotonic()
    req = ClassifierService._request(None, msg, tenant, Context())  # type: ignore[arg-type]
    assert (req.text, req.tenant, req.task) == ("where is my order", tenant, "intents")
    assert (list(req.risk_tags), req.force_tier, req.max_tier) == (["finance"], "linear", "intent")
    assert (req.idempotency_key, req.client_id) == ("idem-1", "c-7")
    assert req.deadline is not None
    assert sent + 1.9 < req.deadline < time.monotonic() + 2.1
    assert len(req.request_id) == 32
    checked = {"text", "tenant", "task", "risk_tags", "force_tier", "max_tier",
               "idempotency_key", "client_id", "deadline", "request_id"}  # fmt: skip
    assert {f.name for f in dataclasses.fields(req)} == checked  # a new field: check it here
