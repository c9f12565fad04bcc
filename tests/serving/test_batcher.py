"""MicroBatcher: concurrent model calls share batches, deadlines pull batches forward."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from tiergate.engine import MicroBatcher


class Model:
    """Stands in for the model: logits encode each text's number; records batch sizes."""

    def __init__(self, seconds: float = 0.02, fail: bool = False):
        self.seconds = seconds
        self.fail = fail
        self.sizes: list[int] = []

    async def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        self.sizes.append(len(texts))
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("replica died")
        return np.array([[float(t)] for t in texts]), np.array([[float(t)] for t in texts])


def test_concurrent_calls_share_batches_and_get_their_own_answers() -> None:
    model = Model()

    async def run() -> list[float]:
        b = MicroBatcher(model, max_batch=64, max_wait_ms=1.0)
        out = await asyncio.gather(*(b.submit(str(i), budget_ms=1000) for i in range(50)))
        return [float(logits[0]) for logits, _ in out]

    assert asyncio.run(run()) == [float(i) for i in range(50)]
    assert sum(model.sizes) == 50
    assert len(model.sizes) <= 3  # one batch at a time: the rest wait and leave together


def test_full_batches_leave_at_once_and_never_exceed_the_cap() -> None:
    model = Model(seconds=0.0)

    async def run() -> None:
        b = MicroBatcher(model, max_batch=8, max_wait_ms=10_000)
        await asyncio.wait_for(asyncio.gather(*(b.submit(str(i), 1e9) for i in range(20))), 5)

    asyncio.run(run())
    assert max(model.sizes) <= 8
    assert sum(model.sizes) == 20


def test_a_tight_deadline_brings_the_batch_forward() -> None:
    model = Model(seconds=0.0)

    async def run() -> float:
        b = MicroBatcher(model, max_batch=64, max_wait_ms=5_000)
        started = time.perf_counter()
        slow = asyncio.ensure_future(b.submit("1", budget_ms=60_000))  # would wait 5 s
        await asyncio.sleep(0)
        await b.submit("2", budget_ms=8)  # waits at most 2 ms: both leave together
        await slow
        return time.perf_counter() - started

    assert asyncio.run(run()) < 1.0
    assert model.sizes == [2]


def test_a_failure_reaches_every_waiter_and_the_batcher_recovers() -> None:
    model = Model(fail=True)

    async def run() -> None:
        b = MicroBatcher(model, max_wait_ms=1.0)
        results = await asyncio.gather(
            *(b.submit(str(i), 100) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        model.fail = False
        logits, _ = await b.submit("7", 100)
        assert float(logits[0]) == 7.0

    asyncio.run(run())
    assert model.sizes[-1] == 1
