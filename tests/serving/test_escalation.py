"""The escalation tier against OpenAI-compatible servers on loopback (real HTTP):
fallback, retries, timeouts, labels outside the set, circuit breakers, deadlines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import KEY_A, escalate_everything, write_policy
from tiergate import ConfigError
from tiergate.engine import Engine, Request, in_process_runtime
from tiergate.escalation import (
    BreakerPolicy,
    CircuitBreaker,
    Escalation,
    Escalator,
    FrontierConfig,
    RetryPolicy,
)
from tiergate.frontier import ProviderConfig, prompt_for, prompt_tokens
from tiergate.policy import load_policy, parse_policy
from tiergate.server import ANONYMOUS

LABELS = ["balance", "transfer", "oos"]


@pytest.fixture
def providers() -> Iterator[Any]:
    """Starts loopback providers on demand: ``providers(script, ...)`` -> base URLs."""
    with ExitStack() as stack:

        def start(*scripts: Script) -> list[str]:
            return [stack.enter_context(fake_provider(s)) for s in scripts]

        yield start


def config(urls: list[str], *, timeout_s: float = 2.0, attempts: int = 2,
           failures: int = 5, cooldown_s: float = 30.0) -> FrontierConfig:  # fmt: skip
    return FrontierConfig(
        tuple(
            ProviderConfig(f"p{i}", url, "m", None, 1.0, 2.0, timeout_s)
            for i, url in enumerate(urls)
        ),
        RetryPolicy(attempts=attempts, backoff_s=0.01, max_backoff_s=0.05),
        BreakerPolicy(failures=failures, cooldown_s=cooldown_s),
    )


TEXT, HINTS = "what is my balance", "linear: balance (0.61)"


def ask(esc: Escalator, text: str = TEXT, timeout_s: float | None = None,
        within_s: float | None = None) -> Any:  # fmt: skip
    """``within_s``: fail the test instead of hanging when the call does not end."""

    async def once() -> Any:
        try:
            call = esc.classify(text, LABELS, HINTS, timeout_s)
            return await asyncio.wait_for(call, within_s)
        finally:
            await esc.aclose()  # its connections belong to this event loop

    return asyncio.run(once())


def test_first_provider_answers_with_cost_from_reported_usage(providers: Any) -> None:
    script = Script(answers={"what is my balance": "balance"}, prompt_tokens=1000,
                    completion_tokens=10)  # fmt: skip
    (url,) = providers(script)
    result = ask(Escalator(config([url])))
    assert (result.label, result.provider, result.error) == ("balance", "p0", None)
    # $1 per million input tokens, $2 per million output tokens
    assert result.cost == pytest.approx((1000 * 1.0 + 10 * 2.0) / 1e6)
    assert [a.outcome for a in result.attempts] == ["ok"]
    assert script.hints == [" suggested: linear: balance (0.61))"]


def test_a_failing_provider_is_retried_then_the_next_one_answers(providers: Any) -> None:
    bad = Script(failing=True, fail_status=503)
    good = Script(default="transfer")
    urls = providers(bad, good)
    result = ask(Escalator(config(urls, attempts=3)))
    assert (result.label, result.provider) == ("transfer", "p1")
    assert result.summary() == "p0:server_error, p0:server_error, p0:server_error, p1:ok"
    assert bad.calls == 3
    # failed calls cost nothing: only the answer that came back was paid
    assert result.cost == pytest.approx((100 * 1.0 + 5 * 2.0) / 1e6)


def test_a_transient_failure_is_absorbed_by_a_retry_on_the_same_provider(
    providers: Any,
) -> None:
    flaky = Script(default="balance", fail_first=1, fail_status=429, retry_after_s=0.05)
    (url,) = providers(flaky)
    started = time.perf_counter()
    result = ask(Escalator(config([url])))
    assert result.summary() == "p0:rate_limited, p0:ok"
    assert result.label == "balance"
    assert time.perf_counter() - started >= 0.05  # the Retry-After was honoured


def test_a_provider_that_times_out_gives_way_within_its_timeout(providers: Any) -> None:
    slow = Script(default="balance", delay_s=1.5)
    fast = Script(default="transfer")
    urls = providers(slow, fast)
    started = time.perf_counter()
    result = ask(Escalator(config(urls, timeout_s=0.3, attempts=1)))
    assert time.perf_counter() - started < 1.0
    assert result.summary() == "p0:timeout, p1:ok"
    assert result.label == "transfer"
    # The abandoned call may still be billed: it is charged at the estimate of its prompt.
    answered = (100 * 1.0 + 5 * 2.0) / 1e6
    assert result.attempts[0].cost > 0
    assert result.cost == pytest.approx(answered + result.attempts[0].cost)


def test_many_escalations_at_once_do_not_queue_for_a_connection(providers: Any) -> None:
    script = Script(default="balance", delay_s=0.3)
    (url,) = providers(script)
    esc = Escalator(config([url], timeout_s=10.0, attempts=1))

    async def many() -> list[Any]:
        try:
            calls = [esc.classify(f"text {i}", LABELS, "", 10.0) for i in range(150)]
            return await asyncio.gather(*calls)
        finally:
            await esc.aclose()

    results = asyncio.run(many())
    assert [r.label for r in results] == ["balance"] * 150
    assert script.max_inflight > 100  # aiohttp's default pool would hold 100 at most


def test_a_broken_response_is_a_server_error_and_falls_back(providers: Any) -> None:
    broken = [
        Script(body=b"<html>bad gateway</html>"),
        Script(body=b'{"choices": 3}'),
        Script(body=b'{"choices": {"x": 1}}'),
        Script(body=b"[1, 2]"),
        Script(body=b'{"choices": [{"message": null}]}'),
    ]
    urls = providers(*broken, Script(default="oos"))
    esc = Escalator(config(urls, attempts=1))
    result = ask(esc)
    assert result.summary() == ", ".join([f"p{i}:server_error" for i in range(5)] + ["p5:ok"])
    assert all("malformed response" in a.detail for a in result.attempts[:5])
    assert result.label == "oos"
    # Answered (perhaps billed) but unreadable: charged at our estimate of one call.
    one_call = esc.providers[0].cost(prompt_tokens(prompt_for(TEXT, LABELS, HINTS)), 32)
    assert result.attempts[0].cost == pytest.approx(one_call)


@pytest.mark.parametrize("content", [{"label": "balance"}, 5, None, ["balance"]])
def test_an_answer_that_is_not_text_is_an_invalid_label(providers: Any, content: Any) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 5}
    body = json.dumps({"choices": [{"message": {"content": content}}], "usage": usage}).encode()
    urls = providers(Script(body=body), Script(default="transfer"))
    result = ask(Escalator(config(urls, attempts=1)))
    assert result.summary() == "p0:invalid_label, p1:ok"
    assert result.label == "transfer"


def test_a_broken_answer_to_a_probe_opens_the_circuit_again(providers: Any) -> None:
    """The probe of a half-open circuit must end with a verdict whatever comes back:
    left pending, the provider would be skipped until the server restarts."""
    primary = Script(failing=True)
    urls = providers(primary, Script(default="balance"))
    esc = Escalator(config(urls, attempts=1, failures=1, cooldown_s=0.3))
    assert ask(esc).summary() == "p0:server_error, p1:ok"
    primary.failing = False
    primary.body = b'{"choices": [{"message": {"content": {"label": "balance"}}}]}'
    time.sleep(0.35)
    assert ask(esc).summary() == "p0:invalid_label, p1:ok"  # the probe, and its verdict
    assert esc.states()["p0"] == "open"
    primary.body = None
    primary.default = "transfer"
    time.sleep(0.35)
    third = ask(esc)
    assert (third.label, third.provider) == ("transfer", "p0")
    assert esc.states()["p0"] == "closed"


@pytest.mark.parametrize(
    ("usage", "charged"),
    [
        ({"prompt_tokens": 100, "completion_tokens": 5}, "reported"),
        ({"prompt_tokens": -5_000_000, "completion_tokens": 5}, "estimate"),  # a refund?
        ({"prompt_tokens": 10**15, "completion_tokens": 5}, "estimate"),  # a day's cap at once
        ({"prompt_tokens": 1.5, "completion_tokens": 5}, "estimate"),
        ({"prompt_tokens": True, "completion_tokens": 5}, "estimate"),
        (None, "estimate"),  # reports no usage: not free
        ("lots", "estimate"),
    ],
)
def test_the_cost_is_the_reported_usage_only_when_it_can_be_true(
    providers: Any, usage: Any, charged: str
) -> None:
    reply: dict[str, Any] = {"choices": [{"message": {"content": '{"label": "balance"}'}}]}
    if usage is not None:
        reply["usage"] = usage
    (url,) = providers(Script(body=json.dumps(reply).encode()))
    esc = Escalator(config([url], attempts=1))
    result = ask(esc)
    assert result.label == "balance"
    p = esc.providers[0]
    reported = p.cost(100, 5)
    estimate = p.cost(prompt_tokens(prompt_for(TEXT, LABELS, HINTS)), 32)
    assert result.cost == pytest.approx(reported if charged == "reported" else estimate)


def test_a_huge_response_is_not_read(providers: Any) -> None:
    huge = b'{"choices": [], "padding": "' + b"x" * (2 << 20) + b'"}'
    urls = providers(Script(body=huge), Script(default="balance"))
    result = ask(Escalator(config(urls, attempts=1)))
    assert result.summary() == "p0:server_error, p1:ok"
    assert "over 1048576 bytes" in result.attempts[0].detail


@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), -1.0])
def test_an_impossible_retry_after_is_ignored(providers: Any, seconds: float) -> None:
    (url,) = providers(Script(default="balance", fail_first=1, fail_status=429,
                              retry_after_s=seconds))  # fmt: skip
    result = ask(Escalator(config([url])), within_s=10)
    assert result.summary() == "p0:rate_limited, p0:ok"


def test_a_retry_after_beyond_the_policy_goes_to_the_next_provider(providers: Any) -> None:
    """Waiting a day inside a request (no deadline to stop it) would hold its spend
    reservation and the caller; the policy's max_backoff_s bounds every wait."""
    slow = Script(default="balance", fail_first=1, fail_status=429, retry_after_s=86400)
    urls = providers(slow, Script(default="transfer"))
    result = ask(Escalator(config(urls)), within_s=10)
    assert result.summary() == "p0:rate_limited, p1:ok"


