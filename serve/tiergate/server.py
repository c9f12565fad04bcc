"""The gRPC front end: tiergate.v1.Classifier, health, reflection, metrics, decision log."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tiergate._core import ConfigError
from tiergate.admission import Admission
from tiergate.engine import Decision, Engine, Request, RequestError, TaskRuntime, in_process_runtime
from tiergate.escalation import Attempt, Escalator, FrontierConfig
from tiergate.frontier import ProviderConfig
from tiergate.metrics import Metrics
from tiergate.policy import Policy, Tenant, load_policy
from tiergate.state import Journal, StateDirBusy, StateStore
from tiergate.v1 import classifier_pb2 as pb
from tiergate.v1 import classifier_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
ANONYMOUS = Tenant("anonymous")
log = logging.getLogger("tiergate.server")
decisions_log = logging.getLogger("tiergate.decisions")
# One line per request routed to human review, whatever --log-decisions says; at
# WARNING, as a person must act on it (and Ray Serve's replicas log at WARNING).
reviews_log = logging.getLogger("tiergate.review")


def api_key(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key not in ("x-api-key", "authorization"):
            continue  # other metadata (binary "-bin" values too) is not ours to read
        v = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if key == "x-api-key":
            return v
        if v.lower().startswith("bearer "):
            return v[7:].strip()
    return None


def to_proto(d: Decision) -> pb.ClassifyResponse:
    # On the hot path of every request. Fields are set one by one, and only those not
    # at their default: upb's keyword constructors cost half as much again, and
    # building TierStep messages before adding them twice as much.
    r = pb.ClassifyResponse()
    r.label = d.label
    r.confidence = d.confidence
    r.tier = d.tier
    r.policy_version = d.policy_version
    r.request_id = d.request_id
    add = r.path.add
    for s in d.path:
        step = add()
        step.tier = s.tier
        step.confidence = s.confidence
        step.threshold = s.threshold
        step.micros = s.micros
        if s.label:
            step.label = s.label
        if s.accepted:
            step.accepted = True
        if s.note:
            step.note = s.note
    if d.cached:
        r.cached = True
    if d.cache:
        r.cache = d.cache
    if d.cost_usd:
        r.cost_usd = d.cost_usd
    if d.degraded:
        r.degraded = True
        r.degraded_reason = d.degraded_reason
    if d.risk_tags:
        r.risk_tags.extend(d.risk_tags)
    if d.pending_review:
        r.pending_review = True
    if d.client_id:
        r.client_id = d.client_id
    return r


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message (a string field that is not UTF-8,
    corrupt bytes): handed to the servicer, which answers INVALID_ARGUMENT, where the
    generated deserializer would have failed the call with a bare INTERNAL."""

    message: str
    client_id: str = ""

    def error(self) -> RequestError:
        return RequestError(
            "INVALID_ARGUMENT",
            f"the request is not a valid {self.message}: a string field (text, task, ...) "
            "that is not UTF-8, or corrupt bytes",
        )


