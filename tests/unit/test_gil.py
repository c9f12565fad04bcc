"""The one-text calls of the front end's hot path keep the GIL for a short text (their
work is shorter than giving it up and getting it back) and give it up for a long one."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from tiergate import FeatureHasher, LinearModel, RuleSet

KEEP_GIL_BELOW_BYTES = 4096  # rust_core/py/src/gil.rs


def linear_top1() -> Callable[[str], object]:
    rng = np.random.default_rng(0)
    model = LinearModel([FeatureHasher(n_features=2**12, ngram_range=(1, 2))],
                        rng.normal(size=(3, 2**12)), np.zeros(3), ["a", "b", "c"])  # fmt: skip
    return model.top1


def rules_match() -> Callable[[str], object]:
    rules = RuleSet([{"id": "refund", "label": "refund", "patterns": [{"regex": r"refund"}]}])
    return rules.match


@pytest.fixture
def long_switch_interval() -> Iterator[None]:
    # No forced switch while the test runs: another thread gets the GIL only when the
    # main thread gives it up of its own accord.
    before = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    yield
    sys.setswitchinterval(before)


def ran_meanwhile(call: Callable[[str], object], text: str, calls: int = 300) -> int:
    """How often a thread waiting for the GIL ran during ``calls`` calls of ``call``
    (stopping early once it has run)."""
    counter = [0]
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            counter[0] += 1
            os.sched_yield()  # gives the GIL up, then waits for it again

    t = threading.Thread(target=other)
    t.start()
    before = counter[0]
    for _ in range(calls):
        call(text)
        if counter[0] != before:
            break
    during = counter[0] - before
    stop.set()
    t.join()
    return during


@pytest.mark.parametrize("make", [linear_top1, rules_match], ids=["top1", "match"])
def test_short_texts_keep_the_gil_long_ones_give_it_up(
    make: Callable[[], Callable[[str], object]], long_switch_interval: None
) -> None:
    call = make()
    short = "please refund my order " * 10
    # Long enough that the waiting thread wakes while the work runs, on a busy machine.
    long = "please refund my order " * 3000
    assert len(short.encode()) < KEEP_GIL_BELOW_BYTES <= len(long.encode())
    assert ran_meanwhile(call, short) == 0
    assert ran_meanwhile(call, long, calls=3000) > 0
