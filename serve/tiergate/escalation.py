"""The escalation tier: frontier LLMs behind OpenAI-compatible APIs, made dependable.

Providers are tried in priority order. Each call asks for one label out of the
task's set with structured output and passes along what the cheaper tiers
said. Around every provider:

- **retries** with full-jitter exponential backoff, only for failures that a
  retry can fix (timeouts, connection errors, rate limits, 5xx), and only
  while the request's deadline leaves room for another attempt;
- a **circuit breaker**: after ``failures`` consecutive failures the provider
  is skipped for ``cooldown_s``; then one probe request at a time is let
  through (half-open), and a success closes the circuit again;
- **fallback** to the next provider when one fails, is open, or answers with
  a label outside the set.

Cost is what the provider's reported usage says at its token prices, summed
over the attempts it answered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tiergate._core import ConfigError
from tiergate.frontier import DEFAULT_CANDIDATES, ProviderConfig, prompt_for, prompt_tokens

log = logging.getLogger("tiergate.escalation")

MAX_OUTPUT_TOKENS = 32
MAX_CONNECTIONS = 1000  # per provider (the openai SDK's default too)
# Below this much time left, another attempt could not finish: stop trying.
MIN_ATTEMPT_S = 0.02
# A label and its usage fit in a few hundred bytes: a longer body is a broken provider,
# and reading it whole would hold memory and the event loop.
MAX_RESPONSE_BYTES = 1 << 20
# More tokens than any one call of ours can use: a provider's bug, not a bill.
MAX_USAGE_TOKENS = 10_000_000
# The reservation's allowance for the hints the prompt carries (tier: label (0.93), ...).
HINT_TOKENS = 64


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2  # per provider, first try included
    backoff_s: float = 0.05  # base of the exponential backoff
    max_backoff_s: float = 1.0


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 5  # consecutive failures that open the circuit
    cooldown_s: float = 30.0  # how long it stays open before a probe


@dataclass(frozen=True)
class FrontierConfig:
    """The ``frontier`` section of the policy."""

    providers: tuple[ProviderConfig, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    # Labels offered per escalation: the local tiers' likeliest (0: the whole set).
    candidates: int = DEFAULT_CANDIDATES


class CircuitBreaker:
    """closed -> (``failures`` in a row) -> open -> (``cooldown_s``) -> half-open.

    Half-open lets one probe through at a time: its success closes the circuit,
    its failure opens it for another cooldown.
    """

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at < self.policy.cooldown_s:
            return "open"
        return "half_open"

    def allow(self) -> bool:
        """May a call go out now? In half-open, claims the single probe slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def release(self) -> None:
        """A call ended without a verdict (cancelled): free the probe slot."""
        self.probing = False

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.policy.failures:
            if self.opened_at is None:
                log.warning("circuit opened after %d consecutive failures", self.failures)
            self.opened_at = self.clock()


@dataclass
class Attempt:
    provider: str
    outcome: str  # ok | timeout | connection | rate_limited | server_error | client_error |
    # invalid_label | circuit_open
    seconds: float = 0.0
    cost: float = 0.0
    detail: str = ""


@dataclass
class Escalation:
    """What one escalation did: the answer (or why none), its cost and every attempt."""

    label: str | None
    cost: float
    error: str | None
    provider: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    def summary(self) -> str:
        return ", ".join(f"{a.provider}:{a.outcome}" for a in self.attempts)


RETRYABLE = {"timeout", "connection", "rate_limited", "server_error"}