def _lenient(message: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return Undecodable(message.DESCRIPTOR.full_name)

    return parse


def add_service(service: ClassifierService, server: grpc.aio.Server) -> None:
    """The generated registration, with request parsing that cannot fail the call."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            service.Classify,
            request_deserializer=_lenient(pb.ClassifyRequest),
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
        "ClassifyBatch": grpc.unary_unary_rpc_method_handler(
            service.ClassifyBatch,
            request_deserializer=_lenient(pb.ClassifyBatchRequest),
            response_serializer=pb.ClassifyBatchResponse.SerializeToString,
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            service.ClassifyStream,
            request_deserializer=_lenient(pb.ClassifyRequest),
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


@dataclass(frozen=True)
class Tls:
    """TLS for the front end: its certificate chain and key (PEM); with ``client_ca``,
    clients must present a certificate that CA signed (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def pem(path: Path, what: str) -> bytes:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ConfigError(f"TLS {what} {path}: {e.strerror or e}") from None
            if b"-----BEGIN " not in data:
                raise ConfigError(f"TLS {what} {path}: not a PEM file")
            return data

        chain = [(pem(self.key, "key"), pem(self.cert, "certificate"))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(chain)
        ca = pem(self.client_ca, "client CA")
        return grpc.ssl_server_credentials(chain, root_certificates=ca, require_client_auth=True)


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, engine: Engine, metrics: Metrics, admission: Admission):
        self.engine = engine
        self.metrics = metrics
        self.admission = admission

    def _tenant(self, context: Context) -> Tenant:
        key = api_key(context.invocation_metadata())
        policy = self.engine.policy
        tenant = policy.tenant_for_key(key)
        if tenant is None:
            if policy.auth_required:
                raise RequestError(
                    "UNAUTHENTICATED",
                    "a valid API key is required (metadata x-api-key or authorization: Bearer)",
                )
            return ANONYMOUS
        return tenant

    def _request(self, msg: pb.ClassifyRequest, tenant: Tenant, context: Any) -> Request:
        remaining = context.time_remaining()
        # Reading an unset sub-message builds an empty one: most requests carry no hints.
        if msg.HasField("hints"):
            h = msg.hints
            risk_tags, force_tier, max_tier = list(h.risk_tags), h.force_tier, h.max_tier
        else:
            risk_tags, force_tier, max_tier = [], "", ""
        # Positional: keywords cost a third more, on every request (0.69 against 1.0 us).
        return Request(
            msg.text, tenant, msg.task, risk_tags, force_tier, max_tier,
            msg.idempotency_key, msg.client_id,
            None if remaining is None else time.monotonic() + remaining,
        )  # fmt: skip

    async def _classify(
        self, msg: pb.ClassifyRequest, tenant: Tenant, context: Any
    ) -> pb.ClassifyResponse:
        decision = await self.engine.classify(self._request(msg, tenant, context))
        return to_proto(decision)

    async def _classify_or_error(
        self, msg: pb.ClassifyRequest, tenant: Tenant, context: Any
    ) -> pb.ClassifyResponse:
        """An answer, or a response carrying the item's error (batches and streams)."""
        try:
            return await self._classify(msg, tenant, context)
        except Exception as exc:  # one item's failure must not sink the others
            e = exc if isinstance(exc, RequestError) else RequestError("INTERNAL", repr(exc))
            if not isinstance(exc, RequestError):
                log.exception("batch or stream item failed")
            return self._error_response(msg, e)

    def _error_response(
        self, msg: pb.ClassifyRequest | Undecodable, e: RequestError
    ) -> pb.ClassifyResponse:
        self.metrics.errors.labels(e.code).inc()
        code = getattr(grpc.StatusCode, e.code).value[0]
        return pb.ClassifyResponse(
            client_id=msg.client_id, error=pb.Error(code=code, message=e.message)
        )

    async def _abort(self, context: Context, e: RequestError) -> None:
        self.metrics.errors.labels(e.code).inc()
        if e.retry_after_s is not None:
            context.set_trailing_metadata((("retry-after-s", f"{e.retry_after_s:.3g}"),))
        await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            tenant = self._tenant(context)
            self.admission.admit()
        except RequestError as e:
            await self._abort(context, e)
            raise  # unreachable: abort raises
        try:  # (not through _classify: a coroutine less on the path of every request)
            return to_proto(await self.engine.classify(self._request(request, tenant, context)))
        except RequestError as e:
            await self._abort(context, e)
            raise
        except Exception as e:  # a bug of ours: INTERNAL (counted, logged), not UNKNOWN
            log.exception("request failed")
            await self._abort(context, RequestError("INTERNAL", f"{type(e).__name__}: {e}"))
            raise
        finally:
            self.admission.release()

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: Context
    ) -> pb.ClassifyBatchResponse:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            tenant = self._tenant(context)
            n = len(request.requests)
            if n > self.engine.policy.max_batch:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"batch of {n} exceeds the limit of {self.engine.policy.max_batch}",
                )
            for i, item in enumerate(request.requests):
                try:
                    self.engine.validate(self._request(item, tenant, context))
                except RequestError as e:
                    raise RequestError(e.code, f"requests[{i}]: {e.message}") from None
            # Items were validated above; a later failure (a quota reached halfway, say)
            # answers that item with its error, keeping the work done for the others.
            self.admission.admit(n)
            try:
                answers = await asyncio.gather(
                    *(self._classify_or_error(m, tenant, context) for m in request.requests)
                )
            finally:
                self.admission.release(n)
            return pb.ClassifyBatchResponse(responses=answers)
        except RequestError as e:
            await self._abort(context, e)
            raise

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: Context
    ) -> AsyncIterator[pb.ClassifyResponse]:
        try:
            tenant = self._tenant(context)
        except RequestError as e:
            await self._abort(context, e)
            return
        # Backpressure: at most max_batch items of one stream are worked on or wait to
        # be sent. A client that writes and does not read stops being read, rather
        # than growing our memory.
        limit = self.engine.policy.max_batch
        queue: asyncio.Queue[pb.ClassifyResponse | None] = asyncio.Queue(maxsize=limit + 1)
        tasks: set[asyncio.Task[None]] = set()

        async def one(msg: pb.ClassifyRequest) -> None:
            if isinstance(msg, Undecodable):
                await queue.put(self._error_response(msg, msg.error()))
                return
            try:
                self.admission.admit()
            except RequestError as e:  # this item is refused; the stream goes on
                await queue.put(self._error_response(msg, e))
                return
            try:
                answer = await self._classify_or_error(msg, tenant, context)
            finally:
                self.admission.release()
            # Its slot is free while the answer waits to be sent: a client that stops
            # reading holds this stream's queue, not the server's admission.
            await queue.put(answer)

        async def reader() -> None:
            try:
                async for msg in request_iterator:
                    while len(tasks) >= limit:
                        await asyncio.wait(list(tasks), return_when=asyncio.FIRST_COMPLETED)
                    t = asyncio.create_task(one(msg))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
            except asyncio.CancelledError:
                raise  # the call is over: nobody reads the answers any more
            except Exception:  # the request stream broke: end the answers with what we have
                log.exception("reading a ClassifyStream failed")
            await queue.put(None)

        feeder = asyncio.create_task(reader())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            # A client gone or a call cancelled: its items stop too, freeing their
            # admission slots and sparing the frontier calls nobody will read.
            feeder.cancel()
            for t in list(tasks):
                t.cancel()


