"""The event loop a front end (or a benchmark's client) runs on.

Its own module, light to import: the benchmarks' client processes need it and
nothing else of the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from tiergate._core import ConfigError

log = logging.getLogger("tiergate.server")
T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")


def run_event_loop(main: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    """Runs ``main`` to completion on the chosen event loop.

    uvloop (libuv under asyncio's API; grpc.aio runs on any asyncio loop) takes
    about a tenth less CPU per cheap-tier request than asyncio's own loop: the front
    end is one loop, so that is a tenth more requests per second. Where it is not
    installed (Windows), asyncio's loop serves, with a warning.
    """
    if loop not in EVENT_LOOPS:
        raise ConfigError(f"event loop {loop!r} is not one of {EVENT_LOOPS}")
    factory = None
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: serving on asyncio's event loop")
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The running loop's kind, "uvloop" or "asyncio": the one that runs, which is not
    the one asked for where uvloop is missing."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
