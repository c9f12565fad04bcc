"""tiergate on Ray Serve: the front end, the intent model and the escalation tier as
deployments that Ray places, restarts and scales.

- ``Frontend``: our grpc.aio server inside a Serve replica, one per node. The
  cheap tiers (exact cache, rules, linear) answer in that process; only misses
  cross a Ray hop, already micro-batched. Chosen by measurement
  (``python -m benchmarks.ray_ingress``, same cascade in a replica behind each
  ingress, 4 client threads, 2 cores): our server 1,930 requests/s at p50
  2.0 ms; Serve's direct ingress 1,209/s at 3.1 ms; Serve's gRPC proxy 370/s
  at 10.4 ms. Direct ingress also gives no public way to find the replica's
  port, and only the ingress deployment gets one.
- ``IntentModel``: a vLLM engine (pooling runner) on the bundle's checkpoint,
  plus the small embedder feeding the semantic cache. Embeddings are asked for
  on demand, only by requests the intent model does not decide (measured: the
  embedder costs a quarter of the replica's throughput, 399 -> 300 texts/s).
  Autoscaled on ongoing requests.
- ``Escalation``: the frontier providers with retries and circuit breakers;
  one breaker state per replica, shared by every front end.
- ``Bank``: one replica holding the escalation and spend books of the tenants
  with such caps, for every front end: caps hold across the cluster, not once
  per front end. A hop on escalations only (a few ms, next to the frontier's
  second); request quotas stay with each front end (a hop on every request
  would cost the cheap tiers their point).

``build_app`` is the entry point for both ``tiergate serve`` and
``serve deploy deploy/serve_config.yaml``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from tiergate._core import ConfigError
from tiergate.accounting import BooksUnavailable, Ledger, QuotaExceeded, Reservation, SharedBooks
from tiergate.bundle import ZERO_SHOT, load_bundle
from tiergate.engine import (
    TaskRuntime,
    check_model_priority,
    idle_descendants,
    model_niceness,
    renice_process,
)
from tiergate.escalation import Attempt, Escalation, Escalator, FrontierConfig, estimate_cost
from tiergate.metrics import Metrics
from tiergate.policy import Policy, Task, Tenant, default_policy, load_policy

log = logging.getLogger("tiergate.ray")

APP_NAME = "tiergate"


def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=8,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        # A request here is a whole micro-batch from a front end.
        "target_ongoing_requests": 2,
        "upscale_delay_s": 10,
        "downscale_delay_s": 60,
    },
)
class IntentModel:
    """The bundle's intent model on vLLM (or PyTorch with ``engine="transformers"``)."""

    def __init__(
        self,
        bundle: str,
        engine: str = "vllm",
        embedder: str | None = "packaged",
        model_priority: str = "idle",
    ):
        from tiergate.train.intent import PACKAGED_MODEL, resolve_base_model

        check_model_priority(model_priority)
        # Below the front ends, as in-process (MODEL_NICE): Ray starts every worker at one
        # niceness, and a front end there waits behind model compute for the cores (2 cores,
        # CLINC, 100 req/s: cheap-tier p99 13.5 ms, 5-6 ms once the front end ran higher).
        # The engines' processes, started from here, inherit it.
        renice_process(model_niceness())

        b = load_bundle(bundle)
        self.labels = b.labels
        self.engine = engine
        max_length = int(b.tiers["intent"].get("max_length", 64))
        zero_shot = b.tiers["intent"].get("kind") == ZERO_SHOT
        if engine == "vllm":
            from tiergate.model_server import (
                EngineOptions,
                VllmIntentModel,
                VllmZeroShotModel,
            )

            emb = None
            if embedder is not None:
                emb = resolve_base_model(PACKAGED_MODEL if embedder == "packaged" else embedder)
            if zero_shot:  # an instruct model scoring the labels (tiergate.zero_shot)
                self.model: Any = VllmZeroShotModel(
                    b.intent_path(), b.labels, emb, max_text_tokens=max_length
                )
            else:
                # Room for the special tokens around max_length word pieces.
                options = EngineOptions(max_model_len=max(32, max_length + 8))
                self.model = VllmIntentModel(b.intent_path(), b.labels, emb, options)
            # The engines compute in processes of their own. At idle they use only the
            # cores the front ends leave free: a nice value still takes turns with a
            # front end that wakes up (2 cores, CLINC, 100 and 150 req/s: cheap-tier p99
            # 8.0-10.3 ms at nice +10, 6.0-7.4 ms at idle; the model's answers came
            # sooner too). Ray's own threads in this process stay at nice +10.
            if model_priority == "idle" and idle_descendants() is None:
                log.warning("the model engines cannot run in SCHED_IDLE here: nice +%d",
                            model_niceness())  # fmt: skip
        elif engine == "transformers":
            from tiergate.tiers import TransformersIntentModel

            if zero_shot:
                raise ConfigError(f"{bundle}: a zero-shot intent model is served by vLLM only")

            self.model = TransformersIntentModel(b.intent_path(), max_length=max_length)
        else:
            raise ValueError(f"engine must be 'vllm' or 'transformers', not {engine!r}")
        self.batches = 0
        self.forward_passes = 0

    async def infer(
        self, texts: list[str], embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        self.batches += 1
        if self.engine == "vllm":
            # vLLM's scheduler already batches every request in flight, from every
            # front end, continuously: another batching layer would only add waiting.
            return await self.model.infer(texts, embed)  # type: ignore[no-any-return]
        return await self._forward((tuple(texts), embed))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _forward(
        self, calls: list[tuple[tuple[str, ...], bool]]
    ) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]]:
        """PyTorch has no scheduler of its own: micro-batches arriving together from
        several front ends go through the model as one forward pass."""
        self.forward_passes += 1
        texts = [t for batch, _ in calls for t in batch]
        embed = any(e for _, e in calls)
        logits, vectors = await asyncio.to_thread(self.model.infer, texts, embed=embed)
        out = []
        start = 0
        for batch, e in calls:
            end = start + len(batch)
            out.append(
                (logits[start:end], vectors[start:end] if e and vectors is not None else None)
            )
            start = end
        return out

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Unit sentence embeddings only (for the semantic cache)."""
        self.batches += 1
        if self.engine == "vllm":
            return await self.model.embed(texts)  # type: ignore[no-any-return]
        _, vectors = await self._forward((tuple(texts), True))
        return vectors  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        dim = getattr(self.model, "dim", None)
        if dim is None and self.engine == "transformers":
            dim = int(self.model.model.config.hidden_size)
        return {
            "labels": self.labels,
            "dim": dim,
            "node": node_id(),
            "pid": os.getpid(),  # tells a restarted replica from the one before
            "batches": self.batches,
            "forward_passes": self.forward_passes,
        }

    def __del__(self) -> None:
        shutdown = getattr(getattr(self, "model", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,  # calls wait on the network, not the CPU
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64},
)
class EscalationTier:
    def __init__(self, config: FrontierConfig):
        self.escalator = Escalator(config)

    async def classify(
        self, text: str, labels: list[str], hints: str, timeout_s: float | None
    ) -> Escalation:
        return await self.escalator.classify(text, labels, hints, timeout_s)

    def states(self) -> dict[str, str]:
        return self.escalator.states()


@serve.deployment(
    num_replicas=1,  # one set of books: what makes a cap hold across front ends
    ray_actor_options={"num_cpus": 0},  # a dict update per escalation
    max_ongoing_requests=1024,
)
class Bank:
    """The escalation and spend books of every front end (see SharedBooks). With a
    state directory they outlive a restart, journaled in its ``bank`` subdirectory
    on the node the replica runs on."""

    LOCK_WAIT_S = 30.0

    async def __init__(self, state_dir: str | None = None):  # type: ignore[misc]
        self.books = SharedBooks()
        self.state = None
        if state_dir:
            from tiergate.state import StateDirBusy, StateStore

            # A replica being replaced (a redeploy) may hold the directory a while yet:
            # books started empty instead would reset every cap for the rest of the day.
            waited = 0.0
            while True:
                try:
                    self.state = StateStore(Path(state_dir) / "bank")
                    break
                except StateDirBusy:
                    if waited >= self.LOCK_WAIT_S:
                        raise  # Serve retries the replica
                    await asyncio.sleep(0.5)
                    waited += 0.5
            self.state.restore_ledger(self.books.ledger)

    # async: Serve runs them on the replica's event loop, one at a time (they never
    # await), rather than on a thread pool.
    async def reserve(self, tenant: Tenant, estimate_usd: float, key: str) -> dict[str, Any]:
        return self.books.reserve(tenant, estimate_usd, key)

    async def settle(self, key: str, actual_usd: float) -> bool:
        return self.books.settle(key, actual_usd)

    async def usage(self, tenant: str) -> dict[str, Any]:
        """Today's books of ``tenant`` (escalations, spent and reserved USD)."""
        u = self.books.ledger.snapshot(tenant)
        return {"escalations": u.escalations, "spent_usd": u.spent_usd,
                "reserved_usd": u.reserved_usd, "open": u.open_reservations}  # fmt: skip

    def __del__(self) -> None:
        state, self.state = getattr(self, "state", None), None  # (Serve and gc may both call)
        if state is not None:
            state.close()