class Server:
    """A running tiergate front end (gRPC + metrics), with policy hot reload."""

    def __init__(self, engine: Engine, policy_path: Path | None, metrics: Metrics,
                 runtime_factory: Any = in_process_runtime,
                 pinned_frontier: FrontierConfig | None = None,
                 default_bundle: Path | None = None,
                 state_dir: Path | None = None,
                 snapshot_interval_s: float = 60.0):  # fmt: skip
        self.engine = engine
        # Spend counters and the semantic cache outlive the process there (tiergate.state).
        self.state_dir = state_dir
        self.snapshot_interval_s = snapshot_interval_s
        self.state: StateStore | None = None
        self.reviews: Journal | None = None  # the state directory's review file
        engine.on_review = self._record_review
        self._keep: asyncio.Task[None] | None = None
        self.default_bundle = default_bundle  # for tasks the policy file leaves without one
        # Providers given on the command line win over the policy's, across reloads.
        self.pinned_frontier = pinned_frontier
        self.policy_path = policy_path
        self.metrics = metrics
        self.runtime_factory = runtime_factory
        # Both bind to the running event loop, so start() creates them.
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.port = 0
        self._mtime = policy_path.stat().st_mtime if policy_path else 0.0
        self._watch: asyncio.Task[None] | None = None
        self.reloads = {"ok": 0, "rejected": 0}
        # Escalators a reload replaced: calls still in flight on them finish, and their
        # connections close at stop.
        self._retired: list[Any] = []
        # Models a reload replaced: each is closed once no request is running on it.
        self._dropped: list[TaskRuntime] = []
        # One reload at a time (the file watch, SIGHUP and Ray each start one, on threads
        # of their own): each must build on what the one before installed.
        self._reloading = threading.Lock()
        self._stopped = False
        self.admission = Admission()
        self._limit(engine.policy)
        metrics.inflight.set_function(lambda: self.admission.inflight)
        metrics.loop_lag.set_function(lambda: self.admission.lag_ms)

    def _limit(self, policy: Policy) -> None:
        self.admission.max_inflight = policy.max_inflight
        self.admission.max_lag_ms = policy.max_loop_lag_ms

    def _open_state(self) -> None:
        """Restores the books and the cache before the first request can arrive."""
        if self.state_dir is None:
            return
        try:
            self.state = StateStore(self.state_dir)
        except StateDirBusy as e:
            log.warning("%s: this front end keeps its spend counters and cache in memory, "
                        "and its review records in the log only", e)  # fmt: skip
            return
        books = self.state.restore_ledger(self.engine.ledger)
        try:
            self.reviews = self.state.open_reviews()
        except OSError as e:  # a side file must not keep the server from starting
            log.error("%s: cannot open the review records file (%s); review records go "
                      "to the log only", self.state_dir, e)  # fmt: skip
        cached = self.state.restore_cache(self.engine.semantic)
        unservable = self.engine.drop_unservable_entries()
        log.info(
            "state from %s: books of %d tenant(s) for today, %d semantic-cache entries "
            "(%d more dropped: kept under another policy version or older cache rules)",
            self.state_dir, len(books.usage), cached - unservable, unservable,
        )  # fmt: skip

    def _record_review(self, record: dict[str, Any]) -> None:
        """A request the risk policy routed to human review: a log line, and a line in
        the state directory's review file, which a review system reads."""
        reviews_log.warning("%s", orjson.dumps(record).decode())
        if self.reviews is not None:
            self.reviews.record(record)

    async def _keep_state(self) -> None:
        """Request counts reach the journal each second; the cache each interval."""
        assert self.state is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            self.engine.ledger.flush()
            if time.monotonic() - last >= self.snapshot_interval_s:
                last = time.monotonic()
                await self._save_cache()

    async def _save_cache(self) -> None:
        assert self.state is not None
        state, engine = self.state, self.engine
        versions = engine.servable_versions()

        def drop_and_save() -> None:  # off the loop: both walk the whole cache
            engine.drop_unservable_entries(versions)  # older policies' entries: not saved
            state.save_cache(engine.semantic)

        try:
            await asyncio.to_thread(drop_and_save)
        except OSError as e:  # a full disk must not take the server down
            log.error("could not save the semantic cache: %s", e)

    async def start(self, address: str = "127.0.0.1:0", tls: Tls | None = None) -> int:
        self._open_state()
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
        self.health = health.aio.HealthServicer()
        service = ClassifierService(self.engine, self.metrics, self.admission)
        add_service(service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, tls.credentials())
        # Models and bundles are loaded by now and live as long as the server: keep
        # the cyclic GC from rescanning their millions of objects on every full pass.
        gc.freeze()
        await self.server.start()
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.policy_path is not None:
            self._watch = asyncio.create_task(self._watch_policy())
        self.admission.start()  # always: a reload may turn lag shedding on
        if self.state is not None:
            self._keep = asyncio.create_task(self._keep_state())
        return self.port

    def reload(self) -> bool:
        """Loads, validates and installs the policy file; keeps the old one on any error."""
        assert self.policy_path is not None
        with self._reloading:
            if self._stopped:
                log.warning("policy reload ignored: the server is stopping")
                return False
            with contextlib.suppress(OSError):  # this edit is read: the watch need not
                self._mtime = self.policy_path.stat().st_mtime
            return self._reload(self.policy_path)

    def _reload(self, path: Path) -> bool:
        previous = self.engine.runtimes
        runtimes: dict[str, TaskRuntime] = {}
        try:
            policy = load_policy(path, self.default_bundle)
            runtimes = build_runtimes(policy, self.runtime_factory, previous)
            frontier = self.engine.frontier
            if self.pinned_frontier is None and policy.frontier != self.engine.policy.frontier:
                # New providers start with closed circuits; unchanged ones keep theirs.
                frontier = escalator(policy.frontier, self.metrics)
        except Exception as e:  # any failure keeps the running policy
            self._dropped += models_left_out(runtimes, previous)  # loaded for nothing
            self.reloads["rejected"] += 1
            log.error(
                "policy reload rejected, keeping version %s: %s", self.engine.policy.version, e
            )
            return False
        self.engine.swap_policy(policy, runtimes)
        self._dropped += models_left_out(previous, runtimes)
        if frontier is not self.engine.frontier:
            self._retired.append(self.engine.frontier)
        self.engine.frontier = frontier
        self._limit(policy)
        self.reloads["ok"] += 1
        log.info("policy version %s installed from %s", policy.version, path)
        return True

    async def _watch_policy(self) -> None:
        assert self.policy_path is not None
        while True:
            await asyncio.sleep(0.5)
            try:
                mtime = self.policy_path.stat().st_mtime
            except OSError:
                continue
            if mtime != self._mtime:
                await asyncio.to_thread(self.reload)
            await self._close_dropped()

    async def _close_dropped(self, everything: bool = False) -> None:
        """Closes the dropped models no request is running on (``everything``: at stop)."""
        for rt in [rt for rt in self._dropped if everything or rt.holders.count == 0]:
            self._dropped.remove(rt)
            try:
                await asyncio.to_thread(rt.close)
            except Exception:  # a model that fails to close must not stop the watch
                log.exception("closing the model of bundle %s failed", rt.task.bundle)

    async def stop(self, grace: float = 2.0) -> None:
        for task in (self._watch, self._keep):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A reload running on its thread finishes first; none starts after this.
        await asyncio.to_thread(self._reloading.acquire)
        self._stopped = True
        self._reloading.release()
        await self.admission.stop()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self.state is not None:  # after the last request: nothing is left unwritten
            await self._save_cache()
            self.reviews = None
            self.state.close()
            self.state = None
        for frontier in (*self._retired, self.engine.frontier):
            close = getattr(frontier, "aclose", None)
            if close is not None:
                await close()
        self._retired.clear()
        # The models last: no request is left to need them. Tasks of one bundle share one.
        self._dropped += models_left_out(self.engine.runtimes, {})
        await self._close_dropped(everything=True)


