"""The serving policy: one versioned YAML file, validated before it is used.

Example::

    version: "2026-11-23.1"          # echoed in every answer; part of cache keys
    default_task: intents
    tasks:
      intents:
        bundle: ../bundles/clinc     # relative to this file
        thresholds: {linear: {general: 0.95}}   # override the bundle's
        latency: {p95_ms: 50, p99_ms: 200}   # skip tiers slower than p95_ms;
                                     # p99_ms bounds every request's budget;
                                     # on_skip: degrade (default) or escalate
        no_cache_labels: [report_fraud]
        tiers: [rules, linear, intent]   # the local tiers that may answer (default: all
                                     # the bundle has; [] sends everything to the frontier)
        mode: cascade                # or route: the linear tier's confidence picks one
                                     # tier up front (intent model or frontier), no cascade
    risk:                            # what a risk tag does to a request
      finance: gate                  # the stricter gate of the bundle (default)
      legal: review                  # human review: answers pending_review, and records
                                     # it (log tiergate.review; <state dir>/reviews.jsonl)
    auth: {required: true}
    tenants:
      acme:
        key_sha256: [<sha256 hex of the API key>]
        quota: {requests_per_day: 100000, escalations_per_day: 2000, spend_per_day_usd: 5}
        on_quota: degrade            # or reject (RESOURCE_EXHAUSTED)
    cache: {exact_ttl_s: 3600, semantic_ttl_s: 3600, semantic_threshold: 0.95,
            min_confidence: 0.995}   # keep the intent model's answers this sure, and
                                     # frontier answers a local tier agrees with (0: all
                                     # of both); the cheap tiers' answers are never kept
    limits: {max_text_bytes: 16384, max_batch: 256,
             max_inflight: 4096,         # requests in flight; more are refused at once
             max_loop_lag_ms: 50,        # refuse new requests while the server runs
                                         # this far behind (0: off); see admission.py
             max_queue_ms: 250}          # refuse a request whose wait for a model
                                         # batch would pass this (or its deadline)
    log: {raw_text: false}
    frontier:                        # escalation providers, tried in this order
      providers:
        - {name: main, base_url: "https://api.openai.com/v1", model: gpt-4o-mini,
           api_key_env: OPENAI_API_KEY, price_in_per_mtok: 0.15, price_out_per_mtok: 0.6,
           timeout_s: 10}
        - {name: backup, base_url: "http://10.0.0.5:8000/v1", model: qwen2.5-7b}
      retry: {attempts: 2, backoff_s: 0.05, max_backoff_s: 1.0}   # per provider
      breaker: {failures: 5, cooldown_s: 30}   # open after 5 failures in a row
      candidates: 20                 # labels offered per escalation: the local tiers'
                                     # likeliest, plus oos (0: the whole label set)

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tiergate._core import ConfigError
from tiergate.escalation import BreakerPolicy, FrontierConfig, RetryPolicy
from tiergate.frontier import DEFAULT_CANDIDATES, ProviderConfig
from tiergate.tiers import LOCAL_TIERS

RISK_ACTIONS = ("gate", "escalate", "review")
# The policy file's sections; anything else at the top level is a typo.
TOP_KEYS = {"version", "default_task", "tasks", "risk", "auth", "tenants", "cache", "limits"}
TOP_KEYS |= {"log", "frontier"}


@dataclass(frozen=True)
class Quota:
    requests_per_day: int | None = None
    escalations_per_day: int | None = None
    spend_per_day_usd: float | None = None


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: tuple[str, ...] = ()
    quota: Quota = field(default_factory=Quota)
    on_quota: str = "degrade"


@dataclass(frozen=True)
class Task:
    name: str
    bundle: Path
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    p95_ms: float | None = None
    p99_ms: float | None = None
    no_cache_labels: frozenset[str] = frozenset()
    # When a tier does not fit the budget: answer with the best so far
    # ("degrade") or go on to the frontier if that fits ("escalate").
    on_skip: str = "degrade"
    # The local tiers allowed to answer; None: every tier the bundle has.
    tiers: frozenset[str] | None = None
    # "cascade": each tier answers when confident, else passes on. "route": the
    # linear tier's confidence sends the request to one tier, the intent model
    # (whose answer then stands) or the frontier; the benchmarks' routing baseline.
    mode: str = "cascade"

    def uses(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers


MODES = ("cascade", "route")
MAX_TEXT_BYTES = 1 << 20  # the Rust text tiers refuse longer texts


@dataclass(frozen=True)
class Policy:
    version: str
    default_task: str
    tasks: dict[str, Task]
    risk: dict[str, str] = field(default_factory=dict)
    auth_required: bool = False
    tenants: dict[str, Tenant] = field(default_factory=dict)
    exact_ttl_s: float = 3600.0
    semantic_ttl_s: float = 3600.0
    semantic_threshold: float = 0.95
    # A cached answer is served again without a second look, to this text and (semantic
    # cache) to its rewordings: the caches hold a stricter bar than the gate. The intent
    # model's answers are kept when at least this sure (a calibrated confidence: on
    # held-out data, answers this sure were right this often), the frontier's when a
    # local tier agrees; 0 keeps all of both. Keeping fewer answers costs more model
    # calls and escalations (see the README).
    cache_min_confidence: float = 0.995
    max_text_bytes: int = 16_384
    max_batch: int = 256
    max_inflight: int = 4096
    max_loop_lag_ms: float = 50.0
    max_queue_ms: float = 250.0
    log_raw_text: bool = False
    frontier: FrontierConfig | None = None  # None: no escalation unless the command line sets one
    source: str = "<built-in>"

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        """The tenant owning ``key``; None when unknown. Keys are compared as SHA-256."""
        if not key:
            return None
        return self._by_digest.get(hashlib.sha256(key.encode()).hexdigest())

    @functools.cached_property
    def _by_digest(self) -> dict[str, Tenant]:
        # Built once per policy: a key lookup is one hash and one dict probe.
        return {d: t for t in self.tenants.values() for d in t.key_sha256}

    def risk_action(self, tags: list[str]) -> tuple[str, str | None]:
        """The strongest action any tag asks for (review > escalate > gate), and its tag."""
        best, why = "gate", None
        for tag in tags:
            action = self.risk.get(tag, "gate")
            if RISK_ACTIONS.index(action) > RISK_ACTIONS.index(best):
                best, why = action, tag
        return best, why


def _check_keys(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed, key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _mapping(where: str, raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, not {type(raw).__name__}")
    return raw


def _number(where: str, raw: object, *, minimum: float = 0.0) -> float:
    # NaN compares false with everything, so it must be refused by name.
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or raw < minimum
    ):
        raise ConfigError(f"{where}: expected a finite number >= {minimum}, not {raw!r}")
    return float(raw)


def _whole(where: str, raw: object, *, minimum: int = 0) -> int:
    """A count: 2.5 requests a day is a typo to report, not a number to round."""
    value = _number(where, raw, minimum=minimum)
    if not value.is_integer():
        raise ConfigError(f"{where}: expected a whole number >= {minimum}, not {raw!r}")
    return int(value)


def _text_limit(where: str, limits: dict[str, Any]) -> int:
    value = _whole(where, limits.get("max_text_bytes", 16_384), minimum=1)
    if value > MAX_TEXT_BYTES:  # longer texts would pass validation and fail in a tier
        raise ConfigError(f"{where}: at most {MAX_TEXT_BYTES} (the text tiers' own limit)")
    return value


def _flag(where: str, raw: object) -> bool:
    # bool("false") is True: a quoted YAML string must not turn a switch on.
    if not isinstance(raw, bool):
        raise ConfigError(f"{where}: expected true or false, not {raw!r}")
    return raw


def _strings(where: str, raw: object) -> tuple[str, ...]:
    """A list of strings (numbers are taken as written); absent is empty."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(
        isinstance(x, str | int | float) and not isinstance(x, bool) for x in raw
    ):
        raise ConfigError(f"{where}: expected a list of strings, not {raw!r}")
    return tuple(str(x) for x in raw)