class RemoteBooks:
    """The engine's Books on Ray: a tenant with an escalation or spend cap reserves and
    settles at the Bank (two hops of a few ms per escalation: the reservation, which
    the escalation waits for, and the settlement, which it does not); one without keeps
    this front end's own ledger (no hop). The Bank not answering in time refuses the
    escalation (BooksUnavailable): spending what the books cannot see would break the
    cap. A settlement the Bank never gets leaves the estimate reserved until the day
    ends: the cap errs on the side of spending less."""

    TIMEOUT_S = 5.0

    def __init__(self, handle: Any, local: Ledger):
        self.handle = handle
        self.local = local
        self.pending: set[asyncio.Task[None]] = set()  # settlements on their way

    async def reserve_escalation(
        self, tenant: Tenant, estimate_usd: float, request_id: str, timeout_s: float | None
    ) -> Reservation:
        q = tenant.quota
        if q.escalations_per_day is None and q.spend_per_day_usd is None:
            return self.local.reserve_escalation(tenant, estimate_usd)
        wait = self.TIMEOUT_S if timeout_s is None else max(0.0, min(self.TIMEOUT_S, timeout_s))
        slim = dataclasses.replace(tenant, key_sha256=())  # the Bank needs no key hashes
        try:
            answer = await asyncio.wait_for(
                self.handle.reserve.remote(slim, estimate_usd, request_id), wait
            )
        except BaseException as e:  # too late, the replica lost, or the request cancelled
            # It may have reserved all the same: release it (a release that arrives
            # first refuses the reservation when it comes).
            self._in_background(request_id, 0.0, tenant.name, release=True)
            if not isinstance(e, Exception):
                raise
            raise BooksUnavailable(
                f"the spend books (Bank deployment) did not answer: {type(e).__name__}: {e}"
            ) from None
        if not answer["ok"]:
            raise QuotaExceeded(answer["message"], answer["retry_after_s"])
        return Reservation(tenant.name, answer["day"], estimate_usd, key=request_id)

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        if not reservation.key:
            self.local.settle(reservation, actual_usd)
            return
        if reservation.settled:
            return
        reservation.settled = True
        self._in_background(reservation.key, actual_usd, reservation.tenant)

    def _in_background(self, key: str, actual_usd: float, tenant: str,
                       release: bool = False) -> None:  # fmt: skip
        # Kept here until done: the answer does not wait for it, and a task nobody
        # holds may be collected before it ends.
        task = asyncio.ensure_future(self._settle(key, actual_usd, tenant, release))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _settle(self, key: str, actual_usd: float, tenant: str, release: bool) -> None:
        try:
            await asyncio.wait_for(self.handle.settle.remote(key, actual_usd), self.TIMEOUT_S)
        except Exception as e:
            if release:  # of a reservation that most likely never happened
                log.warning("could not release the unanswered reservation of request %s "
                            "(tenant %r) at the Bank: %s: %s", key, tenant,
                            type(e).__name__, e)  # fmt: skip
                return
            log.error(
                "could not settle the escalation of request %s (tenant %r) at the Bank "
                "(%s: %s): its estimate stays reserved until the day ends",
                key, tenant, type(e).__name__, e,
            )  # fmt: skip

    async def drain(self, timeout_s: float) -> None:
        """Waits (up to ``timeout_s``) for the settlements on their way, those that
        start meanwhile included."""
        deadline = time.monotonic() + timeout_s
        while self.pending and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self.pending), timeout=left)