def build_server(
    policy: Policy,
    policy_path: Path | None = None,
    provider: ProviderConfig | None = None,
    runtime_factory: Any = in_process_runtime,
    default_bundle: Path | None = None,
    state_dir: Path | None = None,
) -> Server:
    """The front end for ``policy``: tiers loaded, engine, metrics and decision log wired."""
    runtimes = build_runtimes(policy, runtime_factory)
    first = next(iter(runtimes.values()))
    metrics = Metrics()
    pinned = FrontierConfig((provider,)) if provider is not None else None
    frontier = escalator(pinned or policy.frontier, metrics)
    engine = Engine(policy, runtimes, frontier=frontier, semantic_dim=embedding_dim(first))
    engine.on_decision = decision_logger(lambda: engine.policy, metrics)
    engine.on_failure = failure_logger(lambda: engine.policy)
    return Server(engine, policy_path, metrics, runtime_factory, pinned, default_bundle,
                  state_dir)  # fmt: skip


def escalator(config: FrontierConfig | None, metrics: Metrics) -> Escalator | None:
    """The escalation tier for ``config``, its attempts and circuit states in the metrics."""
    if config is None or not config.providers:
        return None
    esc = Escalator(config)

    def on_attempt(a: Attempt) -> None:
        metrics.frontier_attempts.labels(a.provider, a.outcome).inc()
        metrics.circuit_open.labels(a.provider).set(
            0.0 if esc.states()[a.provider] == "closed" else 1.0
        )

    esc.on_attempt = on_attempt
    return esc