def _path(where: str, base_dir: Path, raw: str) -> Path:
    try:
        return (base_dir / raw).resolve()
    except (ValueError, OSError) as e:  # an embedded NUL, a name too long
        raise ConfigError(f"{where}: {raw!r} is not a usable path ({e})") from None


def parse_policy(raw: object, base_dir: Path, source: str = "<policy>") -> Policy:
    top = _mapping(source, raw)
    _check_keys(
        source,
        top,
        TOP_KEYS,
    )
    version = top.get("version")
    if not isinstance(version, str | int | float) or not str(version).strip():
        raise ConfigError(f"{source}: 'version' is required (any non-empty string)")
    tasks: dict[str, Task] = {}
    for name, t in _mapping(f"{source}: tasks", top.get("tasks")).items():
        where = f"{source}: tasks.{name}"
        t = _mapping(where, t)
        _check_keys(
            where, t, {"bundle", "thresholds", "latency", "no_cache_labels", "tiers", "mode"}
        )
        if not isinstance(t.get("bundle"), str):
            raise ConfigError(f"{where}: 'bundle' (a directory path) is required")
        thresholds: dict[str, dict[str, float]] = {}
        for tier, domains in _mapping(f"{where}.thresholds", t.get("thresholds")).items():
            if tier not in LOCAL_TIERS:
                raise ConfigError(f"{where}.thresholds: unknown tier {tier!r}; use {LOCAL_TIERS}")
            thresholds[tier] = {
                str(d): _number(f"{where}.thresholds.{tier}.{d}", v)
                for d, v in _mapping(f"{where}.thresholds.{tier}", domains).items()
            }
        latency = _mapping(f"{where}.latency", t.get("latency"))
        _check_keys(f"{where}.latency", latency, {"p95_ms", "p99_ms", "on_skip"})
        on_skip = str(latency.get("on_skip", "degrade"))
        if on_skip not in ("degrade", "escalate"):
            raise ConfigError(
                f"{where}.latency.on_skip: {on_skip!r} is not 'degrade' or 'escalate'"
            )
        tiers = None
        if "tiers" in t:
            if not isinstance(t["tiers"], list):
                raise ConfigError(f"{where}.tiers: a list of {LOCAL_TIERS} (or [])")
            unknown = [x for x in t["tiers"] if x not in LOCAL_TIERS]
            if unknown:
                raise ConfigError(f"{where}.tiers: unknown tier {unknown[0]!r}; use {LOCAL_TIERS}")
            tiers = frozenset(_strings(f"{where}.tiers", t["tiers"]))
        mode = str(t.get("mode", "cascade"))
        if mode not in MODES:
            raise ConfigError(f"{where}.mode: {mode!r} is not one of {MODES}")
        tasks[str(name)] = Task(
            str(name),
            _path(f"{where}.bundle", base_dir, t["bundle"]),
            thresholds,
            _number(f"{where}.latency.p95_ms", latency["p95_ms"]) if "p95_ms" in latency else None,
            _number(f"{where}.latency.p99_ms", latency["p99_ms"]) if "p99_ms" in latency else None,
            frozenset(_strings(f"{where}.no_cache_labels", t.get("no_cache_labels"))),
            on_skip,
            tiers,
            mode,
        )
    if not tasks:
        raise ConfigError(f"{source}: at least one task is required under 'tasks'")
    default_task = str(top.get("default_task", next(iter(tasks))))
    if default_task not in tasks:
        raise ConfigError(f"{source}: default_task {default_task!r} is not one of {sorted(tasks)}")
    risk = {str(k): str(v) for k, v in _mapping(f"{source}: risk", top.get("risk")).items()}
    for tag, action in risk.items():
        if action not in RISK_ACTIONS:
            raise ConfigError(f"{source}: risk.{tag}: {action!r} is not one of {RISK_ACTIONS}")
    auth = _mapping(f"{source}: auth", top.get("auth"))
    _check_keys(f"{source}: auth", auth, {"required"})
    tenants: dict[str, Tenant] = {}
    for name, t in _mapping(f"{source}: tenants", top.get("tenants")).items():
        where = f"{source}: tenants.{name}"
        t = _mapping(where, t)
        _check_keys(where, t, {"key_sha256", "quota", "on_quota"})
        keys = tuple(k.lower() for k in _strings(f"{where}.key_sha256", t.get("key_sha256")))
        for k in keys:
            if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
                raise ConfigError(f"{where}.key_sha256: {k[:12]!r}... is not a SHA-256 hex digest")
        q = _mapping(f"{where}.quota", t.get("quota"))
        _check_keys(
            f"{where}.quota", q, {"requests_per_day", "escalations_per_day", "spend_per_day_usd"}
        )
        quota = Quota(
            _whole(f"{where}.quota.requests_per_day", q["requests_per_day"])
            if "requests_per_day" in q
            else None,
            _whole(f"{where}.quota.escalations_per_day", q["escalations_per_day"])
            if "escalations_per_day" in q
            else None,
            _number(f"{where}.quota.spend_per_day_usd", q["spend_per_day_usd"])
            if "spend_per_day_usd" in q
            else None,
        )
        on_quota = str(t.get("on_quota", "degrade"))
        if on_quota not in ("degrade", "reject"):
            raise ConfigError(f"{where}.on_quota: {on_quota!r} is not 'degrade' or 'reject'")
        for k in keys:
            other = next((o.name for o in tenants.values() if k in o.key_sha256), None)
            if other is not None:  # one key, two tenants: whose quota would it spend?
                raise ConfigError(f"{where}.key_sha256: {k[:12]}... is also tenant {other!r}'s")
        tenants[str(name)] = Tenant(str(name), keys, quota, on_quota)
    cache = _mapping(f"{source}: cache", top.get("cache"))
    _check_keys(
        f"{source}: cache",
        cache,
        {"exact_ttl_s", "semantic_ttl_s", "semantic_threshold", "min_confidence"},
    )
    limits = _mapping(f"{source}: limits", top.get("limits"))
    _check_keys(
        f"{source}: limits",
        limits,
        {"max_text_bytes", "max_batch", "max_inflight", "max_loop_lag_ms", "max_queue_ms"},
    )
    log = _mapping(f"{source}: log", top.get("log"))
    _check_keys(f"{source}: log", log, {"raw_text"})
    threshold = _number(
        f"{source}: cache.semantic_threshold", cache.get("semantic_threshold", 0.95)
    )
    if threshold > 1:
        raise ConfigError(f"{source}: cache.semantic_threshold must be at most 1")
    min_confidence = _number(
        f"{source}: cache.min_confidence", cache.get("min_confidence", Policy.cache_min_confidence)
    )
    if min_confidence > 1:
        raise ConfigError(f"{source}: cache.min_confidence must be at most 1")

    policy = Policy(
        version=str(version),
        default_task=default_task,
        tasks=tasks,
        risk=risk,
        auth_required=_flag(f"{source}: auth.required", auth.get("required", False)),
        tenants=tenants,
        exact_ttl_s=_number(f"{source}: cache.exact_ttl_s", cache.get("exact_ttl_s", 3600)),
        semantic_ttl_s=_number(
            f"{source}: cache.semantic_ttl_s", cache.get("semantic_ttl_s", 3600)
        ),
        semantic_threshold=threshold,
        cache_min_confidence=min_confidence,
        max_text_bytes=_text_limit(f"{source}: limits.max_text_bytes", limits),
        max_batch=_whole(f"{source}: limits.max_batch", limits.get("max_batch", 256), minimum=1),
        max_inflight=_whole(
            f"{source}: limits.max_inflight", limits.get("max_inflight", 4096), minimum=1
        ),
        max_loop_lag_ms=_number(
            f"{source}: limits.max_loop_lag_ms", limits.get("max_loop_lag_ms", 50.0)
        ),
        max_queue_ms=_number(
            f"{source}: limits.max_queue_ms", limits.get("max_queue_ms", 250.0), minimum=1.0
        ),
        log_raw_text=_flag(f"{source}: log.raw_text", log.get("raw_text", False)),
        frontier=(
            parse_frontier(f"{source}: frontier", _mapping(f"{source}: frontier", top["frontier"]))
            if top.get("frontier") is not None
            else None
        ),
        source=source,
    )
    if policy.max_batch > policy.max_inflight:
        raise ConfigError(
            f"{source}: limits.max_batch ({policy.max_batch}) exceeds limits.max_inflight "
            f"({policy.max_inflight}): such a batch could never be admitted"
        )
    return policy


