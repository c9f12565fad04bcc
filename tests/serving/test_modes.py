"""Per-task tier sets and the routing mode: the benchmark's baselines are policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import code_of, write_policy
from tiergate._core import ConfigError
from tiergate.policy import load_policy

NO_CACHE = {"exact_ttl_s": 0, "semantic_ttl_s": 0}


def test_an_empty_tier_set_sends_everything_to_the_frontier(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    tasks = {"intents": {"bundle": str(full_bundle), "tiers": []}}
    script = Script(default="greeting")
    with fake_provider(script) as url:
        r = start(write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks, cache=NO_CACHE), url)
        with r.client() as c:
            # The rules alone would answer "reset my password" (see tests/conftest.py).
            answers = [c.classify("reset my password", timeout=30) for _ in range(3)]
    assert [a.tier for a in answers] == ["frontier"] * 3
    assert not any(a.cached for a in answers)  # caches off: every request pays
    assert script.calls == 3
    assert [s.tier for s in answers[0].path if s.accepted] == ["frontier"]


def test_route_mode_sends_each_request_to_one_tier(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    def run(linear_threshold: float, force_tier: str = "") -> Any:
        tasks = {
            "intents": {
                "bundle": str(full_bundle),
                "mode": "route",
                "tiers": ["intent"],
                # The router sends everything one way; the model must answer even
                # below its own threshold when routed to.
                "thresholds": {
                    "linear": {"general": linear_threshold},
                    "intent": {"general": 1.01},
                },
            }
        }
        script = Script(default="greeting")
        policy = write_policy(tmp_path / f"p{linear_threshold}.yaml", full_bundle, tasks=tasks)
        with fake_provider(script) as url:
            r = start(policy, url)
            with r.client() as c:
                answer = c.classify("where is my package", force_tier=force_tier, timeout=30)
        return answer, script.calls

    to_model, calls = run(0.0)
    assert (to_model.tier, calls) == ("intent", 0)
    steps = {s.tier: s for s in to_model.path}
    assert steps["linear"].note == "router: to the intent model"
    assert not steps["linear"].accepted
    assert steps["intent"].accepted
    assert steps["intent"].confidence < 1.01
    assert "rules" not in steps  # not in the task's tiers

    # A hint that skips the router goes to the model, as it would in a cascade.
    forced, calls = run(1.01, force_tier="intent")
    assert (forced.tier, calls) == ("intent", 0)

    to_frontier, calls = run(1.01)
    assert (to_frontier.tier, calls) == ("frontier", 1)
    assert [s.tier for s in to_frontier.path] == ["linear", "frontier"]
    assert to_frontier.path[0].note == "router: to the frontier"


def test_bad_tiers_and_modes_are_refused(tmp_path: Path, linear_bundle: Path) -> None:
    for bad, message in (
        ({"tiers": ["linear", "gpt"]}, "unknown tier 'gpt'"),
        ({"tiers": "linear"}, "a list of"),
        ({"mode": "fastest"}, "'fastest' is not one of"),
    ):
        tasks = {"intents": {"bundle": str(linear_bundle), **bad}}
        with pytest.raises(ConfigError, match=message):
            load_policy(write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks))


def test_route_mode_needs_a_router_and_a_model(
    start: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    tasks = {"intents": {"bundle": str(linear_bundle), "mode": "route"}}
    with pytest.raises(ConfigError, match="mode route needs a linear tier"):
        start(write_policy(tmp_path / "p.yaml", linear_bundle, tasks=tasks))


def test_the_router_never_answers_even_degraded(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    # Routed to the frontier, and no frontier: nothing may answer with the router's guess.
    tasks = {
        "intents": {
            "bundle": str(full_bundle),
            "mode": "route",
            "tiers": ["intent"],
            "thresholds": {"linear": {"general": 1.01}},
        }
    }
    r = start(write_policy(tmp_path / "p.yaml", full_bundle, tasks=tasks))
    with r.client() as c:
        code = code_of(lambda: c.classify("where is my package", timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_reload_that_changes_a_tasks_tiers_or_mode_takes_effect(
    start: Any, full_bundle: Path, tmp_path: Path
) -> None:
    """The runtime of a bundle the new policy still uses is reused (not loaded again):
    what the task says of tiers and mode must come from the new policy all the same,
    and so for a second task on the same bundle."""
    script = Script(default="greeting")
    path = tmp_path / "p.yaml"
    both = {"cascade": {"bundle": str(full_bundle)},
            "frontier_only": {"bundle": str(full_bundle), "tiers": []}}  # fmt: skip
    with fake_provider(script) as url:
        r = start(write_policy(path, full_bundle, tasks=both, cache=NO_CACHE), url)
        with r.client() as c:
            # The rules alone would answer "reset my password" (see tests/conftest.py).
            before = c.classify("reset my password", task="cascade", timeout=30)
            other = c.classify("reset my password", task="frontier_only", timeout=30)
            tasks = {"cascade": {"bundle": str(full_bundle), "tiers": []},
                     "frontier_only": {"bundle": str(full_bundle)}}  # fmt: skip
            write_policy(path, full_bundle, tasks=tasks, cache=NO_CACHE, version="v2")
            assert r.server.reload()
            after = c.classify("reset my password", task="cascade", timeout=30)
            other_after = c.classify("reset my password", task="frontier_only", timeout=30)
    assert (before.tier, other.tier) == ("rules", "frontier")
    assert after.policy_version == "v2"
    assert (after.tier, other_after.tier) == ("frontier", "rules")
