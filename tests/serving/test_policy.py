"""Policy files: valid ones load; every mistake is a ConfigError naming the key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tiergate import ConfigError
from tiergate.accounting import Ledger, QuotaExceeded
from tiergate.policy import Quota, Tenant, load_policy, parse_policy

BASE: dict[str, Any] = {"version": "7", "tasks": {"t": {"bundle": "b"}}}


def parse(**changes: Any) -> Any:
    return parse_policy({**BASE, **changes}, Path("/srv/policies"), "p.yaml")


def test_minimal_policy_gets_safe_defaults() -> None:
    p = parse()
    assert p.version == "7"
    assert p.default_task == "t"
    assert p.tasks["t"].bundle == Path("/srv/policies/b")
    assert not p.auth_required
    assert p.max_text_bytes == 16_384
    assert not p.log_raw_text


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": {}}, "at least one task"),
        ({"version": ""}, "'version' is required"),
        ({"taks": {}}, r"unknown key\(s\) \['taks'\]"),
        ({"default_task": "x"}, "default_task 'x' is not one of"),
        ({"risk": {"legal": "panic"}}, "risk.legal: 'panic' is not one of"),
        ({"tasks": {"t": {"bundle": "b", "thresholds": {"magic": {}}}}}, "unknown tier 'magic'"),
        ({"tasks": {"t": {"bundle": "b", "thresholds": {"linear": {"general": "high"}}}}},
         r"thresholds.linear.general: expected a finite number"),
        ({"tasks": {"t": {}}}, "'bundle' .* is required"),
        ({"tenants": {"a": {"key_sha256": ["abc"]}}}, "is not a SHA-256 hex digest"),
        ({"tenants": {"a": {"quota": {"requests_per_day": -1}}}}, "expected a finite number >= 0"),
        ({"tenants": {"a": {"on_quota": "shrug"}}}, "is not 'degrade' or 'reject'"),
        ({"cache": {"semantic_threshold": 1.5}}, "at most 1"),
        ({"limits": {"max_text_bytes": 0}}, "expected a finite number >= 1"),
        ({"tasks": ["t"]}, "tasks: expected a mapping, not list"),
        ({"limits": {"max_loop_lag_ms": float("nan")}}, "max_loop_lag_ms: expected a finite"),
        ({"tenants": {"a": {"key_sha256": True}}}, "key_sha256: expected a list of strings"),
        ({"tasks": {"t": {"bundle": "b\0x"}}}, "is not a usable path"),
        # A quoted "false" is a string, and bool("false") would have turned logging on.
        ({"log": {"raw_text": "false"}}, "log.raw_text: expected true or false, not 'false'"),
        ({"auth": {"required": "yes"}}, "auth.required: expected true or false"),
        # Counts are not rounded: 0.9 requests a day would have refused everything.
        ({"tenants": {"a": {"quota": {"requests_per_day": 0.9}}}}, "expected a whole number"),
        ({"tenants": {"a": {"quota": {"escalations_per_day": 2.5}}}}, "expected a whole number"),
        ({"frontier": {"providers": [{"name": "m", "base_url": "http://x", "model": "m"}],
                       "retry": {"attempts": 1.5}}}, "retry.attempts: expected a whole number"),
        ({"limits": {"max_batch": 8.5}}, "max_batch: expected a whole number"),
        # Longer texts would pass validation, then fail in the Rust tiers (INTERNAL).
        ({"limits": {"max_text_bytes": 4 << 20}}, "max_text_bytes: at most 1048576"),
        ({"tenants": {"a": {"key_sha256": ["ab" * 32]}, "b": {"key_sha256": ["AB" * 32]}}},
         "is also tenant 'a'"),
        ({1: "x", "foo": "y"}, r"unknown key\(s\) \[1, 'foo'\]"),
        ({"limits": {1: 2, "x": 3}}, r"unknown key\(s\) \[1, 'x'\]"),
    ],
)  # fmt: skip
def test_mistakes_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy({**BASE, **changes}, Path("/srv/policies"), "p.yaml")


def test_keys_are_matched_by_hash_and_risk_actions_rank() -> None:
    digest = hashlib.sha256(b"secret").hexdigest()
    p = parse(
        tenants={"acme": {"key_sha256": [digest.upper()]}},
        risk={"finance": "escalate", "legal": "review"},
    )
    assert p.tenant_for_key("secret") is p.tenants["acme"]
    assert p.tenant_for_key("Secret") is None
    assert p.tenant_for_key("") is None
    assert p.risk_action(["finance"]) == ("escalate", "finance")
    assert p.risk_action(["finance", "legal"]) == ("review", "legal")
    assert p.risk_action(["pii"]) == ("gate", None)


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("version: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(bad)
    with pytest.raises(FileNotFoundError, match="no policy file"):
        load_policy(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_policy(binary)


def test_ledger_reserves_settles_and_rolls_over_by_day() -> None:
    now = [1_000_000.0]
    ledger = Ledger(clock=lambda: now[0])
    t = Tenant("a", quota=Quota(requests_per_day=2, escalations_per_day=5, spend_per_day_usd=1.0))
    ledger.admit(t)
    ledger.admit(t)
    with pytest.raises(QuotaExceeded, match="2 requests per day") as e:
        ledger.admit(t)
    assert 0 < e.value.retry_after_s <= 86_400
    r1 = ledger.reserve_escalation(t, 0.6)
    with pytest.raises(QuotaExceeded, match="spend cap"):
        ledger.reserve_escalation(t, 0.6)  # 0.6 reserved + 0.6 > 1.0
    ledger.settle(r1, 0.0)  # a failed call releases its reservation
    ledger.settle(r1, 5.0)  # settling twice is a no-op
    r2 = ledger.reserve_escalation(t, 0.6)
    ledger.settle(r2, 0.5)
    usage = ledger.snapshot("a")
    assert (usage.escalations, usage.spent_usd, usage.reserved_usd) == (2, 0.5, 0.0)
    now[0] += 86_400  # the next day starts from zero
    ledger.admit(t)
    assert ledger.snapshot("a").requests == 1


def test_serve_bundle_with_config_fills_in_the_bundle(tmp_path: Path) -> None:
    """`tiergate serve --bundle B --config FILE`: the file may leave out its tasks, or a
    task's bundle; without --bundle the same file is an error naming what is missing."""
    bundle = tmp_path / "bundle"
    no_tasks = tmp_path / "no_tasks.yaml"
    no_tasks.write_text("version: '3'\nauth: {required: true}\n")
    p = load_policy(no_tasks, bundle)
    assert list(p.tasks) == ["default"]
    assert p.tasks["default"].bundle == bundle.resolve()
    assert p.auth_required
    partial = tmp_path / "partial.yaml"
    partial.write_text("version: '3'\ntasks:\n  a: {latency: {p95_ms: 20}}\n  b: {bundle: other}\n")
    p = load_policy(partial, bundle)
    assert p.tasks["a"].bundle == bundle.resolve()
    assert p.tasks["a"].p95_ms == 20
    assert p.tasks["b"].bundle == (tmp_path / "other").resolve()
    with pytest.raises(ConfigError, match="at least one task"):
        load_policy(no_tasks)
    with pytest.raises(ConfigError, match=r"tasks\.a: 'bundle'"):
        load_policy(partial)
