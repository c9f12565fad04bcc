"""Hostile input over real gRPC: every request gets a clear status, the server lives on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import KEY_A, write_policy
from tiergate.v1 import classifier_pb2 as pb

METHODS = ("Classify", "ClassifyBatch")
# What a client may get back for a malformed or odd request; never INTERNAL/UNKNOWN.
# UNAVAILABLE: no tier could answer, e.g. a text the linear tier knows no feature of,
# on a bundle with no other tier and no frontier configured.
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE}


def _raw(channel: grpc.Channel, method: str) -> Any:
    # Bytes in, bytes out: nothing on the client side validates the request.
    return channel.unary_unary(f"/tiergate.v1.Classifier/{method}")


def _invalid_utf8(field: int, payload: bytes) -> bytes:
    # A protobuf length-delimited field: tag (field << 3 | 2), length, bytes.
    return bytes([field << 3 | 2, len(payload)]) + payload


def test_invalid_utf8_is_invalid_argument(start: Any, linear_bundle: Path, tmp_path: Path) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with grpc.insecure_channel(r.address) as ch:
        for field in (1, 2):  # text, task
            with pytest.raises(grpc.RpcError) as e:
                _raw(ch, "Classify")(_invalid_utf8(field, b"caf\xc3 \xff\xfe"), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid tiergate.v1.ClassifyRequest" in e.value.details()
            assert "UTF-8" in e.value.details()
        item = _invalid_utf8(1, b"\xff")
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "ClassifyBatch")(_invalid_utf8(1, item), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A stream answers the bad item with its error and goes on with the next.
        stream = ch.stream_stream("/tiergate.v1.Classifier/ClassifyStream")
        good = pb.ClassifyRequest(text="hello there", client_id="ok").SerializeToString()
        answers = [pb.ClassifyResponse.FromString(b) for b in
                   stream(iter([_invalid_utf8(1, b"\xff"), good]), timeout=10)]  # fmt: skip
    errors = [a for a in answers if a.error.code]
    assert len(answers) == 2
    assert len(errors) == 1
    assert errors[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert any(a.client_id == "ok" and a.label for a in answers)


def test_an_oversized_message_is_refused_clearly(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with grpc.insecure_channel(r.address) as ch:
        huge = pb.ClassifyRequest(text="a" * (9 << 20)).SerializeToString()
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "Classify")(huge, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in e.value.details()
        big = pb.ClassifyRequest(text="a" * 100_000).SerializeToString()  # under 8 MB
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "Classify")(big, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit" in e.value.details()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(METHODS),
    data=st.one_of(
        st.binary(max_size=300),
        # Well-formed messages with hostile text: control characters, odd scripts,
        # deep repetitions, sizes around the configured limit.
        st.builds(
            lambda t, n: pb.ClassifyRequest(text=t * n).SerializeToString(),
            st.text(st.characters(codec="utf-8"), max_size=40),
            st.integers(1, 80),
        ),
    ),
)
def test_fuzzed_requests_get_clear_statuses(
    start: Any, linear_bundle: Path, tmp_path: Path, method: str, data: bytes
) -> None:
    r = _server(start, linear_bundle, tmp_path)
    with grpc.insecure_channel(r.address) as ch:
        details = "ok"
        try:
            _raw(ch, method)(data, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        assert code in CLEAR, (code, data[:80])
        assert details, "an error must say what is wrong"
        if code == grpc.StatusCode.UNAVAILABLE:
            assert "no tier could answer" in details, details
        # ... and the server still answers a normal request.
        ok = ch.unary_unary(
            "/tiergate.v1.Classifier/Classify",
            request_serializer=pb.ClassifyRequest.SerializeToString,
            response_deserializer=pb.ClassifyResponse.FromString,
        )(pb.ClassifyRequest(text="hello there"), timeout=10)
        assert ok.label


_servers: dict[int, Any] = {}


def _server(start: Any, bundle: Path, tmp_path: Path) -> Any:
    # One server for all the examples hypothesis draws in one test run: the
    # function-scoped fixture lives across them, and stops the server after.
    key = id(start)
    if key not in _servers:
        _servers.clear()
        _servers[key] = start(write_policy(tmp_path / "p.yaml", bundle))
    return _servers[key]


def test_ids_tags_and_contradictory_hints_are_bounded(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """What the server keeps per request (idempotency keys, client ids, risk tags) is
    bounded like the text, and hints that leave no tier are refused up front."""
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with r.client(KEY_A) as c:
        cases = [
            pb.ClassifyRequest(text="hi", idempotency_key="k" * 257),
            pb.ClassifyRequest(text="hi", client_id="c" * 257),
            pb.ClassifyRequest(text="hi", hints=pb.Hints(risk_tags=["t"] * 33)),
            pb.ClassifyRequest(text="hi", hints=pb.Hints(risk_tags=["t" * 257])),
            pb.ClassifyRequest(text="hi", hints=pb.Hints(force_tier="frontier", max_tier="rules")),
        ]
        for msg in cases:
            with pytest.raises(grpc.RpcError) as e:
                c.stub.Classify(msg, timeout=5, metadata=c.metadata)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, msg
        assert "no tier is left" in e.value.details()
        ok = pb.ClassifyRequest(text="hi", idempotency_key="k" * 256, client_id="c" * 256)
        assert c.stub.Classify(ok, timeout=5, metadata=c.metadata).client_id == "c" * 256


def test_binary_metadata_does_not_break_a_call(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with r.client(KEY_A) as c:
        metadata = (("x-trace-bin", b"\xff\xfe"), *c.metadata)
        answer = c.stub.Classify(pb.ClassifyRequest(text="hello"), timeout=5, metadata=metadata)
        assert answer.label


def test_an_idempotency_key_names_one_request(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """A key sent again with the same request answers as the first time (under this
    call's client id); with another request it is refused, not answered wrongly."""
    r = start(write_policy(tmp_path / "p.yaml", linear_bundle))
    with r.client(KEY_A) as c:

        def ask(text: str, client_id: str) -> Any:
            msg = pb.ClassifyRequest(text=text, idempotency_key="k", client_id=client_id)
            return c.stub.Classify(msg, timeout=5, metadata=c.metadata)

        first, again = ask("reset my password", "c1"), ask("reset my password", "c2")
        assert (again.request_id, again.label) == (first.request_id, first.label)
        assert (first.client_id, again.client_id) == ("c1", "c2")
        with pytest.raises(grpc.RpcError) as e:
            ask("hello there", "c3")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "different request" in e.value.details()


def test_a_text_the_linear_tier_knows_nothing_of_is_not_its_to_answer(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """Emoji, symbols, unseen words: training saw no feature of them, so the linear
    tier's scores are its intercepts alone, one confident label for all of them."""
    with fake_provider(Script(default="track_order")) as url:
        frontier = {"providers": [{"name": "p", "base_url": url, "model": "m"}]}
        r = start(write_policy(tmp_path / "p.yaml", linear_bundle, frontier=frontier))
        with r.client(KEY_A) as c:
            for text in ("👍👍", "???", "\u200b"):
                answer = c.classify(text, timeout=5)
                assert answer.tier == "frontier", text
                (step,) = [s for s in answer.path if s.tier == "linear"]
                assert (step.label, step.note) == ("", "no feature it knows")
            assert c.classify("hello there", timeout=5).tier == "linear"  # as before