class Provider:
    """One endpoint: its HTTP session, prices and circuit breaker.

    The call is one POST to ``/chat/completions``, sent with aiohttp rather than the
    ``openai`` SDK: escalations run on the event loop that answers the cheap tiers,
    and the SDK spends ~1.5 ms of CPU per call there (building typed requests,
    parsing typed responses) against ~0.2 ms for aiohttp and orjson, measured on
    loopback. Every cheap-tier request that arrives meanwhile waits for it.
    """

    def __init__(self, config: ProviderConfig, breaker: BreakerPolicy, clock: Callable[[], float]):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {config.api_key()}",
        }
        self.breaker = CircuitBreaker(breaker, clock)
        # One session (its pooled connections) per event loop; made on first use.
        self._session: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        c = self.config
        return (
            prompt_tokens * c.price_in_per_mtok + completion_tokens * c.price_out_per_mtok
        ) / 1e6

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session[0] is not loop or self._session[1].closed:
            # As many connections as calls in flight: aiohttp's default of 100 would queue
            # escalations behind each other at 100 req/s of 1-second calls.
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            self._session = (loop, aiohttp.ClientSession(connector=connector))
        return self._session[1]

    async def aclose(self) -> None:
        """Closes the session of the running loop (the connections it pools)."""
        if self._session is not None and self._session[0] is asyncio.get_running_loop():
            await self._session[1].close()
        self._session = None

    async def ask(
        self, text: str, labels: Sequence[str], hints: str, timeout_s: float
    ) -> tuple[Attempt, str | None, float | None]:
        """One call: (attempt, label if valid, retry-after seconds if the provider sent one)."""
        started = time.perf_counter()
        name = self.config.name

        def done(outcome: str, detail: str = "", cost: float = 0.0) -> Attempt:
            return Attempt(name, outcome, time.perf_counter() - started, cost, detail[:200])

        messages = prompt_for(text, labels, hints)
        # What a call costs by our estimate: charged when it may have been billed but the
        # provider's own count is missing or not believable.
        estimated = self.cost(prompt_tokens(messages), MAX_OUTPUT_TOKENS)
        body = orjson.dumps(
            {
                "model": self.config.model,
                "messages": messages,
                "response_format": label_schema(labels),
                "temperature": 0,
                "max_tokens": MAX_OUTPUT_TOKENS,
            }
        )
        try:
            async with self._client().post(
                self.url,
                data=body,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                status, raw = resp.status, await _read_capped(resp)
                retry_after = _retry_after(resp.headers)
        except TimeoutError:
            # Sent and perhaps answered (and billed) after we stopped waiting: charged at
            # the estimate, so that a spend cap holds even then.
            return done("timeout", f"no answer within {timeout_s:.2f} s", estimated), None, None
        except aiohttp.ClientConnectionError as e:
            return done("connection", f"{type(e).__name__}: {e}"), None, None
        except aiohttp.ClientError as e:  # a broken response: the provider's fault
            return done("server_error", f"{type(e).__name__}: {e}"), None, None
        if raw is None:
            detail = f"a response over {MAX_RESPONSE_BYTES} bytes (HTTP {status})"
            return done("server_error", detail, estimated if status == 200 else 0.0), None, None
        if status != 200:
            detail = f"HTTP {status}: {_error_message(raw)}"
            if status == 429:
                return done("rate_limited", detail), None, retry_after
            return done("server_error" if status >= 500 else "client_error", detail), None, None
        try:
            reply = orjson.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, LookupError, TypeError) as e:
            detail = f"malformed response: {type(e).__name__}: {e}"
            return done("server_error", detail, estimated), None, None
        cost = self._billed(reply.get("usage"), estimated)
        label, error = parse_label(content, labels)
        if label is None:
            return done("invalid_label", error or "", cost), None, None
        return done("ok", cost=cost), label, None

    def _billed(self, usage: object, estimated: float) -> float:
        """The cost by the usage the provider reports; our estimate when it reports none
        or counts that cannot be (negative, fractional, astronomical)."""
        if isinstance(usage, dict):
            counts = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
            if all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_USAGE_TOKENS
                for n in counts
            ):
                return self.cost(*counts)  # type: ignore[arg-type]
        return estimated


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body, or None once it passes MAX_RESPONSE_BYTES (the rest is not read)."""
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BYTES:
        return None
    body = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            return None
    return bytes(body)


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body, or the start of whatever came back."""
    try:
        return str(orjson.loads(raw)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def label_schema(labels: Sequence[str]) -> dict[str, Any]:
    """Structured output: a JSON object whose only field is one label of the set."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "label",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(labels)}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }


def parse_label(content: object, labels: Sequence[str]) -> tuple[str | None, str | None]:
    """The label in a provider's answer, or (None, why) when it is not one of ``labels``."""
    import json

    if not isinstance(content, str):
        return None, f"the answer is {type(content).__name__}, not text"
    if not content:
        return None, "empty answer"
    try:
        parsed = json.loads(content)
        label = parsed.get("label") if isinstance(parsed, dict) else parsed
    except json.JSONDecodeError:
        label = content.strip().strip('"')
    if not isinstance(label, str) or label not in labels:
        return None, f"label {str(label)[:60]!r} is not in the label set"
    return label, None


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after")
        seconds = float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
    # (An HTTP date is not a number: ignored, as are "inf", "nan" and negative waits.)
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def estimate_cost(config: FrontierConfig, text: str, labels: Sequence[str]) -> float:
    """An upper bound for reserving spend: every attempt at every provider answered and
    paid, at 1.5x the estimated prompt tokens and the full output allowance."""
    tokens_in = int(1.5 * prompt_tokens(prompt_for(text, labels))) + HINT_TOKENS
    per_try = sum(
        (tokens_in * p.price_in_per_mtok + MAX_OUTPUT_TOKENS * p.price_out_per_mtok) * 1e-6
        for p in config.providers
    )
    return per_try * config.retry.attempts


class Escalator:
    """Providers in priority order, with retries, circuit breakers and fallback."""

    def __init__(
        self,
        config: FrontierConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        if not config.providers:
            raise ConfigError("the frontier tier needs at least one provider")
        self.config = config
        self.providers = [Provider(p, config.breaker, clock) for p in config.providers]
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_attempt: Callable[[Attempt], None] | None = None

    def states(self) -> dict[str, str]:
        """Circuit state per provider: closed, open or half_open."""
        return {p.config.name: p.breaker.state for p in self.providers}

    async def aclose(self) -> None:
        """Closes the providers' connections (made again if a call comes later)."""
        for p in self.providers:
            await p.aclose()

    def estimate_cost(self, text: str, labels: Sequence[str]) -> float:
        return estimate_cost(self.config, text, labels)

    async def classify(
        self, text: str, labels: Sequence[str], hints: str, timeout_s: float | None = None
    ) -> Escalation:
        deadline = None if timeout_s is None else self.clock() + timeout_s
        result = Escalation(None, 0.0, None)
        for provider in self.providers:
            label = await self._try_provider(provider, text, labels, hints, deadline, result)
            if label is not None:
                result.label, result.provider, result.error = label, provider.config.name, None
                return result
            if deadline is not None and deadline - self.clock() < MIN_ATTEMPT_S:
                break
        tried = result.summary() or "none"
        result.error = f"no provider answered ({tried})"
        return result

    async def _try_provider(
        self,
        provider: Provider,
        text: str,
        labels: Sequence[str],
        hints: str,
        deadline: float | None,
        result: Escalation,
    ) -> str | None:
        retry = self.config.retry
        name = provider.config.name
        for attempt in range(retry.attempts):
            left = None if deadline is None else deadline - self.clock()
            if left is not None and left < MIN_ATTEMPT_S:
                return None
            if not provider.breaker.allow():
                self._record(result, Attempt(name, "circuit_open"))
                return None
            timeout = provider.config.timeout_s
            if left is not None:
                timeout = min(timeout, left)
            try:
                outcome, label, retry_after = await provider.ask(text, labels, hints, timeout)
            except asyncio.CancelledError:  # the request gave up: no verdict on the provider
                provider.breaker.release()
                raise
            except Exception as e:  # unforeseen: count it as the provider failing, go on
                log.exception("provider %s: unexpected failure", name)
                detail = f"{type(e).__name__}: {e}"[:200]
                outcome, label, retry_after = (
                    Attempt(name, "server_error", detail=detail),
                    None,
                    None,
                )
            provider.breaker.record(label is not None)
            result.cost += outcome.cost
            self._record(result, outcome)
            if label is not None:
                return label
            if outcome.outcome not in RETRYABLE or attempt + 1 == retry.attempts:
                return None
            # Full jitter: a uniform wait up to the exponential bound, so that many
            # requests failing together do not retry together.
            wait = self.rng.uniform(0, min(retry.max_backoff_s, retry.backoff_s * 2**attempt))
            if retry_after is not None:
                if retry_after > retry.max_backoff_s:
                    return None  # asks for a longer wait than the policy allows: next provider
                wait = max(wait, retry_after)
            if deadline is not None and self.clock() + wait + MIN_ATTEMPT_S > deadline:
                return None  # no time to wait and try again here: next provider
            await asyncio.sleep(wait)
        return None

    def _record(self, result: Escalation, attempt: Attempt) -> None:
        result.attempts.append(attempt)
        if self.on_attempt is not None:
            self.on_attempt(attempt)
