"""tiergate on a two-node Ray cluster started on this machine (ray.cluster_utils):
replicas on both nodes serve traffic, and the intent model scales up under load and
back down after it. The model runs on PyTorch here (engine "transformers"): what is
under test is Ray's placement and scaling, not vLLM (tests/cluster/test_ray_stack.py
covers that)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.cluster.conftest import one_ray_session
from tests.cluster.test_ray_stack import NEVER, free_port
from tiergate.client import Client
from tiergate.state import LEDGER

ray = pytest.importorskip("ray", reason="needs ray[serve] (make test installs it)")
serve = pytest.importorskip("ray.serve")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from tiergate.ray_app import APP_NAME, build_app  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Any]:
    one_ray_session("tests/cluster/test_two_nodes.py")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    yield cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def model_policy(tmp_path: Path, bundle: Path) -> Path:
    """Every request is decided by the intent model (the cheap tiers never accept)."""
    policy = tmp_path / "policy.yaml"
    thresholds = {"rules": NEVER, "linear": NEVER, "intent": {"general": 0.0}}
    doc = {"version": "1", "tasks": {"m": {"bundle": str(bundle), "thresholds": thresholds}}}
    policy.write_text(yaml.safe_dump(doc))
    return policy


def replicas_seen(handle: Any, want_nodes: int, tries: int = 60) -> dict[str, dict[str, Any]]:
    """describe() of each replica, keyed by node: calls until ``want_nodes`` nodes answered
    (the handle routes each call to some replica)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        info = handle.describe.remote().result(timeout_s=30)
        seen[info["node"]] = info
        if len(seen) >= want_nodes:
            break
    return seen


def running_replicas(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


TEXTS = ["I want my money back", "where is my parcel", "hello there", "reset my password"]


def test_replicas_on_both_nodes_serve_traffic(
    two_nodes: Any, full_bundle: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    app = build_app({
        "policy": str(model_policy(tmp_path, full_bundle)), "address": address,
        "engine": "transformers", "embedder": None, "frontends": 2,
        "frontend": {"ray_actor_options": {"num_cpus": 0.3}},
        "intent": {"num_replicas": 2, "autoscaling_config": None, "max_replicas_per_node": 1,
                   "ray_actor_options": {"num_cpus": 0.5}},
    })  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix=None)
    # The two front ends share the port (SO_REUSEPORT): the kernel spreads new
    # connections over them, as a load balancer would spread them over nodes.
    model_handle = serve.get_deployment_handle("IntentModel0", APP_NAME)
    # A front end's router learns of the model replicas by long poll, a moment after
    # it starts: keep sending (up to 60 s) until both replicas have had work. Every text
    # is new: a repeat would be answered by that front end's exact cache, not a model.
    deadline = time.monotonic() + 60
    i = 0
    while True:
        for _ in range(24):
            with Client(address) as client:
                assert client.classify(f"{TEXTS[i % len(TEXTS)]} (call {i})").tier == "intent"
            i += 1
        models = replicas_seen(model_handle, 2)
        if all(m["batches"] > 0 for m in models.values()) or time.monotonic() > deadline:
            break
    frontends = replicas_seen(serve.get_deployment_handle("Frontend", APP_NAME), 2)
    assert len(frontends) == 2, frontends
    assert len(models) == 2, models
    assert all(f["answered"] > 0 for f in frontends.values()), frontends
    assert all(m["batches"] > 0 for m in models.values()), models
    serve.delete(APP_NAME)


def test_the_intent_model_scales_up_under_load_and_back_down(
    two_nodes: Any, full_bundle: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    app = build_app({
        "policy": str(model_policy(tmp_path, full_bundle)), "address": address,
        "engine": "transformers", "embedder": None,
        "frontend": {"ray_actor_options": {"num_cpus": 0.3}},
        "intent": {"ray_actor_options": {"num_cpus": 0.5}, "max_replicas_per_node": 1,
                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                          "target_ongoing_requests": 1, "upscale_delay_s": 1,
                                          "downscale_delay_s": 3, "look_back_period_s": 11}},
    })  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix=None)
    assert running_replicas("IntentModel0") == 1
    stop = threading.Event()
    answered = [0]

    def load() -> None:
        with Client(address) as client:
            while not stop.is_set():
                n = answered[0] = answered[0] + 1
                # unique texts: repeats would be answered by the exact cache
                reply = client.classify(f"{TEXTS[n % len(TEXTS)]} (request {n})")
                assert reply.tier == "intent"

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        deadline = started + 90
        while running_replicas("IntentModel0") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        up = running_replicas("IntentModel0")
        print(f"scaled to {up} replicas {time.monotonic() - started:.1f} s into the load")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert up == 2, f"no scale-up after {answered[0]} requests"
    quiet = time.monotonic()
    while running_replicas("IntentModel0") > 1 and time.monotonic() < quiet + 90:
        time.sleep(0.5)
    assert running_replicas("IntentModel0") == 1
    print(f"back to 1 replica {time.monotonic() - quiet:.1f} s after the load stopped")
    with Client(address) as client:  # and it still answers after scaling down
        assert client.classify("hello there").tier == "intent"
    serve.delete(APP_NAME)


