"""What the caches keep, and what an escalation offers the frontier.

With ``cache.min_confidence`` above 0, the caches keep only answers likely to be
right: local answers at least that sure, and frontier answers that a local tier's
top label agrees with. An escalation offers the frontier the local tiers' likeliest
labels (``frontier.candidates``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import KEY_A, escalate_everything, write_policy
from tiergate._core import ConfigError
from tiergate.bundle import load_bundle
from tiergate.engine import Engine, Request, in_process_runtime
from tiergate.policy import Tenant, default_policy, parse_policy


def linear_ranking(bundle: Path, text: str) -> list[str]:
    """The linear tier's labels for ``text``, likeliest first."""
    b = load_bundle(bundle)
    probs = b.linear_model().predict_proba([text])[0]
    return [b.labels[i] for i in sorted(range(len(probs)), key=lambda i: -probs[i])]


def frontier_section(url: str, **more: Any) -> dict[str, Any]:
    return {"providers": [{"name": "loopback", "base_url": url, "model": "m"}], **more}


def test_a_frontier_answer_is_cached_only_when_a_local_tier_agrees(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    agreed, disputed = "where is my package", "i want my money back"
    script = Script(
        answers={
            agreed: linear_ranking(linear_bundle, agreed)[0],
            disputed: linear_ranking(linear_bundle, disputed)[1],
        }
    )
    with fake_provider(script) as url:
        policy = write_policy(
            tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle),
            frontier=frontier_section(url), cache={"min_confidence": 0.99},
        )  # fmt: skip
        r = start(policy)
        with r.client(KEY_A) as c:
            answers = [c.classify(t, timeout=5) for t in (agreed, agreed, disputed, disputed)]
    assert [a.tier for a in answers] == ["frontier"] * 4
    assert [a.cached for a in answers] == [False, True, False, False]
    assert answers[2].label == answers[3].label == script.answers[disputed]
    assert script.calls == 3  # the disputed answer was asked for twice


def test_a_local_answer_is_cached_only_when_confident_enough(linear_bundle: Path) -> None:
    base = default_policy(linear_bundle)
    tenant, text = Tenant("a"), "my thing"  # the linear tier answers it, not quite sure

    async def twice(min_confidence: float) -> tuple[float, list[bool]]:
        policy = dataclasses.replace(base, cache_min_confidence=min_confidence)
        engine = Engine(policy, {n: in_process_runtime(t) for n, t in policy.tasks.items()})
        first = await engine.classify(Request(text, tenant))
        second = await engine.classify(Request(text, tenant))
        return first.confidence, [first.cached, second.cached]

    assert base.cache_min_confidence == 0.0  # by default, every answer is cached
    confidence, cached = asyncio.run(twice(0.0))
    assert cached == [False, True]
    assert 0.5 < confidence < 1.0
    assert asyncio.run(twice(confidence))[1] == [False, True]  # exactly as sure: kept
    assert asyncio.run(twice(min(1.0, confidence + 1e-6)))[1] == [False, False]


@pytest.mark.parametrize("candidates", [2, 0])
def test_an_escalation_offers_the_likeliest_labels(
    start: Any, linear_bundle: Path, tmp_path: Path, candidates: int
) -> None:
    text = "i want my money back"
    ranking = linear_ranking(linear_bundle, text)
    script = Script(answers={text: ranking[1]})
    with fake_provider(script) as url:
        policy = write_policy(
            tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle),
            frontier=frontier_section(url, candidates=candidates),
        )  # fmt: skip
        r = start(policy)
        with r.client(KEY_A) as c:
            answer = c.classify(text, timeout=5)
    assert answer.label == ranking[1]
    if candidates:
        assert script.offered == [ranking[:candidates]]
        assert f"offered {candidates} of {len(ranking)} labels" in answer.path[-1].note
    else:
        assert script.offered == [load_bundle(linear_bundle).labels]


def test_a_label_outside_the_offer_is_refused(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    text = "i want my money back"
    ranking = linear_ranking(linear_bundle, text)
    script = Script(answers={text: ranking[-1]})  # valid for the task, but not offered
    with fake_provider(script) as url:
        policy = write_policy(
            tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle),
            frontier=frontier_section(url, candidates=2),
        )  # fmt: skip
        r = start(policy)
        with r.client(KEY_A) as c:
            answer = c.classify(text, timeout=5)
    assert answer.degraded
    assert "frontier failed" in answer.degraded_reason
    assert answer.label == ranking[0]  # the best local answer stands in


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("frontier", {"providers": [], "candidates": -1}, "candidates"),
        ("frontier", {"providers": [], "candidates": 2.5}, "whole number"),
        ("frontier", {"providers": [], "candidates": True}, "whole number"),
        ("cache", {"min_confidence": 1.5}, "min_confidence must be at most 1"),
        ("cache", {"min_confidence": "high"}, "min_confidence"),
    ],
)
def test_bad_cache_and_candidate_settings_are_refused(
    linear_bundle: Path, section: str, value: Any, message: str
) -> None:
    raw = {"version": "v", "tasks": {"t": {"bundle": str(linear_bundle)}}, section: value}
    with pytest.raises(ConfigError, match=message):
        parse_policy(raw, linear_bundle.parent)


def test_the_exact_cache_serves_only_answers_made_for_everyone(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """Two wordings can share an exact-cache key (case and spacing are normalised away)
    while only one of them trips a rule: that one must take its risk route, not the
    other's cached answer. And answers shaped by a request's own hints (risk tags, a
    forced tier) are never served to others."""
    answer_all = {"linear": {"general": 0.0, "finance": 0.0}}  # every answer is cacheable
    tasks = {"intents": {"bundle": str(linear_bundle), "thresholds": answer_all}}
    policy = write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks,
                          risk={"legal": "review", "finance": "review"})  # fmt: skip
    r = start(policy)
    untagged, tagged = "please block my credit  card", "please block my CREDIT card"
    with r.client(KEY_A) as c:
        first = c.classify(untagged, timeout=5)
        assert (first.tier, first.cached, list(first.risk_tags)) == ("linear", False, [])
        assert c.classify(untagged, timeout=5).cached  # cached indeed
        routed = c.classify(tagged, timeout=5)  # the rule's keyword matches this wording
        assert (routed.tier, routed.cached, routed.pending_review) == ("review", False, True)
        assert list(routed.risk_tags) == ["finance"]

        hinted = "hello there, my friend"
        assert not c.classify(hinted, risk_tags=["pii"], timeout=5).cached
        assert not c.classify(hinted, force_tier="linear", timeout=5).cached
        assert not c.classify(hinted, timeout=5).cached  # neither was kept for it
        assert c.classify(hinted, timeout=5).cached
