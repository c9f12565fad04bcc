"""The intent-model tier on Ray Serve next to raw vLLM `LLM.classify`, same model, same texts.

    python -m benchmarks.model_tier [--bundle DIR] [--texts 2000] [--batch 32]

Phases, one after the other in one run (one engine alive at a time):

1. raw:     vLLM's offline `LLM.classify` in its own process: all texts in one
            call (throughput), then batch by batch (latency per batch).
2. serve:   the IntentModel deployment (vLLM async engine, no embedder) called
            through a DeploymentHandle: batch by batch (latency), then four
            batches in flight (throughput). The difference to (1) is the
            serving overhead: Ray hop, serialisation, async engine.
3. +embed:  the same with the semantic cache's embedder (what the cache costs).
4. grpc:    the whole stack, unique texts over gRPC with the intent model
            deciding every request: request latency and throughput as a
            client sees them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RAW_SCRIPT = """
import json, sys, time
def main():
    from vllm import LLM
    path, texts, batch = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
    llm = LLM(model=path, runner="pooling", gpu_memory_utilization=0.05, max_model_len=128,
              kv_cache_memory_bytes=64 << 20, enforce_eager=True)
    llm.classify(texts[:64], use_tqdm=False)  # warm-up
    t = time.perf_counter(); llm.classify(texts, use_tqdm=False); total = time.perf_counter() - t
    lat = []
    for i in range(0, len(texts), batch):
        t = time.perf_counter(); llm.classify(texts[i:i + batch], use_tqdm=False)
        lat.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"throughput": len(texts) / total, "batch_s": lat}), flush=True)
    del llm
    import gc; gc.collect()
if __name__ == "__main__":
    main()
"""

WORDS = ["please", "now", "today", "again", "quickly", "thanks", "asap", "kindly"]


def texts_for(n: int) -> list[str]:
    """Unique texts (no cache can answer them) built from the shipped example intents."""
    from tiergate.data import load_splits
    from tiergate.tiers import __file__ as tiers_file

    examples = Path(tiers_file).parent / "examples" / "intents.jsonl"
    split = load_splits(examples, seed=0)
    base = [e.text for e in [*split.train, *split.val, *split.test]]
    return [f"{base[i % len(base)]} {WORDS[i % len(WORDS)]} #{i}" for i in range(n)]


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


def raw_vllm(checkpoint: Path, texts: list[str], batch: int) -> dict[str, Any]:
    with (
        tempfile.NamedTemporaryFile("w", suffix=".json") as f,
        tempfile.NamedTemporaryFile("w", suffix=".py") as script,
    ):
        json.dump(texts, f)
        f.flush()
        script.write(RAW_SCRIPT)
        script.flush()
        out = subprocess.run(
            [sys.executable, script.name, str(checkpoint), f.name, str(batch)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"raw vLLM failed:\n{out.stderr[-3000:]}")
    r = json.loads(line[7:])
    return {"texts_per_s": round(r["throughput"], 1), "batch_ms": pct(r["batch_s"])}


def through_handle(handle: Any, texts: list[str], batch: int) -> dict[str, Any]:
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    handle.infer.remote(batches[0], False).result()  # warm-up
    lat = []
    for b in batches:
        t = time.perf_counter()
        handle.infer.remote(b, True).result()
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    responses = []
    for b in batches:  # a window of four in flight
        responses.append(handle.infer.remote(b, True))
        if len(responses) >= 4:
            responses.pop(0).result()
    for r in responses:
        r.result()
    return {"texts_per_s": round(len(texts) / (time.perf_counter() - t), 1), "batch_ms": pct(lat)}


def through_grpc(address: str, texts: list[str], clients: int) -> dict[str, Any]:
    from tiergate.client import Client

    lat: list[float] = []
    tiers: dict[str, int] = {}
    lock = threading.Lock()

    def run(part: list[str]) -> None:
        with Client(address) as c:
            for text in part:
                t = time.perf_counter()
                reply = c.classify(text, timeout=30)
                with lock:
                    lat.append(time.perf_counter() - t)
                    tiers[reply.tier] = tiers.get(reply.tier, 0) + 1

    run(texts[:16])  # warm-up
    lat.clear()
    tiers.clear()
    rest = texts[16:]
    threads = [threading.Thread(target=run, args=(rest[i::clients],)) for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {
        "texts_per_s": round(len(rest) / (time.perf_counter() - t), 1),
        "request_ms": pct(lat),
        "clients": clients,
        "tiers": tiers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path(".tiergate/demo-bundle"))
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16, help="concurrent gRPC callers")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import ray
    import yaml
    from ray import serve

    from tiergate.bundle import load_bundle
    from tiergate.ray_app import APP_NAME, IntentModel, build_app

    bundle = load_bundle(args.bundle)
    texts = texts_for(args.texts)
    results: dict[str, Any] = {"bundle": str(args.bundle), "texts": len(texts),
                               "batch": args.batch}  # fmt: skip
    print(f"[model_tier] raw vLLM LLM.classify on {len(texts)} texts...", file=sys.stderr)
    results["raw_vllm"] = raw_vllm(bundle.intent_path(), texts, args.batch)
    print(f"[model_tier] raw: {results['raw_vllm']}", file=sys.stderr)
    # "local": a Ray of our own, never a cluster left in /tmp/ray/ray_current_cluster.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    try:
        for name, embedder in (("serve", None), ("serve_with_embedder", "packaged")):
            app = IntentModel.options(num_replicas=1, autoscaling_config=None).bind(  # type: ignore[attr-defined]
                str(args.bundle), "vllm", embedder
            )
            handle = serve.run(app, name="bench", route_prefix=None)
            results[name] = through_handle(handle, texts, args.batch)
            print(f"[model_tier] {name}: {results[name]}", file=sys.stderr)
            serve.delete("bench")
        with tempfile.TemporaryDirectory() as tmp:
            policy = Path(tmp) / "policy.yaml"
            never = {"general": 1.01}
            thresholds = {"rules": never, "linear": never, "intent": {"general": 0.0}}
            doc = {"version": "bench", "cache": {"semantic_threshold": 1.0},
                   "tasks": {"m": {"bundle": str(args.bundle.resolve()),
                                   "thresholds": thresholds}}}  # fmt: skip
            policy.write_text(yaml.safe_dump(doc))
            address = "127.0.0.1:50093"
            serve.run(
                build_app({"policy": str(policy), "address": address, "engine": "vllm"}),
                name=APP_NAME, route_prefix=None,
            )  # fmt: skip
            results["grpc"] = through_grpc(address, texts, args.clients)
            print(f"[model_tier] grpc: {results['grpc']}", file=sys.stderr)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    raw = results["raw_vllm"]["texts_per_s"]
    results["serving_overhead"] = {
        "throughput_ratio_serve_vs_raw": round(results["serve"]["texts_per_s"] / raw, 3),
        "batch_p50_ms_added": round(
            results["serve"]["batch_ms"]["p50"] - results["raw_vllm"]["batch_ms"]["p50"], 2
        ),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
