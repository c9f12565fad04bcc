"""`tiergate bench`: load tests that tell the truth.

Runs one workload against several configurations of tiergate, one after the
other on loopback, and writes report.md, report.json and plots to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.load import configs, loadgen, report, servers, workload
from benchmarks.load.loadgen import Tally
from tiergate.frontier import SimulatorParams

CLINC = Path(__file__).resolve().parents[3] / "shared" / "data" / "clinc150" / "data_full.json"
EXAMPLES = Path(__file__).resolve().parents[2] / "serve" / "tiergate" / "examples"

EPILOG = """\
examples:
  tiergate bench --bundle .tiergate/demo-bundle --data serve/tiergate/examples/intents.jsonl
  tiergate bench --bundle bundles/clinc --data ../shared/data/clinc150/data_full.json \\
      --requests 5000 --rate 100 --repeats 0.2 --paraphrases 0.1 --sweep --ceilings

Configurations (--configs): frontier (every request to the frontier LLM), routing
(the linear tier routes each request to the intent model or the frontier), cascade
(rules, linear, intent model, gate; no cache), hybrid (the cascade with the exact
and semantic caches). Unless --frontier-url is given, the frontier is a SIMULATED
OpenAI-compatible server whose accuracy, latency and prices are the --sim-*
parameters; every report says so.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiergate bench", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--bundle",
        type=Path,
        default=Path(".tiergate/demo-bundle"),
        help="model bundle every configuration serves (default: make serve's)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled data for the workload: its test split is used (default: "
        "CLINC150 from ../shared/data when present, else the shipped examples)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/load"), help="report directory")
    p.add_argument(
        "--configs",
        default=",".join(configs.CONFIGS),
        help=f"comma-separated, from {','.join(configs.CONFIGS)}",
    )
    g = p.add_argument_group("load")
    g.add_argument("--requests", type=int, default=3000, help="requests per configuration")
    g.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="stop sending after this long, per configuration",
    )
    g.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="open loop: Poisson arrivals at this many requests/s (the default)",
    )
    g.add_argument(
        "--closed",
        type=int,
        default=None,
        metavar="N",
        help="closed loop instead: N calls in flight per client process",
    )
    g.add_argument("--clients", type=int, default=2, help="client processes")
    g.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--model-isolation", choices=["process", "thread"], default="process",
        help="where tiergate's intent model runs (as `tiergate serve --model-isolation`): "
        "process (a child process of its own, the default) or thread (in the front end's)",
    )  # fmt: skip
    g.add_argument(
        "--model-priority", choices=["low", "idle"],
        help="the CPU priority of tiergate's model (as `tiergate serve --model-priority`): "
        "low (nice +10) or idle (SCHED_IDLE); default: idle for a model in its own "
        "process, low for one on a thread",
    )  # fmt: skip
    g.add_argument(
        "--event-loop", choices=("uvloop", "asyncio"), default="uvloop",  # event_loop.EVENT_LOOPS
        help="tiergate's event loop (as `tiergate serve --event-loop`): uvloop (the "
        "default) or asyncio's own; the echo baseline stays on asyncio's (bare grpc.aio)",
    )  # fmt: skip
    g.add_argument(
        "--client-loop", choices=("uvloop", "asyncio"), default="uvloop",
        help="the client processes' event loop: uvloop (the default: a client's own time "
        "is part of each latency, and on uvloop it is smaller) or asyncio's own",
    )  # fmt: skip
    w = p.add_argument_group("workload mix")
    w.add_argument("--repeats", type=float, default=0.2, help="share of exact repeats")
    w.add_argument("--paraphrases", type=float, default=0.1, help="share of rewordings")
    w.add_argument(
        "--oos-share",
        type=float,
        default=None,
        help="share of out-of-scope texts among fresh ones (default: as the data)",
    )
    w.add_argument(
        "--risk-share",
        type=float,
        default=0.0,
        help="share of requests carrying the risk tag finance",
    )
    w.add_argument(
        "--tenant",
        action="append",
        default=None,
        metavar="NAME=WEIGHT[:CAP]",
        help="a tenant and its share of traffic, optionally a spend cap in USD "
        "per day (repeatable; default: one tenant, no cap)",
    )
    s = p.add_argument_group("frontier")
    s.add_argument(
        "--frontier-url",
        default=None,
        help="a real OpenAI-compatible endpoint instead of the simulator",
    )
    s.add_argument("--frontier-model", default="simulated")
    s.add_argument("--frontier-key-env", default=None, help="env variable holding its API key")
    d = SimulatorParams()
    s.add_argument("--sim-accuracy", type=float, default=d.accuracy)
    s.add_argument(
        "--sim-latency-ms",
        type=float,
        default=d.latency_median_ms,
        help="median latency of the simulated frontier",
    )
    s.add_argument("--sim-p95-ms", type=float, default=d.latency_p95_ms)
    s.add_argument("--price-in", type=float, default=d.price_in_per_mtok, help="USD / M tokens")
    s.add_argument("--price-out", type=float, default=d.price_out_per_mtok, help="USD / M tokens")
    x = p.add_argument_group("extras")
    x.add_argument(
        "--sweep",
        action="store_true",
        help="rate sweep of the hybrid: highest rate within --p99-budget-ms, the "
        "latency-throughput curve, and a run at half that rate",
    )
    x.add_argument("--sweep-seconds", type=float, default=15.0, help="length of each step")
    x.add_argument(
        "--overload",
        action="store_true",
        help="after the sweep (implies --sweep), offer twice the highest sustained rate for "
        "--overload-seconds: what is refused (RESOURCE_EXHAUSTED), the p99 of what is "
        "admitted, the server's peak memory (its model process's added)",
    )
    x.add_argument("--overload-seconds", type=float, default=60.0)
    x.add_argument(
        "--sweep-max-rps", type=float, default=2000.0, help="the sweep stops below this rate"
    )
    x.add_argument(
        "--p99-budget-ms",
        type=float,
        default=5000.0,
        help="p99 a sustained rate must keep (frontier answers included)",
    )
    x.add_argument(
        "--ceilings",
        action="store_true",
        help="also measure a bare grpc.aio echo server and raw vLLM LLM.classify",
    )
    x.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="load a running server instead (one configuration, 'target'; with --sweep, "
        "the sweep's steps too, all on that one server)",
    )
    x.add_argument("--api-key", default=None, help="with --target: the key to send")
    x.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --target be a non-loopback address (you load someone's server)",
    )
    return p


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def client_loop_note(asked: str, tallies: Iterable[Tally]) -> list[str]:
    """A header line when the client processes did not all run on the loop asked
    (uvloop where it is not installed): the header names the loop asked."""
    ran = sorted({loop for t in tallies for loop in t.loops})
    if not ran or ran == [asked]:
        return []
    return [f"- the client processes ran on {' and '.join(ran)}, not {asked} as asked "
            "(client_loops in report.json counts them per configuration)"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.model_priority is None:
        from tiergate.engine import default_model_priority

        args.model_priority = default_model_priority(args.model_isolation)
    try:
        return _main(args)
    except (ValueError, RuntimeError, FileNotFoundError, TimeoutError) as e:
        print(f"tiergate bench: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in configs.CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration {unknown[0]!r}; use {configs.CONFIGS}")
    if args.target is not None:
        if not args.allow_remote and not _is_loopback(args.target):
            raise ValueError(f"{args.target} is not a loopback address; pass --allow-remote "
                             "if you mean to load it")  # fmt: skip
        names = ["target"]
    elif not (args.bundle / "manifest.json").exists():
        raise FileNotFoundError(f"no bundle at {args.bundle}: run `make serve` once, or "
                                "`tiergate train`, or pass --bundle")  # fmt: skip
    if args.requests < 1 or args.clients < 1 or args.seconds <= 0:
        raise ValueError("--requests, --clients and --seconds must be positive")
    if args.overload:
        if args.overload_seconds <= 0:
            raise ValueError("--overload-seconds must be positive")
        if args.target is not None:
            raise ValueError("--overload reads the memory of a server it starts itself: it "
                             "cannot load a --target (use --sweep)")  # fmt: skip
        args.sweep = True
    rate = None if args.closed else args.rate
    if rate is not None and rate <= 0:
        raise ValueError("--rate must be positive (or use --closed N)")
    data = args.data or (CLINC if CLINC.exists() else EXAMPLES / "intents.jsonl")
    tenants = tuple(workload.TenantSpec.parse(t) for t in (args.tenant or ["default=1"]))
    mix = workload.Mix(args.repeats, args.paraphrases, args.oos_share, args.risk_share, tenants)
    pool, source = workload.load_pool(data, args.seed)
    items = workload.build(pool, mix, args.requests, args.seed)
    # The sweep's steps need more requests than one configuration's run: its own
    # workload (same mix), built now so the simulator knows every text's label.
    sweep_items = (
        workload.build(pool, mix, int(args.sweep_max_rps * args.sweep_seconds), args.seed + 1)
        if args.sweep
        else []
    )
    # Overload offers up to twice the sweep's ceiling for its whole length.
    overload_items = (
        workload.build(pool, mix, int(2 * args.sweep_max_rps * args.overload_seconds),
                       args.seed + 2)
        if args.overload
        else []
    )  # fmt: skip
    keys = {t.name: (args.api_key or t.key) for t in tenants}
    sim = SimulatorParams(args.sim_accuracy, args.sim_latency_ms, args.sim_p95_ms,
                          args.price_in, args.price_out, seed=args.seed)  # fmt: skip
    frontier_note = (
        f"real frontier: {args.frontier_url} (model {args.frontier_model})"
        if args.frontier_url else sim.describe()
    )  # fmt: skip
    load = (f"open loop, Poisson at {rate:g} req/s" if rate is not None
            else f"closed loop, {args.closed} in flight per client")  # fmt: skip
    where = "its own process" if args.model_isolation == "process" else "the front end"
    header = [
        "# tiergate bench",
        "",
        f"- workload: {len(items):,} requests from {source}; {mix.describe()}",
        f"- load: {load}, {args.clients} client processes on {args.client_loop}, at most "
        f"{args.seconds:g} s per configuration; latency from the intended send time",
        f"- frontier: {frontier_note}",
        f"- bundle: {args.bundle}, model in {where} at priority {args.model_priority}, "
        f"event loop "
        f"{args.event_loop}; machine: "
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    for line in header[2:]:
        _log(line[2:])
    args.out.mkdir(parents=True, exist_ok=True)

    def run_config(name: str, address: str) -> Tally:
        _log(f"{name}: {len(items):,} requests")
        return loadgen.drive(address, items, keys, clients=args.clients, rate=rate,
                             concurrency=args.closed or 1, seconds=args.seconds,
                             timeout_s=args.timeout, label=name, seed=args.seed,
                             event_loop=args.client_loop)  # fmt: skip

    tallies: dict[str, Tally] = {}
    failed: dict[str, str] = {}  # configurations that did not finish, and why
    sweep: dict[str, Any] | None = None
    ceilings: dict[str, Any] = {}
    if args.target is not None:
        tallies["target"] = run_config("target", args.target)
        if args.sweep:
            sweep = _sweep(args, sweep_items, keys, None)
    else:
        gold = workload.gold(items + sweep_items + overload_items)
        with servers.simulator(sim, gold) as sim_url:
            url = args.frontier_url or sim_url

            def policy_of(name: str) -> Path:
                doc = configs.policy(name, args.bundle, url, sim, mix, args.frontier_model,
                                     args.frontier_key_env)  # fmt: skip
                return configs.write_policy(args.out / "policies" / f"{name}.yaml", doc)

            for name in names:
                _log(f"{name}: starting tiergate")
                try:
                    server = servers.tiergate(
                        policy_of(name), None, args.model_priority, args.event_loop,
                        args.model_isolation,
                    )  # fmt: skip
                    with server as address:
                        _warm_up(address, keys)
                        tallies[name] = run_config(name, address)
                except (TimeoutError, RuntimeError) as e:  # lose this one, not the run
                    _log(f"{name}: FAILED ({e}); the report goes on without it")
                    failed[name] = str(e)
            if args.sweep:
                sweep = _sweep(args, sweep_items, keys, policy_of("hybrid"))
                if args.overload and sweep["max_sustained_rps"]:
                    sweep["overload"] = _overload(args, overload_items, keys, policy_of("hybrid"),
                                                  2 * sweep["max_sustained_rps"])  # fmt: skip
        if args.ceilings:
            ceilings = _ceilings(args, items)

    baseline = tallies.get("cascade")
    results = {n: report.summarize(t, baseline if n == "hybrid" else None)
               for n, t in tallies.items()}  # fmt: skip
    verdicts = _targets(results, mix, sweep, args.p99_budget_ms)
    header += [f"- FAILED, not in the tables: {n} ({why})" for n, why in failed.items()]
    header += client_loop_note(args.client_loop, tallies.values())
    md = report.markdown(results, header)
    if ceilings:
        md += (
            "\nCeilings (same machine, same run):\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in ceilings.items())
            + "\n"
        )
    if sweep is not None:
        md += _sweep_markdown(sweep, args.p99_budget_ms)
    if verdicts:
        md += "\nTargets:\n\n| target | measured | met |\n|---|---|---|\n"
        md += "".join(f"| {v['target']} | {v['measured']} | {'yes' if v['met'] else 'NO'} |\n"
                      for v in verdicts)  # fmt: skip
    (args.out / "report.md").write_text(md, encoding="utf-8")
    doc = {
        "header": header, "simulated_frontier": args.frontier_url is None,
        "simulator": sim.__dict__ if args.frontier_url is None else None,
        "mix": mix.as_dict(), "results": results, "ceilings": ceilings, "sweep": sweep,
        "targets": verdicts, "failed": failed,
    }  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    report.plot_latency_cdf(tallies, args.out / "latency_cdf.png")
    report.plot_tier_mix(results, args.out / "tier_mix.png")
    if sweep is not None:
        report.plot_sweep(sweep["points"], args.p99_budget_ms, args.out / "sweep.png")
    print(md)
    _log(f"report: {args.out}/report.md, report.json, latency_cdf.png, tier_mix.png"
         + (", sweep.png" if sweep is not None else ""))  # fmt: skip
    return 1 if failed else 0


def _warm_up(address: str, keys: dict[str, str]) -> None:
    """A few requests outside the workload: the model's first batch pays for loading."""
    import grpc

    from tiergate.client import Client

    with Client(address, api_key=next(iter(keys.values()))) as c:
        for i in range(3):
            for attempt in range(20):
                try:
                    c.classify(f"warm-up request number {i}", timeout=120)
                    break
                except grpc.RpcError as e:  # still loading: honour the hint, try again
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 19:
                        raise
                    time.sleep(0.2)


def _sweep(args: argparse.Namespace, items: list[workload.Item], keys: dict[str, str],
           policy: Path | None) -> dict[str, Any]:  # fmt: skip
    """Open-loop steps at rising rates on a fresh hybrid server each (same cache state),
    or (``policy`` None) all on the running --target: the highest rate that keeps up
    (every request answered, p99 within the budget, < 1% errors), then a run at half
    of it."""
    points: list[dict[str, Any]] = []
    sent = 0  # on the target: each step sends texts the steps before did not

    def step(rate: float) -> dict[str, Any]:
        nonlocal sent
        n = int(rate * args.sweep_seconds)
        if policy is None:
            server: Any = contextlib.nullcontext(args.target)
            batch = [items[(sent + i) % len(items)] for i in range(n)]
            sent += n
        else:
            server = servers.tiergate(
                policy, None, args.model_priority, args.event_loop, args.model_isolation
            )
            batch = items[:n]
        with server as address:
            _warm_up(address, keys)
            t = loadgen.drive(address, batch, keys, clients=args.clients, rate=rate,
                              concurrency=1, seconds=args.sweep_seconds, timeout_s=args.timeout,
                              label=f"sweep {rate:,.0f} req/s", seed=args.seed,
                              event_loop=args.client_loop)  # fmt: skip
        r = report.summarize(t)
        errors = sum(r["errors"].values())
        point = {
            "offered_rps": rate, "achieved_rps": r["throughput_rps"],
            "latency_ms": r["latency_ms"], "cheap_tier_latency_ms": r["cheap_tier_latency_ms"],
            "errors": errors,
        }  # fmt: skip
        # Open loop counts latency from the intended send: a server falling behind
        # shows as a p99 that grows without bound, so the budget is the test.
        point["sustained"] = (
            # A client that failed reports CLIENT_ERROR (one that died raises).
            not any(code.startswith("CLIENT_ERROR") for code in r["errors"])
            and r["latency_ms"]["p99"] <= args.p99_budget_ms
            and errors <= 0.01 * max(r["requests"], 1)
        )
        _log(f"sweep: {rate:,.0f} req/s offered -> {r['throughput_rps']:,.0f} answered/s, "
             f"p99 {r['latency_ms']['p99']:.1f} ms: "
             f"{'sustained' if point['sustained'] else 'NOT sustained'}")  # fmt: skip
        return point

    start = min(max(args.rate / 2, 10.0), args.sweep_max_rps)
    best = search_rates(step, points, start, args.sweep_max_rps)
    half = step(best / 2) if best else None
    echo_at_half = None
    if best:
        # The floor this machine and this client set: a bare grpc.aio echo server
        # under the same open-loop load, measured the same way.
        with servers.echo() as address:
            n = int(best / 2 * args.sweep_seconds)
            t = loadgen.drive(address, items[:n], {k: "" for k in keys}, clients=args.clients,
                              rate=best / 2, concurrency=1, seconds=args.sweep_seconds,
                              label="echo at half rate", seed=args.seed,
                              event_loop=args.client_loop)  # fmt: skip
        echo_at_half = report.summarize(t)["latency_ms"]
    points.sort(key=lambda p: p["offered_rps"])
    return {
        "points": points, "max_sustained_rps": best, "half_rate": half,
        "echo_at_half_rate_ms": echo_at_half, "target": args.target if policy is None else None,
    }  # fmt: skip


def search_rates(step: Any, points: list[dict[str, Any]], start: float, cap: float,
                 max_steps: int = 10) -> float:  # fmt: skip
    """The highest rate ``step`` finds sustained (0: none), its points added to
    ``points``: down by halves from ``start`` until one is sustained (a slow machine),
    then up by doubling, at most to ``cap``, and one bisection step between the best
    sustained rate and the lowest one that was not."""
    best, failed = 0.0, float("inf")
    rate = start
    while len(points) < max_steps:
        points.append(step(rate))
        if points[-1]["sustained"]:
            best = rate
            break
        failed = rate
        if rate / 2 < 1.0:
            return 0.0
        rate /= 2
    while best and len(points) < max_steps and 2 * best < failed:
        if 2 * best > cap:
            _log(f"sweep: next step would pass --sweep-max-rps {cap:g}; stopping")
            break
        points.append(step(2 * best))
        if not points[-1]["sustained"]:
            failed = 2 * best
            break
        best *= 2
    if best and failed < float("inf") and len(points) < max_steps:
        mid = (best + failed) / 2
        points.append(step(mid))
        if points[-1]["sustained"]:
            best = mid
    return best


def _overload(args: argparse.Namespace, items: list[workload.Item], keys: dict[str, str],
              policy: Path, rate: float) -> dict[str, Any]:  # fmt: skip
    """The hybrid offered ``rate`` (twice the sustained maximum) for --overload-seconds."""
    stats: dict[str, Any] = {}
    n = int(rate * args.overload_seconds)
    with servers.tiergate(
        policy, stats, args.model_priority, args.event_loop, args.model_isolation
    ) as address:
        _warm_up(address, keys)
        t = loadgen.drive(address, items[:n], keys, clients=args.clients, rate=rate,
                          concurrency=1, seconds=args.overload_seconds, timeout_s=args.timeout,
                          label=f"overload {rate:,.0f} req/s", seed=args.seed,
                          event_loop=args.client_loop)  # fmt: skip
    r = report.summarize(t)
    refused = r["errors"].get("RESOURCE_EXHAUSTED", 0)
    _log(f"overload: {rate:,.0f} req/s offered for {args.overload_seconds:g} s -> "
         f"{r['answered']:,} answered, {refused:,} refused, p99 {r['latency_ms']['p99']:.1f} ms, "
         f"server peak RSS {stats.get('peak_rss_mb') or 0:,.0f} MB")  # fmt: skip
    return {
        "offered_rps": rate, "seconds": args.overload_seconds, "requests": r["requests"],
        "answered": r["answered"], "refused": refused, "errors": r["errors"],
        "latency_ms": r["latency_ms"], "cheap_tier_latency_ms": r["cheap_tier_latency_ms"],
        "peak_rss_mb": stats.get("peak_rss_mb"),
    }  # fmt: skip


def _sweep_markdown(sweep: dict[str, Any], budget_ms: float) -> str:
    what = (
        f"{sweep['target']}, one server for every step: its caches keep what earlier "
        "steps taught them"
        if sweep.get("target")
        else "hybrid, a fresh server per step"
    )
    lines = ["", f"Rate sweep ({what}; open loop; sustained: p99 <= {budget_ms:g} ms, "
             "< 1% errors):", "",
             "| offered req/s | answered req/s (incl. drain) | p50 ms | p99 ms | cheap-tier p99 ms "
             "| sustained |",
             "|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for p in sweep["points"]:
        lines.append(f"| {p['offered_rps']:,.0f} | {p['achieved_rps']:,.0f} "
                     f"| {p['latency_ms']['p50']:.2f} | {p['latency_ms']['p99']:.2f} "
                     f"| {p['cheap_tier_latency_ms']['p99']:.2f} "
                     f"| {'yes' if p['sustained'] else 'no'} |")  # fmt: skip
    lines.append(f"\nHighest sustained rate: {sweep['max_sustained_rps']:,.0f} req/s.")
    o = sweep.get("overload")
    if o:
        rss = f"{o['peak_rss_mb']:,.0f} MB" if o["peak_rss_mb"] else "unknown"
        others = {k: v for k, v in o["errors"].items() if k != "RESOURCE_EXHAUSTED"}
        lines.append(
            f"\nOverload: {o['offered_rps']:,.0f} req/s offered (twice that) for "
            f"{o['seconds']:g} s: {o['answered']:,} of {o['requests']:,} answered, "
            f"{o['refused']:,} refused at once with RESOURCE_EXHAUSTED"
            + (f", other errors {others}" if others else "")
            + f"; admitted p50 {o['latency_ms']['p50']:.1f} ms, p99 {o['latency_ms']['p99']:.1f} "
            f"ms, p99.9 {o['latency_ms']['p99.9']:.1f} ms; cheap-tier p99 "
            f"{o['cheap_tier_latency_ms']['p99']:.1f} ms; server peak RSS {rss}."
        )
    return "\n".join(lines) + "\n"


def _ceilings(args: argparse.Namespace, items: list[workload.Item]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _log("ceiling: bare grpc.aio echo server, closed loop")
    with servers.echo() as address:
        t = loadgen.drive(address, items, {n: "" for n in {i.tenant for i in items}},
                          clients=args.clients, rate=None, concurrency=32,
                          seconds=min(args.seconds, 10.0), label="echo",
                          event_loop=args.client_loop)  # fmt: skip
    out["grpc.aio echo, closed loop"] = f"{t.ok / max(t.elapsed_s, 1e-9):,.0f} req/s"
    intent = args.bundle / "intent"
    if importlib.util.find_spec("vllm") is None:
        out["raw vLLM LLM.classify"] = "not measured: vLLM is not installed"
    elif not intent.exists():
        out["raw vLLM LLM.classify"] = "not measured: the bundle has no intent model"
    else:
        from benchmarks.model_tier import raw_vllm

        _log("ceiling: raw vLLM LLM.classify on the bundle's intent model")
        texts = [i.text for i in items[:2000]]
        r = raw_vllm(intent, texts, 32)
        out["raw vLLM LLM.classify"] = (f"{r['texts_per_s']:,.0f} texts/s; batch of 32: "
                                        f"p50 {r['batch_ms']['p50']} ms")  # fmt: skip
    return out


def _targets(results: dict[str, dict[str, Any]], mix: workload.Mix,
             sweep: dict[str, Any] | None, budget_ms: float) -> list[dict[str, Any]]:  # fmt: skip
    """The issue's targets, judged on this run's figures."""
    out = []
    hybrid, frontier = results.get("hybrid"), results.get("frontier")
    if hybrid and frontier and frontier["cost_per_1k_usd"] > 0:
        cut = 1 - hybrid["cost_per_1k_usd"] / frontier["cost_per_1k_usd"]
        delta = 100 * (hybrid["accuracy"] - frontier["accuracy"])
        out.append(
            {
                "target": "hybrid cost per 1k at least 85% below frontier-only",
                "measured": f"{cut:.1%} below",
                "met": cut >= 0.85,
            }
        )
        out.append({"target": "hybrid accuracy at most 0.5 points below frontier-only",
                    "measured": f"{delta:+.2f} points", "met": delta >= -0.5})  # fmt: skip
    if hybrid and mix.repeats + mix.paraphrases >= 0.3 - 1e-9:
        rate = hybrid["false_hit_rate"]  # None: no cache answer, nothing to judge
        out.append({"target": "cache false hits under 0.5% (cache answers whose label is not "
                              "the dataset's), at 30% repeats + paraphrases",
                    "measured": "no cache answers" if rate is None else f"{rate:.2%}",
                    "met": rate is not None and rate < 0.005})  # fmt: skip
        changed = hybrid["cache_changed_answers"]
        if changed is not None:
            # A cache repeating a wrong answer is not the cache's mistake: this row
            # counts only answers the cache changed against the uncached cascade.
            out.append({"target": "cache answers differing from the uncached cascade's, "
                                  "under 0.5%",
                        "measured": f"{changed:.2%}", "met": changed < 0.005})  # fmt: skip
    if sweep is not None and sweep.get("overload"):
        o = sweep["overload"]
        others = sum(v for k, v in o["errors"].items() if k != "RESOURCE_EXHAUSTED")
        out.append({"target": f"at twice the sustained max: the excess refused "
                              f"(RESOURCE_EXHAUSTED), admitted p99 within {budget_ms:g} ms, "
                              "no other errors",
                    "measured": f"{o['refused']:,} refused, p99 {o['latency_ms']['p99']:.0f} ms, "
                                f"{others} other errors",
                    "met": o["latency_ms"]["p99"] <= budget_ms and others == 0})  # fmt: skip
    if sweep is not None and sweep.get("half_rate"):
        half = sweep["half_rate"]
        p99 = half["cheap_tier_latency_ms"]["p99"]
        echo = sweep.get("echo_at_half_rate_ms")
        floor = f"; bare echo server, same load: p99 {echo['p99']:.2f} ms" if echo else ""
        out.append({"target": "cheap-tier p99 under 2 ms end to end at half the sustained max",
                    "measured": f"{p99:.2f} ms at {half['offered_rps']:,.0f} req/s{floor}",
                    "met": p99 < 2.0})  # fmt: skip
    return out