def test_concurrent_micro_batches_share_a_forward_pass(two_nodes: Any, full_bundle: Path) -> None:
    """PyTorch has no scheduler: the deployment merges batches arriving together (vLLM's
    scheduler does this itself)."""
    from tiergate.ray_app import IntentModel

    app = IntentModel.options(  # type: ignore[attr-defined]
        num_replicas=1, autoscaling_config=None, ray_actor_options={"num_cpus": 0.5}
    ).bind(str(full_bundle), "transformers", None)
    handle = serve.run(app, name="batching", route_prefix=None)
    batches = [[f"{TEXTS[i % len(TEXTS)]} {i}", f"reset it {i}"] for i in range(16)]
    alone = [handle.infer.remote(b, False).result() for b in batches[:2]]
    before = handle.describe.remote().result()["forward_passes"]
    together = [r.result() for r in [handle.infer.remote(b, False) for b in batches]]
    passes = handle.describe.remote().result()["forward_passes"] - before
    assert passes < len(batches), passes
    for (logits, vectors), (ref, _) in zip(together[:2], alone, strict=True):
        assert vectors is None
        np.testing.assert_allclose(logits, ref, atol=1e-4)
    assert all(r[0].shape == (2, len(handle.describe.remote().result()["labels"]))
               for r in together)  # fmt: skip
    serve.delete("batching")


def test_an_escalation_cap_holds_across_the_front_ends_of_both_nodes(
    two_nodes: Any, linear_bundle: Path, tmp_path: Path
) -> None:
    """Two front ends (one per node), concurrent escalations of one capped tenant: the
    Bank deployment keeps one set of books, so the cap holds for the cluster, not once
    per front end."""
    import concurrent.futures

    import grpc

    from tests.fake_openai import Script, fake_provider
    from tests.serving.conftest import KEY_A, escalate_everything, tenant_a_with
    from tiergate.v1 import classifier_pb2 as pb
    from tiergate.v1 import classifier_pb2_grpc as pb_grpc

    script = Script(default="refund", delay_s=0.3)  # slow: the escalations overlap
    with fake_provider(script) as url:
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump({
            "version": "bank-1",
            "tasks": escalate_everything(linear_bundle),
            "tenants": tenant_a_with({"escalations_per_day": 4, "spend_per_day_usd": 5.0}),
            "frontier": {"providers": [{"name": "loopback", "base_url": url, "model": "m",
                                        "price_in_per_mtok": 1.0}]},
        }))  # fmt: skip
        address = f"127.0.0.1:{free_port()}"
        # (Both "nodes" are this machine: one front end holds the state directory, the
        # other keeps its state in memory; the Bank journals in its own subdirectory.)
        state = tmp_path / "state"
        app = build_app({
            "policy": str(policy), "address": address, "embedder": None, "frontends": 2,
            "frontend": {"ray_actor_options": {"num_cpus": 0.3}}, "state_dir": str(state),
        })  # fmt: skip
        serve.run(app, name=APP_NAME, route_prefix=None)

        def call(i: int) -> str:
            # A connection of its own (grpc shares one between channels to an address
            # unless told not to): the kernel spreads connections over both front ends.
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(address, options=options) as channel:
                a = pb_grpc.ClassifierStub(channel).Classify(  # type: ignore[no-untyped-call]
                    pb.ClassifyRequest(text=f"request {i} about my money"),
                    metadata=(("x-api-key", KEY_A),), timeout=30,
                )  # fmt: skip
            return "degraded" if a.degraded else str(a.tier)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(16)))
    frontends = replicas_seen(serve.get_deployment_handle("Frontend", APP_NAME), 2)
    bank = serve.get_deployment_handle("Bank", APP_NAME)
    for _ in range(100):  # settlements reach the Bank after the answers
        usage = bank.usage.remote("a").result()
        if usage["open"] == 0:
            break
        time.sleep(0.1)
    serve.delete(APP_NAME)
    assert len(frontends) == 2, frontends
    assert all(f["answered"] > 0 for f in frontends.values()), frontends  # both took calls
    assert script.calls == 4  # each front end alone would have let 4 through
    assert sorted(outcomes) == ["degraded"] * 12 + ["frontier"] * 4
    assert (usage["escalations"], usage["open"], usage["reserved_usd"]) == (4, 0, 0.0)
    journal = [json.loads(line) for line in (state / "bank" / LEDGER).read_text().splitlines()]
    assert [e["e"] for e in journal].count("reserve") == 4  # the Bank's books, on disk
