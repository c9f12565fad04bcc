"""The one-text calls of the front end's hot path keep the GIL for a short text (their
work is shorter than giving it up and getting it back) and give it up for a long one."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from tiergate import FeatureHasher, LinearModel, RuleSet
from tiergate._core import KEEP_GIL_BELOW_BYTES


def linear_model() -> LinearModel:
    rng = np.random.default_rng(0)
    return LinearModel([FeatureHasher(n_features=2**12, ngram_range=(1, 2))],
                       rng.normal(size=(3, 2**12)), np.zeros(3), ["a", "b", "c"])  # fmt: skip


def linear_top1() -> Callable[[str], object]:
    return linear_model().top1


def rules_match() -> Callable[[str], object]:
    rules = RuleSet([{"id": "refund", "label": "refund", "patterns": [{"regex": r"refund"}]}])
    return rules.match


@pytest.fixture
def no_forced_switch() -> Iterator[None]:
    # Another thread gets the GIL only when the main thread gives it up of its own
    # accord: no switch forced after an interval, no collection (whose finalisers
    # could give it up) in the middle of a call.
    before = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        sys.setswitchinterval(before)


def ran_meanwhile(call: Callable[[str], object], text: str, *, calls: int = 0,
                  seconds: float = 0.0) -> int:  # fmt: skip
    """How often a thread waiting for the GIL ran while ``call`` was called: ``calls``
    times, or (``seconds``) until that thread first ran or the time was up."""
    counter = [0]
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            counter[0] += 1
            os.sched_yield()  # gives the GIL up, then waits for it again

    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        before = counter[0]
        until = time.monotonic() + seconds
        n = 0
        while n < calls or (seconds and time.monotonic() < until and counter[0] == before):
            call(text)
            n += 1
        return counter[0] - before
    finally:
        stop.set()
        t.join()


def test_top1_keeps_the_gil_below_the_limit_and_gives_it_up_from_it(
    no_forced_switch: None,
) -> None:
    top1 = linear_top1()
    below = "x" * (KEEP_GIL_BELOW_BYTES - 1)
    at = "x" * KEEP_GIL_BELOW_BYTES
    assert ran_meanwhile(top1, "please refund my order", calls=300) == 0
    assert ran_meanwhile(top1, below, calls=300) == 0
    assert ran_meanwhile(top1, at, seconds=10) > 0


def test_proba_keeps_the_gil_below_the_limit_and_gives_it_up_from_it(
    no_forced_switch: None,
) -> None:
    proba = linear_model().proba
    assert ran_meanwhile(proba, "please refund my order", calls=300) == 0
    assert ran_meanwhile(proba, "x" * (KEEP_GIL_BELOW_BYTES - 1), calls=300) == 0
    assert ran_meanwhile(proba, "x" * KEEP_GIL_BELOW_BYTES, seconds=10) > 0


def test_match_keeps_the_gil_for_a_short_text_and_gives_it_up_for_a_long_one(
    no_forced_switch: None,
) -> None:
    match = rules_match()
    assert ran_meanwhile(match, "please refund my order " * 10, calls=300) == 0
    # Long, and matched only at its end: the whole text is read each time.
    long = "please send my order " * 3300 + "refund"
    assert ran_meanwhile(match, long, seconds=10) > 0
