"""Malformed rule, policy and bundle files: hypothesis mutates valid documents
(any value anywhere replaced by junk of another type or range, keys dropped)
and feeds raw bytes. Every outcome is a loaded object or a ConfigError /
FormatError: never a TypeError, KeyError, crash or hang."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiergate import ConfigError, FormatError, RuleSet
from tiergate.bundle import load_bundle
from tiergate.engine import TaskRuntime
from tiergate.policy import default_policy, load_policy

CLEAR = (ConfigError, FormatError)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON-like document, the document itself included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """``doc`` with one to three places replaced by junk or removed."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(doc)))
        if not where:
            return draw(junk)
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(junk)
        if where[:-1] and draw(st.booleans()):
            break
    return doc


RULES: dict[str, Any] = {
    "version": 1,
    "rules": [
        {
            "id": "refund",
            "label": "refund",
            "confidence": 0.97,
            "priority": 2,
            "patterns": [{"keywords": ["refund", "money back"]}, {"regex": r"\brefund(s|ed)?\b"}],
            "tags": ["finance"],
        },
        {"id": "legal", "patterns": [{"regex": "(?i)lawyer|sue"}], "tags": ["legal"]},
    ],
}


@given(doc=mutated(RULES))
@settings(max_examples=300, deadline=None)
def test_mutated_rule_documents_load_or_raise_clearly(doc: Any) -> None:
    text = yaml.safe_dump(doc)
    try:
        rs = RuleSet.from_yaml(text)
    except CLEAR:
        return
    rs.match("I want a refund from my lawyer")  # what loaded works


@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_as_rule_file_raise_clearly(raw: bytes) -> None:
    with contextlib.suppress(*CLEAR):
        RuleSet.from_yaml(raw.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def bundle_copy(linear_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    shutil.copytree(linear_bundle, out)
    return out


def test_mutated_policy_files_load_or_raise_clearly(
    linear_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    doc = {
        "version": "v1",
        "default_task": "intents",
        "tasks": {"intents": {"bundle": str(linear_bundle), "mode": "cascade",
                              "tiers": ["rules", "linear"],
                              "thresholds": {"linear": {"general": 0.9, "finance": 0.95}},
                              "latency": {"p95_ms": 50, "on_skip": "degrade"}}},
        "tenants": {"a": {"key_sha256": ["0" * 64], "on_quota": "reject",
                          "quota": {"requests_per_day": 10, "spend_per_day_usd": 1.5}}},
        "risk": {"legal": "review", "finance": "gate"},
        "cache": {"exact_ttl_s": 60, "semantic_ttl_s": 600, "semantic_threshold": 0.95},
        "limits": {"max_text_bytes": 2000, "max_batch": 8, "max_inflight": 64},
        "frontier": {"providers": [{"name": "p", "base_url": "http://127.0.0.1:1/v1",
                                    "model": "m", "price_in_per_mtok": 1.0}]},
    }  # fmt: skip
    load_policy(_dump(path, doc))  # the unmutated document is valid

    @given(m=mutated(doc))
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    def check(m: Any) -> None:
        with contextlib.suppress(*CLEAR):
            load_policy(_dump(path, m))

    check()


def test_mutated_bundle_manifests_load_or_raise_clearly(bundle_copy: Path) -> None:
    manifest = bundle_copy / "manifest.json"
    original = json.loads(manifest.read_text())
    task = default_policy(bundle_copy).tasks["default"]
    TaskRuntime(task, load_bundle(bundle_copy), None)

    @given(m=mutated(original))
    @settings(max_examples=300, deadline=None)
    def check(m: Any) -> None:
        manifest.write_text(json.dumps(m))
        # What a front end does with a bundle: load it, then build its tiers.
        with contextlib.suppress(*CLEAR):
            TaskRuntime(task, load_bundle(bundle_copy), None)

    try:
        check()
    finally:
        manifest.write_text(json.dumps(original))


def _dump(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path