class RemoteModel:
    """The engine's ModelBackend for an IntentModel deployment (async, several batches
    in flight so that every replica gets work)."""

    max_inflight = 4

    def __init__(self, handle: Any, labels: list[str], dim: int | None):
        self.handle = handle
        self.labels = labels
        self.dim = dim

    async def _call(self, method: str, *args: Any) -> Any:
        """One retry when the replica died under the call: the handle sends the retry
        to another replica (or to the one Serve starts in its place). The engine's
        deadline bounds the whole (see Engine: it stops waiting in time to degrade)."""
        try:
            return await getattr(self.handle, method).remote(*args)
        except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as e:
            log.warning("intent model replica lost mid-call (%s); retrying once", type(e).__name__)
            return await getattr(self.handle, method).remote(*args)

    async def infer_async(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        # Logits only: the embedding is asked for later, by the requests that need it.
        return await self._call("infer", list(texts), False)  # type: ignore[no-any-return]

    async def embed_async(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if self.dim is None:
            raise RuntimeError("the model deployment has no embedder")
        return await self._call("embed", list(texts))  # type: ignore[no-any-return]

    def infer(self, texts: Sequence[str], *, embed: bool = True) -> Any:
        """The blocking form ModelBackend asks for (offline callers); the engine itself
        always takes ``infer_async`` when a backend has it."""
        return self.handle.infer.remote(list(texts), embed).result()


class RemoteEscalation:
    """The engine's FrontierClient for the Escalation deployment."""

    def __init__(self, handle: Any, config: FrontierConfig, metrics: Metrics):
        self.handle = handle
        self.config = config
        self.metrics = metrics

    async def classify(
        self, text: str, labels: Sequence[str], hints: str, timeout_s: float | None = None
    ) -> Escalation:
        result: Escalation = await self.handle.classify.remote(text, list(labels), hints, timeout_s)
        for a in result.attempts:
            self._count(a)
        return result

    def _count(self, a: Attempt) -> None:
        self.metrics.frontier_attempts.labels(a.provider, a.outcome).inc()

    def estimate_cost(self, text: str, labels: Sequence[str]) -> float:
        return estimate_cost(self.config, text, labels)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    # One per node: the replicas of a host share its gRPC port (SO_REUSEPORT), and
    # clients or a TCP load balancer spread over the nodes.
    max_replicas_per_node=1,
)
class Frontend:
    """Our grpc.aio server in a Serve replica: Ray starts, places and restarts it."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        source: dict[str, str],
        address: str,
        models: dict[str, Any],
        escalation: Any | None,
        frontier: FrontierConfig | None,
        metrics_port: int | None = None,
        tls: dict[str, str] | None = None,
        state_dir: str | None = None,
        bank: Any | None = None,
    ):
        from tiergate.server import build_runtimes, embedding_dim

        nice = renice_process(0)  # above the model replicas (see IntentModel)
        if nice > 0:
            log.warning(
                "the front end runs at nice %d, as Ray started it: not allowed to go lower "
                "(CAP_SYS_NICE). The model replicas go 10 lower still, but start Ray with "
                "RAY_worker_niceness=0 (tiergate serve does when it starts Ray) for the "
                "cheap tiers' latency", nice,
            )  # fmt: skip
        policy = _policy(source)
        self.metrics = Metrics()
        described = {b: await h.describe.remote() for b, h in models.items()}

        def runtime(task: Task) -> TaskRuntime:
            bundle = load_bundle(task.bundle)
            key = str(Path(task.bundle).resolve())
            backend = None
            if key in models:
                info = described[key]
                backend = RemoteModel(models[key], info["labels"], info["dim"])
            return TaskRuntime(task, bundle, backend)

        runtimes = build_runtimes(policy, runtime)
        remote = (
            RemoteEscalation(escalation, frontier, self.metrics)
            if escalation is not None and frontier is not None
            else None
        )
        first = next(iter(runtimes.values()))
        from tiergate.engine import Engine
        from tiergate.server import Server, decision_logger, failure_logger

        ledger = Ledger()
        self.books = RemoteBooks(bank, ledger) if bank is not None else None
        engine = Engine(policy, runtimes, frontier=remote, ledger=ledger, books=self.books,
                        semantic_dim=embedding_dim(first))  # fmt: skip
        engine.on_decision = decision_logger(lambda: engine.policy, self.metrics)
        engine.on_failure = failure_logger(lambda: engine.policy)
        path = Path(source["policy"]) if "policy" in source else None
        bundle = Path(source["bundle"]) if "bundle" in source else None
        self.server = Server(engine, path, self.metrics, runtime, frontier, bundle,
                             Path(state_dir) if state_dir else None)  # fmt: skip
        from tiergate.server import Tls

        files = Tls(
            Path(tls["cert"]), Path(tls["key"]),
            Path(tls["client_ca"]) if tls.get("client_ca") else None,
        ) if tls else None  # fmt: skip
        self.port = await self.server.start(address, files)
        if metrics_port:
            self.metrics.serve_http(metrics_port)
        log.info("tiergate front end on %s (node %s)", address, node_id())

    def describe(self) -> dict[str, Any]:
        return {"node": node_id(), "port": self.port, "answered": self.metrics.decisions.answered()}

    def reload(self) -> bool:
        """Re-reads the policy file (each replica also watches it for changes)."""
        return self.server.reload() if self.server.policy_path is not None else False

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The load signals of this replica, for :func:`frontend_autoscaling_policy`.

        Serve's own signal (ongoing requests) cannot see our traffic: it reaches
        the gRPC server in this replica, not Serve's request path."""
        a = self.server.admission
        return {"inflight": float(a.inflight), "loop_lag_ms": a.lag_ms}

    async def __del__(self) -> None:
        """Serve's graceful shutdown of the replica (it awaits an async ``__del__``):
        the gRPC server drains and the state directory gets its last save."""
        server = getattr(self, "server", None)  # a constructor that failed leaves none
        if server is not None:
            await server.stop(0.5)
        books = getattr(self, "books", None)
        if books is not None:  # the last requests' settlements reach the Bank
            await books.drain(RemoteBooks.TIMEOUT_S + 1)


# The front end scales on its own signals: one more replica while the replicas run
# behind (their event loops lag) or hold many requests, one fewer once all of them
# have been idle for a few decisions in a row.
LAG_UP_MS = 10.0
INFLIGHT_UP = 256.0
LAG_IDLE_MS = 1.0
INFLIGHT_IDLE = 8.0
IDLE_DECISIONS = 6


def frontend_autoscaling_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """A Serve custom autoscaling policy (``AutoscalingContext`` in, target replicas and
    the policy's state out) for the Frontend deployment."""
    metrics = ctx.aggregated_metrics or {}
    lag = list((metrics.get("loop_lag_ms") or {}).values())
    inflight = list((metrics.get("inflight") or {}).values())
    current = int(ctx.current_num_replicas)
    state = dict(ctx.policy_state or {})
    target = current
    mean_lag = sum(lag) / len(lag) if lag else 0.0
    mean_inflight = sum(inflight) / len(inflight) if inflight else 0.0
    if not lag:  # no report yet: stay
        pass
    elif mean_lag > LAG_UP_MS or mean_inflight > INFLIGHT_UP:
        target, state["idle"] = current + 1, 0
    elif max(lag) < LAG_IDLE_MS and max(inflight, default=0.0) < INFLIGHT_IDLE:
        state["idle"] = state.get("idle", 0) + 1
        if state["idle"] >= IDLE_DECISIONS:
            target, state["idle"] = current - 1, 0
    else:
        state["idle"] = 0
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(low, min(high, target)), state


def deployment(cls: type) -> Any:
    """A class decorated with ``serve.deployment`` (the decorator hides it from mypy)."""
    return cls


def _policy(source: dict[str, str]) -> Policy:
    bundle = Path(source["bundle"]) if "bundle" in source else None
    if "policy" in source:
        return load_policy(source["policy"], bundle)
    assert bundle is not None
    return default_policy(bundle.resolve())


def build_app(args: dict[str, Any]) -> Any:
    """The application for ``serve.run`` or ``serve deploy``.

    ``args``: ``policy`` (a policy file), ``bundle`` (one task with defaults), or
    both (the policy's tasks default to that bundle);
    ``address`` (gRPC host:port, default 127.0.0.1:50051); ``engine`` (vllm or
    transformers); ``model_priority`` (the vLLM engines' processes: idle, the
    default, or low: nice +10 like the rest of the model replica); ``embedder``
    (model path or hub id for the semantic cache's embeddings, "packaged" for the
    shipped MiniLM, null for none); ``frontier``
    (provider settings, overriding the policy's); ``metrics_port``; ``tls``
    ({cert, key, client_ca}: PEM files on every node, for TLS on the gRPC port);
    ``state_dir`` (where a front end keeps spend counters and the semantic-cache
    snapshot across restarts: one front end per directory and node, see
    tiergate.state; the Bank keeps the capped tenants' books in its ``bank``
    subdirectory; null keeps them in memory);
    ``frontends`` (replicas at the start and at the least, one per node) and
    ``frontends_max`` (the most; the front end scales between them on its event-loop
    lag and requests in flight, see :func:`frontend_autoscaling_policy`); ``intent``
    and ``frontend``
    (deployment options for those deployments: autoscaling_config,
    ray_actor_options, ...).
    """
    from tiergate.policy import parse_frontier

    source = {k: str(Path(args[k]).resolve()) for k in ("policy", "bundle") if args.get(k)}
    if not source:
        raise ValueError("give 'policy' (a policy file), 'bundle', or both")
    policy = _policy(source)
    engine = str(args.get("engine", "vllm"))
    embedder = args.get("embedder", "packaged")
    model_priority = str(args.get("model_priority") or "idle")
    models: dict[str, Any] = {}
    for i, bundle in enumerate(sorted({str(t.bundle) for t in policy.tasks.values()})):
        if load_bundle(bundle).has("intent"):
            options = {"name": f"IntentModel{i}", **(args.get("intent") or {})}
            models[bundle] = (
                deployment(IntentModel)
                .options(**options)
                .bind(bundle, engine, embedder, model_priority)
            )
    frontier = policy.frontier
    if args.get("frontier"):
        frontier = parse_frontier("frontier", dict(args["frontier"]))
    escalation = bank = None
    if frontier is not None:
        escalation = deployment(EscalationTier).bind(frontier)
        bank = deployment(Bank).bind(args.get("state_dir"))
    low = int(args.get("frontends", 1))
    high = max(low, int(args.get("frontends_max", low)))
    autoscaling = {
        "min_replicas": low, "initial_replicas": low, "max_replicas": high,
        "policy": {"policy_function": "tiergate.ray_app:frontend_autoscaling_policy"},
    }  # fmt: skip
    options = {"autoscaling_config": autoscaling, **(args.get("frontend") or {})}
    return (
        deployment(Frontend)
        .options(**options)
        .bind(
            source,
            str(args.get("address", "127.0.0.1:50051")),
            models,
            escalation,
            frontier,
            args.get("metrics_port"),
            args.get("tls"),
            args.get("state_dir"),
            bank,
        )
    )


def run(app_args: dict[str, Any], ray_address: str | None) -> None:
    """`tiergate serve` on Ray: start (or join) Ray, deploy, print how to call it, and on
    Ctrl-C or SIGTERM take it all down again."""
    import signal
    import sys
    import threading

    import ray

    joined = ray_address is not None
    where = f"joining Ray at {ray_address}" if joined else "starting a local Ray"
    print(f"tiergate: {where}...", file=sys.stderr, flush=True)
    # Warnings and errors from the replicas reach this terminal; their INFO chatter goes
    # to Ray's log files (/tmp/ray/session_latest/logs) unless the user asks for it.
    quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if not joined:
        # Ray starts its workers at nice 15, where a front end may not rise again without
        # privileges; at 0, the model replicas still step 10 below it (see IntentModel).
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        # Without an address Ray would join the cluster named in
        # /tmp/ray/ray_current_cluster, even a dead one an interrupted run left there.
        address=ray_address if joined else "local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": quiet},
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Clients reach our gRPC server directly: no Ray proxy.
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        started = time.perf_counter()
        print(
            "tiergate: deploying the front end, the intent model "
            f"({app_args.get('engine', 'vllm')}), the escalation tier and its spend books "
            "(Bank); the model "
            "replicas start their engines (about a minute on CPU)...",
            file=sys.stderr,
            flush=True,
        )
        serve.run(build_app(app_args), name=APP_NAME, route_prefix=None)
        frontend = serve.get_deployment_handle("Frontend", app_name=APP_NAME)
        signal.signal(signal.SIGHUP, lambda *_: frontend.reload.remote())
        address = str(app_args.get("address", "127.0.0.1:50051"))
        cli = "tiergate" if shutil.which("tiergate") else f"{sys.executable} -m tiergate"
        print(
            f"tiergate serving gRPC on {address} via Ray Serve (ready in "
            f"{time.perf_counter() - started:.0f} s); "
            f'try: {cli} classify --address {address} "where is my order"',
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("tiergate: shutting down", flush=True)
    finally:
        if joined:
            serve.delete(APP_NAME)  # leave the cluster's other applications running
        else:
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
