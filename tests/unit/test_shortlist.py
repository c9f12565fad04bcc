"""The labels an escalation offers, and the simulated frontier's answers to them."""

from __future__ import annotations

import numpy as np

from tiergate.frontier import FrontierSimulator, SimulatorParams, shortlist, simulated_answer

LABELS = ["a", "b", "c", "d", "oos", "e"]


def test_the_likeliest_labels_are_offered_in_the_tasks_order_with_oos() -> None:
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.01, 0.14])
    assert shortlist(probs, LABELS, 3) == ["b", "d", "oos", "e"]
    assert shortlist(probs, LABELS, 5) == ["a", "b", "c", "d", "oos", "e"]
    assert shortlist(probs, LABELS, 0) == LABELS  # 0: everything, in the task's order
    assert shortlist(probs, LABELS, 6) == LABELS
    assert shortlist(probs[[0, 1, 2, 3, 5]], ["a", "b", "c", "d", "e"], 2) == ["b", "d"]
    probs[4] = 0.9  # oos among the likeliest: offered once
    assert shortlist(probs, LABELS, 2) == ["b", "oos"]


def test_the_local_guess_is_not_what_a_frontier_falls_back_to() -> None:
    # The likeliest local label ("e") is last in the task's order. A simulated frontier
    # that is not offered the true label ("c") names the first label listed: were the
    # list likeliest first, that would be the local guess, and their agreement would let
    # a wrong answer into the caches.
    probs = np.array([0.05, 0.2, 0.01, 0.3, 0.01, 0.43])
    offered = shortlist(probs, LABELS, 3)
    assert offered[0] != "e"
    assert simulated_answer(0, 1.0, "c", "some text", offered) != "e"


def test_the_simulator_answers_a_text_the_same_way_every_time() -> None:
    answers = {
        (t, tuple(offer)): simulated_answer(0, 0.5, "c", t, offer)
        for t in (f"text {i}" for i in range(200))
        for offer in (LABELS, ["c", "a"])
    }
    again = {k: simulated_answer(0, 0.5, "c", k[0], list(k[1])) for k in answers}
    assert answers == again
    right = [a == "c" for (_, offer), a in answers.items() if len(offer) == len(LABELS)]
    assert 0.35 < np.mean(right) < 0.65  # accuracy 0.5, 200 texts
    # A right answer stays right whatever else is offered, and a wrong one stays wrong.
    for t in (f"text {i}" for i in range(200)):
        assert (answers[(t, tuple(LABELS))] == "c") == (answers[(t, ("c", "a"))] == "c")


def test_a_true_label_not_offered_cannot_be_named() -> None:
    # accuracy 1: the true label whenever it is offered, else the first one offered
    assert simulated_answer(0, 1.0, "e", "x", ["b", "d", "oos"]) == "b"
    assert simulated_answer(0, 1.0, "e", "x", ["b", "e"]) == "e"


def test_fewer_labels_offered_cost_less() -> None:
    sim = FrontierSimulator(LABELS * 20, SimulatorParams())
    assert sim.cost_of("hello", ["a", "b"]) < sim.cost_of("hello")
    full, short = sim.classify(["hello", "hello"], ["a", "a"], [LABELS * 20, ["b", "a"]])
    assert short.cost < full.cost
    assert full.simulated
    assert short.simulated
