"""The gRPC front end next to a bare grpc.aio echo server, same proto, same load.

    python -m benchmarks.frontend [--bundle DIR] [--seconds 5] [--clients 2]

Both servers run in their own process; load comes from separate client
processes (closed loop, many calls in flight) so the client is not the
bottleneck on its own; they run on uvloop, as `tiergate bench`'s clients do
(4 runs each of `--rounds 5 --seconds 3`: ratios 0.83-0.88, round ratios
0.73-0.99, against 0.76-0.88 and 0.66-1.16 on asyncio's loop: steadier rounds, the
same ratio within the noise). Reported:
requests per second of each server at full load (and the ratio), then the
front end at half of its own maximum rate (open loop) with the server-side p99
from its latency histogram: the time from the servicer handing the request to
the engine until the decision (gRPC transport and (de)serialisation excluded),
as the upper bound of its bucket.
Texts are ones the cheap tiers decide, so no model runs: by default 8 texts
over and over; with --texts unique every text is new. The rules or linear tier
decides each of them every time (the caches keep only model and frontier answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

TEXTS = [
    "I want my money back", "please reset my password", "hello there", "where is my package",
    "cancel my subscription", "I forgot my password", "hi!", "track my order please",
]  # fmt: skip


def _echo_server(port_q: Any, full_size: bool = False, loop: str = "asyncio") -> None:
    import grpc

    from tiergate.event_loop import run_event_loop
    from tiergate.v1 import classifier_pb2 as pb
    from tiergate.v1 import classifier_pb2_grpc as pb_grpc

    # --echo-size full: a canned answer as big as tiergate's (path of three tiers, ids),
    # to tell the cost of the cascade from the cost of a richer message.
    canned = pb.ClassifyResponse(
        label="track_order", confidence=0.97, tier="linear", policy_version="default",
        request_id="0" * 32,
        path=[pb.TierStep(tier="exact_cache", note="miss"),
              pb.TierStep(tier="rules", confidence=0.0, threshold=0.9, micros=3),
              pb.TierStep(tier="linear", label="track_order", confidence=0.97,
                          threshold=0.95, accepted=True, micros=9)],
    )  # fmt: skip

    class Echo(pb_grpc.ClassifierServicer):  # type: ignore[misc]
        async def Classify(self, request: Any, context: Any) -> Any:
            if full_size:
                return canned
            return pb.ClassifyResponse(label=request.text[:8], tier="echo")

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ClassifierServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    run_event_loop(main(), loop)


def _tiergate_server(
    bundle: str, port_q: Any, stats_q: Any, cmd_q: Any, model_in_process: bool,
    loop: str = "uvloop",
) -> None:  # fmt: skip
    from tiergate.bundle import load_bundle
    from tiergate.engine import TaskRuntime, in_process_runtime
    from tiergate.event_loop import run_event_loop
    from tiergate.policy import Task, default_policy
    from tiergate.server import build_server

    def remote_model(task: Task) -> TaskRuntime:
        # The front end as it runs on Ray: the model lives in another process.
        return TaskRuntime(task, load_bundle(task.bundle), None)

    factory = in_process_runtime if model_in_process else remote_model

    async def main() -> None:
        server = build_server(default_policy(Path(bundle)), runtime_factory=factory)
        metrics = server.metrics
        port = await server.start("127.0.0.1:0")
        port_q.put(port)
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, cmd_q.get)
            if cmd == "stop":
                break
            stats_q.put(_histogram(metrics))

    run_event_loop(main(), loop)


def _histogram(metrics: Any) -> dict[str, float]:
    return {str(k): v for k, v in metrics.decisions.latency_buckets().items()}


def _quantile(buckets: dict[str, float], q: float) -> float:
    """Upper bound of the histogram bucket holding quantile q (seconds)."""
    items = sorted((float(k), v) for k, v in buckets.items())
    total = items[-1][1] if items else 0
    for le, count in items:
        if total and count >= q * total:
            return le
    return float("inf")


def _text(n: int, unique: bool) -> str:
    # unique: a text no cache has seen, so the rules and linear tiers run on every request.
    t = TEXTS[n % len(TEXTS)]
    return f"{t} {os.getpid()}-{n}" if unique else t


def _client(
    port: int, seconds: float, concurrency: int, rate: float | None, unique: bool, loop: str,
    out_q: Any,
) -> None:  # fmt: skip
    """Process entry point: puts (answered, failed, seconds, loop) on ``out_q``, or the
    error that stopped it: the parent must hear about it, not wait for a result."""
    try:
        _run_client(port, seconds, concurrency, rate, unique, loop, out_q)
    except Exception as e:
        out_q.put(f"client {os.getpid()} failed: {type(e).__name__}: {e}")


def _run_client(
    port: int, seconds: float, concurrency: int, rate: float | None, unique: bool, loop: str,
    out_q: Any,
) -> None:  # fmt: skip
    import grpc

    from tiergate.event_loop import run_event_loop, running_loop_name
    from tiergate.v1 import classifier_pb2 as pb
    from tiergate.v1 import classifier_pb2_grpc as pb_grpc

    async def main() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ClassifierStub(channel)
        done = 0
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal done, errors
            n = i * 1_000_000  # each worker its own texts
            while time.perf_counter() < stop_at:
                try:
                    await stub.Classify(pb.ClassifyRequest(text=_text(n, unique)), timeout=5)
                    done += 1
                except grpc.RpcError:
                    errors += 1
                n += 1

        async def paced() -> None:
            # Open loop: sends on a fixed schedule whatever the answers do.
            interval = 1.0 / rate  # type: ignore[operator]
            next_at = time.perf_counter()
            pending: set[asyncio.Task[Any]] = set()

            def settled(t: asyncio.Task[Any]) -> None:
                nonlocal done, errors
                pending.discard(t)
                if t.cancelled() or t.exception() is not None:
                    errors += 1
                else:
                    done += 1

            n = 0
            while time.perf_counter() < stop_at:
                next_at += interval
                t = asyncio.ensure_future(
                    stub.Classify(pb.ClassifyRequest(text=_text(n, unique)), timeout=5)
                )
                pending.add(t)
                t.add_done_callback(settled)
                n += 1
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*pending, return_exceptions=True)

        await stub.Classify(pb.ClassifyRequest(text="warm up"), timeout=10)
        started = time.perf_counter()
        if rate is None:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        else:
            await paced()
        out_q.put((done, errors, time.perf_counter() - started, running_loop_name()))
        await channel.close()

    run_event_loop(main(), loop)


def drive(
    port: int,
    seconds: float,
    clients: int,
    concurrency: int,
    rate: float | None = None,
    unique: bool = False,
    loop: str = "uvloop",
    loops_seen: Counter[str] | None = None,
) -> float:
    """Requests per second answered; ``loops_seen`` counts the client processes per
    event loop they ran on."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    per_client_rate = None if rate is None else rate / clients
    procs = [
        ctx.Process(
            target=_client, args=(port, seconds, concurrency, per_client_rate, unique, loop, q)
        )
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise RuntimeError("; ".join(failed))
    if loops_seen is not None:
        loops_seen.update(r[3] for r in results)
    return sum(done / elapsed for done, _, elapsed, _ in results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", default=".tiergate/demo-bundle", help="bundle to serve (rules + linear suffice)"
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight per client")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per server")
    parser.add_argument(
        "--model",
        choices=["remote", "in-process"],
        default="remote",
        help="where the intent model lives: remote (as on Ray, the default: not in the front "
        "end's process) or in-process (tiergate serve --runtime local)",
    )
    parser.add_argument(
        "--echo-size",
        choices=["bare", "full"],
        default="bare",
        help="the echo's answer: bare (the target's baseline) or full (as big as tiergate's, "
        "to isolate the cost of the cascade itself)",
    )
    parser.add_argument(
        "--texts",
        choices=["repeated", "unique"],
        default="repeated",
        help="repeated (default): 8 texts over and over; unique: every text new. Either way "
        "the rules or linear tier decides each (their answers are not cached)",
    )
    parser.add_argument(
        "--event-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="tiergate's event loop (uvloop, the default of tiergate serve, or asyncio's own)",
    )
    parser.add_argument(
        "--echo-loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the echo's event loop: asyncio (the bare grpc.aio server, the target's "
        "baseline) or uvloop (the same loop as tiergate's, for reference)",
    )
    parser.add_argument(
        "--client-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the client processes' event loop: uvloop (the default, as `tiergate bench`'s "
        "clients: less of the 2 cores goes to the clients) or asyncio's own",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    unique = args.texts == "unique"
    if not (Path(args.bundle) / "manifest.json").exists():
        print(
            f"no bundle at {args.bundle}: run `make serve` once or pass --bundle", file=sys.stderr
        )
        return 2
    ctx = mp.get_context("spawn")
    port_q, stats_q, cmd_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    echo = ctx.Process(
        target=_echo_server, args=(port_q, args.echo_size == "full", args.echo_loop), daemon=True
    )
    echo.start()
    echo_port = port_q.get(timeout=60)
    tg = ctx.Process(
        target=_tiergate_server,
        args=(args.bundle, port_q, stats_q, cmd_q, args.model == "in-process", args.event_loop),
        daemon=True,
    )
    tg.start()
    tg_port = port_q.get(timeout=120)

    print(f"closed loop: {args.clients} client processes x {args.concurrency} calls in flight, "
          f"{args.seconds:.0f} s per run, {args.rounds} rounds, {args.texts} texts; event loops: "
          f"tiergate {args.event_loop}, echo {args.echo_loop}, clients {args.client_loop}",
          file=sys.stderr)  # fmt: skip
    # Alternate the two servers round by round and compare medians: this
    # machine is shared, and a single pair of runs swings by +/-15%.
    echo_runs, tg_runs = [], []
    load = (args.seconds, args.clients, args.concurrency)
    loops: Counter[str] = Counter()
    for round_ in range(1, args.rounds + 1):
        echo_runs.append(drive(echo_port, *load, None, unique, args.client_loop, loops))
        tg_runs.append(drive(tg_port, *load, None, unique, args.client_loop, loops))
        print(f"  round {round_}: echo {echo_runs[-1]:,.0f} req/s, tiergate {tg_runs[-1]:,.0f} "
              f"req/s ({tg_runs[-1] / echo_runs[-1]:.2f})", file=sys.stderr)  # fmt: skip
    echo_rps, tg_rps = statistics.median(echo_runs), statistics.median(tg_runs)
    # Each round's own ratio shows the noise the medians smooth out.
    ratios = [t / e for t, e in zip(tg_runs, echo_runs, strict=True)]
    print(f"  ratio per round: median {statistics.median(ratios):.2f}, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}", file=sys.stderr)  # fmt: skip
    cmd_q.put("stats")
    before = stats_q.get(timeout=30)  # the open-loop run is measured as a difference
    half = tg_rps / 2
    print(f"open loop at {half:,.0f} req/s (half of tiergate's maximum)", file=sys.stderr)
    achieved = drive(tg_port, *load, half, unique, args.client_loop, loops)
    cmd_q.put("stats")
    after = stats_q.get(timeout=30)
    buckets = {k: v - before.get(k, 0.0) for k, v in after.items()}
    cmd_q.put("stop")
    echo.terminate()
    p50, p99 = _quantile(buckets, 0.5), _quantile(buckets, 0.99)
    result = {
        "echo_rps": echo_rps,
        "echo_runs": echo_runs,
        "tiergate_runs": tg_runs,
        "tiergate_rps": tg_rps,
        "ratio": tg_rps / echo_rps,
        "round_ratios": ratios,
        "model": args.model,
        "event_loop": args.event_loop,
        "echo_loop": args.echo_loop,
        "client_loops": dict(loops),  # client processes per loop they ran on (as bench's)
        "texts": args.texts,
        "target_ratio": 0.8,
        "half_load_rps": achieved,
        "server_p50_s_upper_bound": p50,
        "server_p99_s_upper_bound": p99,
        "target_p99_s": 0.001,
        "cpus": os.cpu_count(),
    }
    echo_name = "bare grpc.aio echo" + (" (uvloop)" if args.echo_loop == "uvloop" else "")
    print(f"| case | tiergate ({args.event_loop}) | {echo_name} | ratio | target | met |")
    print("|---|---:|---:|---:|---|---|")
    rps_met = "yes" if tg_rps >= 0.8 * echo_rps else "NO"
    p99_met = "yes" if p99 <= 0.001 else "NO"
    print(f"| requests/s, cheap tiers, closed loop (median of {args.rounds}) | {tg_rps:,.0f} "
          f"| {echo_rps:,.0f} | {tg_rps / echo_rps:.2f} | >= 0.80 | {rps_met} |")  # fmt: skip
    print(f"| server p99 (engine time) at {achieved:,.0f} req/s (half max) "
          f"| <= {p99 * 1e3:.2f} ms | - | - | < 1 ms | {p99_met} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