def parse_frontier(where: str, raw: dict[str, Any]) -> FrontierConfig:
    """The policy's ``frontier`` section (validated; unknown keys are errors)."""
    _check_keys(where, raw, {"providers", "retry", "breaker", "candidates"})
    providers = []
    items = raw.get("providers") or []
    if not isinstance(items, list):
        raise ConfigError(f"{where}.providers: expected a list of providers")
    allowed = {
        "name", "base_url", "model", "api_key_env", "price_in_per_mtok", "price_out_per_mtok",
        "timeout_s",
    }  # fmt: skip
    for i, item in enumerate(items):
        w = f"{where}.providers[{i}]"
        p = _mapping(w, item)
        _check_keys(w, p, allowed)
        for key in ("name", "base_url", "model"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise ConfigError(f"{w}: {key!r} (a non-empty string) is required")
        if not p["base_url"].startswith(("http://", "https://")):
            raise ConfigError(f"{w}.base_url: {p['base_url']!r} is not an http(s) URL")
        providers.append(
            ProviderConfig(
                p["name"],
                p["base_url"],
                p["model"],
                str(p["api_key_env"]) if p.get("api_key_env") else None,
                _number(f"{w}.price_in_per_mtok", p.get("price_in_per_mtok", 0.0)),
                _number(f"{w}.price_out_per_mtok", p.get("price_out_per_mtok", 0.0)),
                _number(f"{w}.timeout_s", p.get("timeout_s", 30.0), minimum=0.001),
            )
        )
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.providers: names repeat ({names})")
    r = _mapping(f"{where}.retry", raw.get("retry"))
    _check_keys(f"{where}.retry", r, {"attempts", "backoff_s", "max_backoff_s"})
    b = _mapping(f"{where}.breaker", raw.get("breaker"))
    _check_keys(f"{where}.breaker", b, {"failures", "cooldown_s"})
    candidates = raw.get("candidates", DEFAULT_CANDIDATES)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 0:
        raise ConfigError(
            f"{where}.candidates: {candidates!r} is not a whole number >= 0 (0: all labels)"
        )
    return FrontierConfig(
        tuple(providers),
        RetryPolicy(
            _whole(f"{where}.retry.attempts", r.get("attempts", 2), minimum=1),
            _number(f"{where}.retry.backoff_s", r.get("backoff_s", 0.05)),
            _number(f"{where}.retry.max_backoff_s", r.get("max_backoff_s", 1.0)),
        ),
        BreakerPolicy(
            _whole(f"{where}.breaker.failures", b.get("failures", 5), minimum=1),
            _number(f"{where}.breaker.cooldown_s", b.get("cooldown_s", 30.0)),
        ),
        candidates,
    )


def load_policy(path: str | Path, default_bundle: Path | None = None) -> Policy:
    """The policy file at ``path``. With ``default_bundle`` (``tiergate serve --bundle B
    --config FILE``) the file may leave out ``tasks`` (one task on that bundle) or a
    task's ``bundle`` (that bundle)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no policy file at {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if default_bundle is not None and isinstance(raw, dict):
        bundle = str(Path(default_bundle).resolve())
        tasks = raw.get("tasks")
        if tasks is None:
            raw["tasks"] = {"default": {"bundle": bundle}}
        elif isinstance(tasks, dict):
            for task in tasks.values():
                if isinstance(task, dict):
                    task.setdefault("bundle", bundle)
    return parse_policy(raw, path.parent, str(path))


def default_policy(bundle: Path) -> Policy:
    """The embedded default: one task on one bundle, no auth, no quotas."""
    return parse_policy(
        {"version": "default", "tasks": {"default": {"bundle": str(bundle)}}},
        Path.cwd(),
        "<default>",
    )
