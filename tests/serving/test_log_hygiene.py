"""Keys and raw texts never reach the logs, unless the policy allows the texts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import KEY_A, escalate_everything, write_policy

SECRET_TEXT = "zebra-secret-4711 please refund my order"
WRONG_KEY = "wrong-key-SECRET-9931"


def _traffic(r: Any, script: Script) -> None:
    with r.client(KEY_A) as c:
        c.classify(SECRET_TEXT, timeout=30)  # escalated: the provider fails, then answers
        c.classify(SECRET_TEXT, timeout=30)  # an exact-cache hit
        assert c.classify_batch([SECRET_TEXT], timeout=30)[0].label
        with pytest.raises(grpc.RpcError):  # refused: items are checked before any runs
            c.classify_batch([SECRET_TEXT, ""], timeout=30)
    with r.client(WRONG_KEY) as c, pytest.raises(grpc.RpcError):
        c.classify(SECRET_TEXT, timeout=30)
    assert script.calls >= 2


@pytest.mark.parametrize("raw_text", [False, True])
def test_logs_hold_no_keys_and_texts_only_when_allowed(
    start: Any,
    linear_bundle: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    raw_text: bool,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything any logger says
    caplog.set_level(logging.DEBUG, logger="tiergate.decisions")
    tasks = escalate_everything(linear_bundle)
    policy = tmp_path / "p.yaml"
    script = Script(default="refund", fail_first=1, fail_status=500)
    with fake_provider(script) as url:
        write_policy(
            policy,
            linear_bundle,
            tasks=tasks,
            auth={"required": True},
            log={"raw_text": raw_text},
            frontier={"providers": [{"name": "p", "base_url": url, "model": "m"}]},
        )
        r = start(policy)
        _traffic(r, script)
    text = caplog.text
    assert '"tier":"frontier"' in text  # the decision log was captured
    assert KEY_A not in text
    assert WRONG_KEY not in text
    assert ("zebra-secret-4711" in text) == raw_text
