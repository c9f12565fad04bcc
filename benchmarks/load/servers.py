"""The processes a benchmark run starts on loopback: tiergate, the echo baseline, the
simulated frontier. Each runs in its own spawned process and is stopped after."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tiergate.frontier import SimulatorParams


def _tiergate(
    policy_path: str, model_priority: str | None, model_isolation: str, event_loop: str,
    port_q: Any,
) -> None:  # fmt: skip
    # The front end as `tiergate serve --runtime local` runs it: every tier in
    # this process, the intent model on PyTorch in a child process (or on a thread
    # of this one). (On Ray, point --target at it.)
    import functools

    from tiergate.engine import in_process_runtime
    from tiergate.event_loop import run_event_loop
    from tiergate.policy import load_policy
    from tiergate.server import build_server

    async def main() -> None:
        path = Path(policy_path)
        factory = functools.partial(
            in_process_runtime, model_priority=model_priority, model_isolation=model_isolation
        )
        server = build_server(load_policy(path), path, runtime_factory=factory)
        port_q.put(await server.start("127.0.0.1:0"))
        # Stop cleanly on SIGTERM: the model's worker processes and semaphores are
        # released rather than left to the resource tracker.
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.5)

    try:
        run_event_loop(main(), event_loop)
    except Exception as e:  # the parent waits on the port: tell it why there is none
        port_q.put(f"{type(e).__name__}: {e}")
        raise


def peak_rss_mb(pid: int) -> float | None:
    """The highest resident memory a process has had (Linux: VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def _process(target: Any, args: tuple[Any, ...], what: str, timeout_s: float,
             stats: dict[str, Any] | None = None) -> Iterator[Any]:  # fmt: skip
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, port_q), daemon=True)
    proc.start()
    try:
        try:
            port = port_q.get(timeout=timeout_s)
        except Exception:
            raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s") from None
        if isinstance(port, str):
            raise RuntimeError(f"{what} failed to start: {port}")
        yield port
    finally:
        if stats is not None and proc.pid is not None:
            # The front end's and its model process's (each its own peak: an upper bound)
            from tiergate.engine import descendants

            peaks = [peak_rss_mb(pid) for pid in (proc.pid, *descendants(proc.pid))]
            known = [mb for mb in peaks if mb is not None]
            stats["peak_rss_mb"] = sum(known) if known else None
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        port_q.close()
        port_q.join_thread()


@contextmanager
def tiergate(policy_path: Path, stats: dict[str, Any] | None = None,
             model_priority: str | None = None, event_loop: str = "uvloop",
             model_isolation: str = "process") -> Iterator[str]:  # fmt: skip
    """A tiergate front end on ``policy_path``; yields its address. ``stats`` gets
    the server's peak memory when it stops."""
    args = (str(policy_path), model_priority, model_isolation, event_loop)
    with _process(_tiergate, args, "tiergate", 300, stats) as port:
        yield f"127.0.0.1:{port}"


@contextmanager
def echo() -> Iterator[str]:
    """The bare grpc.aio echo server (same proto): the front end's ceiling."""
    from benchmarks.frontend import _echo_server

    with _process(_echo_server, (), "the echo server", 60) as port:
        yield f"127.0.0.1:{port}"


@contextmanager
def simulator(params: SimulatorParams, gold: dict[str, tuple[str, str]]) -> Iterator[str]:
    """The simulated frontier; yields its base URL (http://127.0.0.1:PORT/v1)."""
    from benchmarks.load.simulator import serve

    with _process(serve, (params, gold), "the frontier simulator", 60) as port:
        yield f"http://127.0.0.1:{port}/v1"
