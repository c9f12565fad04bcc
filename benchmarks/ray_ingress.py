"""How requests should enter tiergate on Ray: three ingress paths, same engine, same texts.

    python -m benchmarks.ray_ingress [--bundle DIR] [--requests 3000] [--clients 4]

1. ours:    tiergate's grpc.aio server started inside a Serve replica (the
            Frontend deployment): the client talks to it directly.
2. direct:  Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the
            replica of the ingress deployment gets its own gRPC port from Serve,
            which calls the deployment's ``Classify(request)`` method.
3. proxy:   Ray Serve's gRPC proxy (the default ingress), to the same deployment.

Every path runs the same cascade (the bundle's cheap tiers; texts they decide)
in a Serve replica; only how the request gets there differs. Reported per
path: request latency p50/p99 from a closed-loop client and requests/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TEXTS = [
    "I want my money back", "please reset my password", "hello there", "where is my package",
    "cancel my subscription", "I forgot my password", "hi!", "track my order please",
]  # fmt: skip
SERVICER = "tiergate.v1.classifier_pb2_grpc.add_ClassifierServicer_to_server"


def linear_bundle(out: Path) -> Path:
    """A rules + linear bundle on the shipped examples (seconds): no model, cheap tiers only."""
    from tiergate.data import load_splits
    from tiergate.train import TrainOptions, train_bundle

    examples = Path(__file__).resolve().parents[1] / "serve" / "tiergate" / "examples"
    options = TrainOptions(rules=examples / "intents_rules.yaml", intent=None, progress=False)
    train_bundle(load_splits(examples / "intents.jsonl", seed=0), out, options)
    return out


def load(call: Any, requests: int, clients: int) -> dict[str, float]:
    lat: list[float] = []
    lock = threading.Lock()

    counter = iter(range(10**9))

    def run(n: int) -> None:
        mine = []
        for _ in range(n):
            i = next(counter)  # unique texts: no exact-cache hits on any path
            t = time.perf_counter()
            call(f"{TEXTS[i % len(TEXTS)]} {i}")
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    run(50)  # warm-up
    lat.clear()
    threads = [threading.Thread(target=run, args=(requests // clients,)) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    a = np.asarray(lat) * 1000
    return {
        "rps": round(len(lat) / took, 1),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
    }


def stub(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    import grpc

    from tiergate.v1 import classifier_pb2 as pb
    from tiergate.v1 import classifier_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    s = pb_grpc.ClassifierStub(channel)

    def call(text: str) -> Any:
        return s.Classify(pb.ClassifyRequest(text=text), metadata=metadata, timeout=10)

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="a bundle without an intent model "
                    "(default: one trained on the shipped examples)")  # fmt: skip
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # Read by Serve's controller and replicas when they start: set before Ray does.
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    import tempfile

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from tiergate.ray_app import build_app
    from tiergate.server import to_proto

    tmp = tempfile.mkdtemp(prefix="tiergate-ingress-")
    bundle = str((args.bundle or linear_bundle(Path(tmp) / "bundle")).resolve())

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1000)
    class Ingress:
        """The cascade behind Serve's own ingress (direct or proxy)."""

        def __init__(self) -> None:
            from tiergate.bundle import load_bundle
            from tiergate.engine import Engine, TaskRuntime
            from tiergate.policy import default_policy

            policy = default_policy(Path(bundle))
            task = next(iter(policy.tasks.values()))
            runtime = TaskRuntime(task, load_bundle(task.bundle), None)
            self.engine = Engine(policy, {task.name: runtime})

        async def Classify(self, request: Any) -> Any:
            from tiergate.engine import Request
            from tiergate.server import ANONYMOUS

            return to_proto(await self.engine.classify(Request(request.text, ANONYMOUS)))

    results: dict[str, Any] = {"bundle": bundle, "requests": args.requests,
                               "clients": args.clients}  # fmt: skip
    # "local": a Ray of our own, never a cluster left in /tmp/ray/ray_current_cluster.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            grpc_options=gRPCOptions(port=9011, grpc_servicer_functions=[SERVICER]),
            logging_config={"log_level": "WARNING"},
        )
        address = "127.0.0.1:50094"
        serve.run(build_app({"bundle": bundle, "address": address}), name="ours",
                  route_prefix=None)  # fmt: skip
        results["ours (grpc.aio in a replica)"] = load(stub(address), args.requests, args.clients)
        print(f"[ray_ingress] ours: {results['ours (grpc.aio in a replica)']}", file=sys.stderr)
        serve.delete("ours")
        serve.run(Ingress.bind(), name="ingress", route_prefix="/ingress")
        from ray.serve._private.common import RequestProtocol
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        groups = ray.get(controller.get_target_groups.remote("ingress"))
        direct = [
            f"{t.ip}:{t.port}" for g in groups if g.protocol == RequestProtocol.GRPC
            for t in g.targets
        ]  # fmt: skip
        results["direct_targets"] = direct
        app = (("application", "ingress"),)
        results["serve direct ingress"] = load(stub(direct[0], app), args.requests, args.clients)
        print(f"[ray_ingress] direct: {results['serve direct ingress']}", file=sys.stderr)
        results["serve grpc proxy"] = load(stub("127.0.0.1:9011", app), args.requests, args.clients)
        print(f"[ray_ingress] proxy: {results['serve grpc proxy']}", file=sys.stderr)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