def embedding_dim(runtime: TaskRuntime) -> int | None:
    """Width of the intent model's sentence embeddings (the semantic cache's dim), if any."""
    dim = getattr(runtime.backend, "dim", None)  # a remote model says so itself
    if dim is not None:
        return int(dim)
    model = getattr(runtime.backend, "model", None)
    return int(model.config.hidden_size) if model is not None else None


def build_runtimes(
    policy: Policy, factory: Any, current: dict[str, TaskRuntime] | None = None
) -> dict[str, TaskRuntime]:
    """A runtime per task. A bundle is loaded once: tasks sharing it, and reloads of a
    policy whose bundle did not change, reuse its tiers and model batcher."""
    by_bundle = {rt.task.bundle: rt for rt in (current or {}).values()}
    fresh: dict[Path, TaskRuntime] = {}
    out: dict[str, TaskRuntime] = {}
    try:
        for name, task in policy.tasks.items():
            old = fresh.get(task.bundle) or by_bundle.get(task.bundle)
            if old is not None and (
                task.bundle in fresh or old.bundle.created == _created(task.bundle)
            ):
                out[name] = old.for_task(task)
            else:
                out[name] = fresh[task.bundle] = factory(task)
    except BaseException:
        for rt in fresh.values():  # loaded for a policy that will not run: a vLLM engine
            rt.close()  # would otherwise hold its memory until the process ends
        raise
    return out


