"""Admission control: refuse at the door, at once, what cannot be served in time.

Two signals, both cheap to read on every request:

- requests in flight (admitted, not yet answered): a hard cap that bounds the
  memory a flood can take;
- event-loop lag: how late a short timer fires. The front end is one event
  loop, so when its queue of ready work grows, every request waits behind it,
  cheap or not. While the lag is over its limit, new requests are refused with
  RESOURCE_EXHAUSTED and a retry hint, and the admitted ones keep their
  latency instead of all of them missing their deadlines together.

The lag is a moving average over the last few ticks, each counting for at most
1.5 times the limit: a lone stall (a model's first batch, a garbage collection)
leaves the door open; a backlog that persists, the mark of more load than the
server can take, shuts it until the loop catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from tiergate.engine import RequestError

# Coarse enough to cost nothing measurable (50 wake-ups/s), fine enough for a
# limit of tens of milliseconds.
TICK_S = 0.02


@dataclass
class Admission:
    max_inflight: int = 4096
    max_lag_ms: float = 50.0  # 0 turns lag shedding off
    inflight: int = 0
    lag_ms: float = 0.0  # smoothed event-loop lag
    refused: dict[str, int] = field(default_factory=lambda: {"inflight": 0, "lag": 0})
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch_lag())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(TICK_S)
            late_ms = max(0.0, (loop.time() - t0 - TICK_S) * 1000)
            # A tick counts for at most 1.5 times the limit: one long stall alone
            # cannot shut the door, two late ticks in a row do.
            if self.max_lag_ms > 0:
                late_ms = min(late_ms, 1.5 * self.max_lag_ms)
            self.lag_ms = 0.5 * self.lag_ms + 0.5 * late_ms

    def admit(self, n: int = 1) -> None:
        """Takes ``n`` slots, or raises RESOURCE_EXHAUSTED with a retry hint."""
        if self.inflight + n > self.max_inflight:
            self.refused["inflight"] += 1
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"overloaded: {self.inflight} requests in flight (limits.max_inflight "
                f"{self.max_inflight}); retry shortly",
                retry_after_s=0.1,
            )
        if self.max_lag_ms > 0 and self.lag_ms > self.max_lag_ms:
            self.refused["lag"] += 1
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"overloaded: the server runs {self.lag_ms:.0f} ms behind "
                f"(limits.max_loop_lag_ms {self.max_lag_ms:g}); retry shortly",
                retry_after_s=max(0.05, 2 * self.lag_ms / 1000),
            )
        self.inflight += n

    def release(self, n: int = 1) -> None:
        self.inflight -= n