def test_the_api_key_is_sent_as_a_bearer_token(
    providers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TG_TEST_KEY", "sk-test-123")
    script = Script(default="balance")
    (url,) = providers(script)
    provider = ProviderConfig("p0", url, "m", "TG_TEST_KEY", 1.0, 2.0, 2.0)
    result = ask(Escalator(FrontierConfig((provider,))))
    assert result.label == "balance"
    assert script.keys == ["Bearer sk-test-123"]


def test_a_label_outside_the_set_is_not_retried_and_falls_back(providers: Any) -> None:
    garbage = Script(default="definitely_not_a_label", prompt_tokens=50, completion_tokens=4)
    good = Script(default="oos")
    urls = providers(garbage, good)
    result = ask(Escalator(config(urls)))
    assert result.summary() == "p0:invalid_label, p1:ok"
    assert garbage.calls == 1
    assert "definitely_not_a_label" in result.attempts[0].detail
    # the garbage answer was still paid for, and is charged
    assert result.cost == pytest.approx((50 + 4 * 2 + 100 + 5 * 2) / 1e6)


def test_no_provider_left_gives_an_error_naming_every_attempt(providers: Any) -> None:
    urls = providers(Script(failing=True), Script(default="not_a_label"))
    result = ask(Escalator(config(urls, attempts=1)))
    assert result.label is None
    assert result.error == "no provider answered (p0:server_error, p1:invalid_label)"


def test_the_deadline_bounds_all_attempts_together(providers: Any) -> None:
    urls = providers(Script(default="balance", delay_s=2.0), Script(default="balance", delay_s=2.0))
    esc = Escalator(config(urls, timeout_s=5.0))
    started = time.perf_counter()
    result = ask(esc, timeout_s=0.4)
    took = time.perf_counter() - started
    assert result.label is None
    assert took < 0.7, took
    assert all(a.outcome == "timeout" for a in result.attempts)


def test_the_circuit_opens_skips_the_provider_and_recovers_after_a_probe(
    providers: Any,
) -> None:
    primary = Script(failing=True)
    backup = Script(default="balance")
    urls = providers(primary, backup)
    esc = Escalator(config(urls, attempts=2, failures=2, cooldown_s=0.5))
    first = ask(esc)
    assert first.summary() == "p0:server_error, p0:server_error, p1:ok"
    assert esc.states()["p0"] == "open"
    # while open the primary is not called at all
    second = ask(esc)
    assert second.summary() == "p0:circuit_open, p1:ok"
    assert primary.calls == 2
    # after the cooldown one probe goes through; the primary has recovered
    primary.failing = False
    primary.default = "transfer"
    time.sleep(0.55)
    assert esc.states()["p0"] == "half_open"
    third = ask(esc)
    assert (third.label, third.provider) == ("transfer", "p0")
    assert esc.states()["p0"] == "closed"


def test_half_open_lets_one_probe_through_and_a_cancelled_probe_frees_its_slot() -> None:
    now = [0.0]
    breaker = CircuitBreaker(BreakerPolicy(failures=1, cooldown_s=10.0), clock=lambda: now[0])
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state == "open"
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.release()  # the probe's request was cancelled: no verdict
    assert breaker.allow()
    breaker.record(False)  # the probe failed: open for another cooldown
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed"
    assert breaker.failures == 0


def test_the_reservation_covers_every_attempt_at_every_provider() -> None:
    esc = Escalator(config(["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"], attempts=3))
    one = esc.providers[0].cost(1, 0)
    assert esc.estimate_cost("x" * 400, LABELS) > 2 * 3 * 100 * one
    # CJK and emoji run at a token a character or more, not four characters a token.
    assert esc.estimate_cost("余额" * 200, LABELS) > 2 * 3 * 400 * one
    assert esc.estimate_cost("💸" * 400, LABELS) > 2 * 3 * 400 * one


@pytest.mark.parametrize(
    ("frontier", "message"),
    [
        ({"providers": [{"name": "a", "base_url": "ftp://x", "model": "m"}]}, "http"),
        ({"providers": [{"name": "a", "model": "m"}]}, "'base_url'"),
        ({"providers": [{"name": "a", "base_url": "http://x", "model": "m", "key": 1}]}, "key"),
        (
            {"providers": [{"name": "a", "base_url": "http://x", "model": "m"}] * 2},
            "names repeat",
        ),
        ({"providers": "a"}, "a list"),
        ({"retry": {"attempts": 0}}, "attempts"),
        ({"breaker": {"cooldown_s": -1}}, "cooldown_s"),
    ],
)
def test_broken_frontier_sections_are_rejected(
    frontier: dict[str, Any], message: str, tmp_path: Path
) -> None:
    doc = {"version": "1", "tasks": {"t": {"bundle": "b"}}, "frontier": frontier}
    with pytest.raises(ConfigError, match=message):
        parse_policy(doc, tmp_path)


def test_a_missing_key_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERGATE_TEST_KEY", raising=False)
    cfg = FrontierConfig((ProviderConfig("a", "http://x/v1", "m", "TIERGATE_TEST_KEY"),))
    with pytest.raises(ConfigError, match="TIERGATE_TEST_KEY is unset"):
        Escalator(cfg)


def test_escalation_through_grpc_falls_back_and_reports_it(
    start: Any, providers: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """The policy's providers in order: the first is down, the answer comes from the second,
    and the decision path, the charge and the metrics say so."""
    down, up = Script(failing=True), Script(default="greeting")
    urls = providers(down, up)
    frontier = {
        "providers": [
            {"name": "main", "base_url": urls[0], "model": "m", "price_in_per_mtok": 1.0},
            {"name": "backup", "base_url": urls[1], "model": "m", "price_in_per_mtok": 3.0},
        ],
        "retry": {"attempts": 2, "backoff_s": 0.01},
    }
    policy = write_policy(
        tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle),
        frontier=frontier,
    )  # fmt: skip
    assert load_policy(policy).frontier is not None
    running = start(policy)
    with running.client(KEY_A) as client:
        reply = client.classify("hello there, how are you doing today")
    assert (reply.label, reply.tier) == ("greeting", "frontier")
    step = reply.path[-1]
    assert step.tier == "frontier"
    assert "main:server_error, main:server_error, backup:ok" in step.note
    assert reply.cost_usd == pytest.approx(100 * 3.0 / 1e6)
    metrics = running.server.metrics.registry
    value = metrics.get_sample_value(
        "tiergate_frontier_attempts_total", {"provider": "main", "outcome": "server_error"}
    )
    assert value == 2.0


def test_an_escalation_that_ends_at_its_own_limit_is_charged_what_it_tried(
    linear_bundle: Path,
) -> None:
    """The escalator is given a limit a little inside the engine's backstop: when the
    deadline ends a call, the escalator charges the attempt it made. Hitting the
    backstop instead charges the whole reservation (every try at every provider)."""

    class UsesItsWholeLimit:
        """Waits out the limit it is given, then reports one timed-out attempt."""

        async def classify(self, text: str, labels: Any, hints: str,
                           timeout_s: float | None = None) -> Escalation:  # fmt: skip
            await asyncio.sleep(timeout_s or 0)
            return Escalation(None, 0.001, "p0:timeout")

        def estimate_cost(self, text: str, labels: Any) -> float:
            return 0.05

    policy = parse_policy(
        {"version": "1", "tasks": {"t": escalate_everything(linear_bundle)["intents"]}},
        Path("/"), "p.yaml",
    )  # fmt: skip
    runtimes = {"t": in_process_runtime(policy.tasks["t"])}
    engine = Engine(policy, runtimes, frontier=UsesItsWholeLimit())  # type: ignore[arg-type]
    request = Request("hello there", ANONYMOUS, deadline=time.monotonic() + 0.5)
    answer = asyncio.run(engine.classify(request))
    assert answer.degraded
    assert answer.cost_usd == pytest.approx(0.001)
    assert engine.ledger.snapshot("anonymous").spent_usd == pytest.approx(0.001)