def models_left_out(old: dict[str, TaskRuntime], new: dict[str, TaskRuntime]) -> list[TaskRuntime]:
    """A runtime for each loaded bundle of ``old`` that ``new`` does not use. Tasks of
    one bundle share its load (and its ``holders``): it is listed once."""
    kept = {id(rt.holders) for rt in new.values()}
    left = {id(rt.holders): rt for rt in old.values() if id(rt.holders) not in kept}
    return list(left.values())


def _created(bundle: Path) -> str:
    try:
        return str(orjson.loads((bundle / "manifest.json").read_bytes()).get("created", ""))
    except (OSError, orjson.JSONDecodeError):
        return ""


def failure_logger(policy_of: Any) -> Any:
    """The engine's on_failure hook: the log line of an admitted request that ended
    with an error instead of a decision (same stream as the decisions)."""

    def failed(req: Request, code: str, message: str, seconds: float) -> None:
        if decisions_log.isEnabledFor(logging.INFO):
            line = {
                "request_id": req.request_id,
                "tenant": req.tenant.name,
                "task": req.task or policy_of().default_task,
                "error": code,
                "message": message,
                "policy_version": policy_of().version,
                "latency_us": int(seconds * 1e6),
            }
            decisions_log.info(orjson.dumps(line).decode())

    return failed


def decision_logger(policy_of: Any, metrics: Metrics) -> Any:
    """The engine's on_decision hook: metrics and one JSON log line per request."""

    stats = metrics.decisions

    def record(req: Request, d: Decision, seconds: float) -> None:
        escalated = d.tier == "frontier" and not d.cached
        outcome = "degraded" if d.degraded else ("cached" if d.cached else "ok")
        stats.record(d.tier, outcome, seconds, d.cache if d.cached else "", escalated,
                     req.tenant.name, d.cost_usd)  # fmt: skip
        if decisions_log.isEnabledFor(logging.INFO):
            line: dict[str, Any] = {
                "request_id": d.request_id,
                "tenant": req.tenant.name,
                "task": req.task or policy_of().default_task,
                "label": d.label,
                "tier": d.tier,
                "confidence": round(d.confidence, 4),
                "path": [
                    [s.tier, s.label, round(s.confidence, 4), s.accepted, s.micros] for s in d.path
                ],
                "cached": d.cache or None,
                "degraded": d.degraded_reason or None,
                "policy_version": d.policy_version,
                "cost_usd": d.cost_usd,
                "latency_us": int(seconds * 1e6),
                "risk_tags": d.risk_tags,
            }
            if policy_of().log_raw_text:
                line["text"] = req.text
            decisions_log.info(orjson.dumps(line).decode())

    return record


async def serve_forever(
    server: Server, address: str, metrics_port: int | None, tls: Tls | None = None
) -> None:
    port = await server.start(address, tls)
    if metrics_port is not None:
        server.metrics.serve_http(metrics_port)
    host = address.rsplit(":", 1)[0]
    # The command as this user can type it (make runs us without .venv/bin on PATH).
    cli = "tiergate" if shutil.which("tiergate") else f"{sys.executable} -m tiergate"
    scheme, ca = ("gRPC+TLS", " --tls-ca CA.pem") if tls else ("gRPC", "")
    if tls is not None and tls.client_ca is not None:
        ca += " --tls-cert CLIENT.pem --tls-key CLIENT.key"
    loop = asyncio.get_running_loop()
    print(
        f"tiergate serving {scheme} on {host}:{port} (policy {server.engine.policy.version}, "
        f"{type(loop).__module__.split('.')[0]} event loop); "
        f'try: {cli} classify --address {host}:{port}{ca} "where is my order"',
        flush=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if server.policy_path is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, server.reload))
    await stop.wait()
    print("tiergate: shutting down", flush=True)
    await server.stop()
