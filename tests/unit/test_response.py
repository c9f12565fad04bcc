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
