"""What the caches keep, and what an escalation offers the frontier.

The caches keep answers that cost model time or money and are likely right: the
intent model's when at least ``cache.min_confidence`` sure (0.995 by default), the
frontier's when a local tier's top label agrees or no local tier named one. The
cheap tiers' answers are never kept: recomputing them costs what a lookup does.
An escalation offers the frontier the local tiers' likeliest labels
(``frontier.candidates``), listed in the task's order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import edited_bundle
from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import KEY_A, escalate_everything, write_policy
from tiergate._core import ConfigError
from tiergate.bundle import load_bundle
from tiergate.engine import Decision, Engine, Request, in_process_runtime
from tiergate.policy import Tenant, parse_policy


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
    agreed, disputed = "where is my package", "i would like to cancel"  # no risk tags
    script = Script(
        answers={
            agreed: linear_ranking(linear_bundle, agreed)[0],
            disputed: linear_ranking(linear_bundle, disputed)[1],
        }
    )
    with fake_provider(script) as url:
        policy = write_policy(
            tmp_path / "p.yaml", linear_bundle, tasks=escalate_everything(linear_bundle),
            frontier=frontier_section(url),  # the default cache settings
        )  # fmt: skip
        r = start(policy)
        with r.client(KEY_A) as c:
            answers = [c.classify(t, timeout=5) for t in (agreed, agreed, disputed, disputed)]
    assert [a.tier for a in answers] == ["frontier"] * 4
    assert [a.cached for a in answers] == [False, True, False, False]
    assert answers[2].label == answers[3].label == script.answers[disputed]
    assert script.calls == 3  # the disputed answer was asked for twice


def test_a_frontier_only_task_keeps_the_frontiers_answers(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """No local tier runs: nothing to check an answer against, and every repeat would
    pay the frontier again. Its answers are kept (by default)."""
    tasks = {"intents": {"bundle": str(linear_bundle), "tiers": []}}
    script = Script(default="greeting")
    with fake_provider(script) as url:
        r = start(write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks,
                               frontier=frontier_section(url)))  # fmt: skip
        with r.client(KEY_A) as c:
            answers = [c.classify("what time is it", timeout=5) for _ in range(2)]
    assert [(a.tier, a.cache) for a in answers] == [("frontier", ""), ("frontier", "exact")]
    assert script.calls == 1


def test_a_disputed_frontier_answer_stays_out_of_both_caches(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    """With embeddings (the full bundle), the semantic cache applies the same rule: a
    paraphrase gets the agreed answer from it, never the disputed one."""
    tasks = escalate_everything(full_bundle)
    tasks["intents"]["thresholds"]["intent"] = {"general": 1.01}
    agreed, disputed = "where is my parcel right now", "i would like to cancel my plan"
    script = Script()  # at first a label no task has: refused, the best local one stands in
    with fake_provider(script) as url:
        policy = write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks,
                              frontier=frontier_section(url),
                              cache={"semantic_threshold": 0.9})  # fmt: skip
        r = start(policy)
        with r.client(KEY_A) as c:
            local = {t: c.classify(t, timeout=30) for t in (agreed, disputed)}
            assert all(a.degraded and not a.cached for a in local.values())
            other = next(x for x in load_bundle(full_bundle).labels if x != local[disputed].label)
            for text, label in ((agreed, local[agreed].label), (disputed, other)):
                script.answers[text] = script.answers[text + "?"] = label
            texts = [agreed, agreed, agreed + "?", disputed, disputed, disputed + "?"]
            answers = [c.classify(t, timeout=30) for t in texts]
    assert [a.tier for a in answers] == ["frontier"] * 6
    assert [a.label for a in answers] == [local[agreed].label] * 3 + [other] * 3
    assert [a.cache for a in answers] == ["", "exact", "semantic", "", "", ""]
    assert script.calls == 2 + 1 + 3  # the probes, the agreed text once, the disputed always


def _engine(bundle: Path, thresholds: dict[str, Any], min_confidence: float | None) -> Engine:
    raw: dict[str, Any] = {
        "version": "v", "tasks": {"t": {"bundle": str(bundle), "thresholds": thresholds}},
    }  # fmt: skip
    if min_confidence is not None:
        raw["cache"] = {"min_confidence": min_confidence}
    policy = parse_policy(raw, bundle.parent)
    return Engine(policy, {n: in_process_runtime(t) for n, t in policy.tasks.items()})


async def _twice(engine: Engine, text: str) -> list[Decision]:
    tenant = Tenant("a")
    return [await engine.classify(Request(text, tenant)) for _ in range(2)]


def test_a_model_answer_is_cached_only_when_sure_enough(full_bundle: Path, tmp_path: Path) -> None:
    # The tiny test model is sure of everything: a high temperature softens it.
    soften = {"method": "temperature", "temperature": 8.0}
    bundle = edited_bundle(full_bundle, tmp_path / "unsure",
                           lambda m: m["tiers"]["intent"].update(calibration=soften))  # fmt: skip
    # The cheap tiers never answer; the intent model answers everything.
    thresholds = {"rules": {"general": 1.01}, "linear": {"general": 1.01},
                  "intent": {"general": 0.0, "finance": 0.0}}  # fmt: skip
    text = "my thing"  # the intent model answers it, not quite sure

    def cached(min_confidence: float | None) -> tuple[float, list[bool]]:
        engine = _engine(bundle, thresholds, min_confidence)
        try:
            first, second = asyncio.run(_twice(engine, text))
        finally:
            for rt in engine.runtimes.values():
                rt.close()
        assert first.tier == second.tier == "intent"
        return first.confidence, [first.cached, second.cached]

    default = parse_policy({"version": "v", "tasks": {"t": {"bundle": str(bundle)}}}, tmp_path)
    assert default.cache_min_confidence == 0.995
    confidence, kept = cached(0.0)
    assert kept == [False, True]
    assert 0.0 < confidence < 0.995  # so the default does not keep it
    assert cached(None)[1] == [False, False]
    assert cached(confidence)[1] == [False, True]  # exactly as sure: kept
    assert cached(min(1.0, confidence + 1e-6))[1] == [False, False]


def test_the_cheap_tiers_answers_are_not_cached(linear_bundle: Path) -> None:
    """A rules or linear answer is recomputed in microseconds: the caches keep none, not
    even when sure, so that their room goes to answers that cost model time or money."""
    answer_all = {"general": 0.0, "finance": 0.0}
    engine = _engine(linear_bundle, {"rules": answer_all, "linear": answer_all}, 0.0)
    for text, tier in (("hello there", "linear"), ("please reset my password", "rules")):
        first, second = asyncio.run(_twice(engine, text))
        assert (first.tier, second.tier) == (tier, tier), (text, first.path)
        assert (first.cached, second.cached) == (False, False)
        assert second.label == first.label
    assert not engine.exact.entries


@pytest.mark.parametrize("candidates", [2, 0])
def test_an_escalation_offers_the_likeliest_labels_in_the_tasks_order(
    start: Any, linear_bundle: Path, tmp_path: Path, candidates: int
) -> None:
    text = "i want my money back"
    ranking = linear_ranking(linear_bundle, text)
    labels = load_bundle(linear_bundle).labels
    in_task_order = [x for x in labels if x in ranking[:2]]
    assert in_task_order != ranking[:2], "the test needs a ranking out of the task's order"
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
        # Not likeliest first: the order must not lean the frontier to the local guess.
        assert script.offered == [in_task_order]
        assert f"offered {candidates} of {len(ranking)} labels" in answer.path[-1].note
    else:
        assert script.offered == [labels]


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
    untagged, tagged = "please block my credit  card", "please block my CREDIT card"
    hinted = "hello there, my friend"
    # Frontier answers a local tier agrees with: the kind the caches keep.
    script = Script(answers={t: linear_ranking(linear_bundle, t)[0] for t in (untagged, hinted)})
    with fake_provider(script) as url:
        policy = write_policy(tmp_path / "p.yaml", linear_bundle,
                              tasks=escalate_everything(linear_bundle),
                              frontier=frontier_section(url),
                              risk={"legal": "review", "finance": "review"})  # fmt: skip
        r = start(policy)
        with r.client(KEY_A) as c:
            first = c.classify(untagged, timeout=5)
            assert (first.tier, first.cached, list(first.risk_tags)) == ("frontier", False, [])
            assert c.classify(untagged, timeout=5).cached  # cached indeed
            routed = c.classify(tagged, timeout=5)  # the rule's keyword matches this wording
            assert (routed.tier, routed.cached, routed.pending_review) == ("review", False, True)
            assert list(routed.risk_tags) == ["finance"]

            assert not c.classify(hinted, risk_tags=["pii"], timeout=5).cached
            assert not c.classify(hinted, force_tier="linear", timeout=5).cached
            assert not c.classify(hinted, timeout=5).cached  # neither was kept for it
            assert c.classify(hinted, timeout=5).cached
    assert script.calls == 4  # untagged once; hinted three times (pii, forced, plain)
