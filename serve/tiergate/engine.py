"""The cascade engine: one request through the tiers, under its deadline and policy.

Order: exact cache -> rules -> hashed linear -> intent model (batched, with
the embedding) -> semantic cache -> frontier. The cheap tiers run inline in
the front-end process (microseconds; no process or Ray hop); model calls from
concurrent requests are gathered into micro-batches by :class:`MicroBatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import itertools
import logging
import os
import sys
import time
import unicodedata
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError, LinearModel, SemanticCache
from tiergate.accounting import Books, BooksUnavailable, Ledger, LocalBooks, QuotaExceeded
from tiergate.bundle import Bundle, load_bundle
from tiergate.calibration import Calibrator
from tiergate.escalation import MIN_ATTEMPT_S, Escalation
from tiergate.frontier import DEFAULT_CANDIDATES, shortlist
from tiergate.gate import GENERAL, STRICT_DOMAINS, DomainGate
from tiergate.model_process import ModelProcess
from tiergate.policy import Policy, Task, Tenant
from tiergate.tiers import LOCAL_TIERS, ORDER, RulesTier

log = logging.getLogger("tiergate.engine")

MAX_ID_CHARS = 256  # an idempotency key, a client id, a risk tag
MAX_RISK_TAGS = 32


class RequestError(Exception):
    """A request the engine refuses; ``code`` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class _RequestIds:
    """Request ids: 32 hex digits, a random per-process prefix and a counter.

    Unique across front ends and restarts like 16 random bytes, without a getrandom
    system call on every request (0.38 to 0.23 us a request, warm).
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)  # a forked child must not repeat ids

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()


@dataclass(slots=True)
class Request:
    # (ClassifierService._request passes the fields by position: keep their order.)
    text: str
    tenant: Tenant
    task: str = ""
    risk_tags: Sequence[str] = ()
    force_tier: str = ""
    max_tier: str = ""
    idempotency_key: str = ""
    client_id: str = ""
    deadline: float | None = None  # time.monotonic() by which the answer must leave
    request_id: str = field(default_factory=new_request_id)

    def remaining_ms(self) -> float:
        if self.deadline is None:
            return float("inf")
        return (self.deadline - time.monotonic()) * 1000


@dataclass(slots=True)
class Step:
    tier: str
    label: str = ""
    confidence: float = 0.0
    threshold: float = 0.0
    accepted: bool = False
    micros: int = 0
    note: str = ""


@dataclass(slots=True)
class Decision:
    label: str
    confidence: float
    tier: str
    path: list[Step]
    request_id: str
    policy_version: str
    cached: bool = False
    cache: str = ""
    cost_usd: float = 0.0
    degraded: bool = False
    degraded_reason: str = ""
    risk_tags: list[str] = field(default_factory=list)
    pending_review: bool = False
    client_id: str = ""


@dataclass(slots=True)
class _Walk:
    """One request on its way down the cascade: what a tier needs of the ones before."""

    d: Decision  # the answer so far (its path grows with each tier visited)
    rt: TaskRuntime
    action: str  # the risk route: "gate" (thresholds decide) or "escalate"
    strict: str | None  # a strict domain's tag: its threshold gates every label
    start_at: int  # ORDER's indexes of the first and last tier the hints allow
    stop_at: int
    best: tuple[float, str, str] = (-1.0, "", "")  # (confidence, label, tier) below threshold
    # The distribution of the last local tier that ran: the escalation offers the
    # frontier its likeliest labels. None: no local tier ran (offer them all).
    probs: Callable[[], npt.NDArray[Any]] | None = None
    routed_to_model: bool = False  # (route mode) the router picked the intent model
    cache_key: tuple[str, ...] | None = None  # None: this answer is not for the exact cache

    def consider(
        self, tier: str, pred: int, conf: float, micros: int, router: bool = False
    ) -> bool:
        """Whether ``tier`` answers (gate passed). A router only says where the
        request goes: it never answers, not even as a degraded fallback."""
        rt = self.rt
        if pred < 0:
            label, threshold = "", 0.0
        else:
            label = rt.labels[pred]
            if self.strict is not None:  # a strict domain's tag gates every label
                threshold = rt.gates[tier].threshold(self.strict)
            else:
                threshold = rt.label_thresholds[tier][pred]
        ok = pred >= 0 and conf >= threshold and self.action != "escalate"
        note = "risk policy escalates" if self.action == "escalate" and pred >= 0 else ""
        d = self.d
        if router:
            note = "router: to the intent model" if ok else "router: to the frontier"
            d.path.append(Step(tier, label, conf, threshold, False, micros, note))
            return ok
        d.path.append(Step(tier, label, conf, threshold, ok, micros, note))
        if pred >= 0 and conf > self.best[0]:
            self.best = (conf, label, tier)
        if ok:
            d.label, d.confidence, d.tier = label, conf, tier
        return ok


class ModelBackend(Protocol):
    """The intent model: logits over the bundle's labels and unit embeddings, batched."""

    labels: list[str]

    def infer(
        self, texts: Sequence[str], *, embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]: ...


class FrontierClient(Protocol):
    async def classify(
        self, text: str, labels: Sequence[str], hints: str, timeout_s: float | None = None
    ) -> Escalation:
        """One escalated request, answered (or given up) within ``timeout_s``."""
        ...

    def estimate_cost(self, text: str, labels: Sequence[str]) -> float: ...


def _until(req: Request) -> float | None:
    """Seconds a tier may take: a little less than the time left, so that a degraded
    answer still reaches the caller before its deadline (None: no deadline)."""
    left_s = req.remaining_ms() / 1000
    # 50 ms covers the way back through gRPC on a busy machine; short deadlines keep 90%.
    return None if left_s == float("inf") else max(left_s - min(0.05, left_s / 10), 0.0)


def normalise(text: str) -> str:
    """The exact-cache key: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


class ExactCache:
    """LRU with TTL of whole decisions, keyed by tenant, task, policy version and text."""

    def __init__(self, capacity: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.clock = clock
        self.entries: OrderedDict[tuple[str, ...], tuple[float, Decision]] = OrderedDict()

    def get(self, key: tuple[str, ...]) -> Decision | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        expires, decision = hit
        if expires < self.clock():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return decision

    def put(self, key: tuple[str, ...], decision: Decision, ttl_s: float) -> None:
        if ttl_s <= 0 or self.capacity == 0:
            return
        self.entries[key] = (self.clock() + ttl_s, decision)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class LatencyTracker:
    """Recent latencies per (task, tier); their p95 decides whether a tier fits the budget.

    Samples older than ``max_age_s`` are forgotten, so a tier that was skipped
    for being slow is tried again later instead of staying off for good.

    Every request bound for a model or the frontier asks, on the event loop; a
    percentile of a full window costs microseconds there, which the cheap
    requests queued behind it wait out. So a p95 is reused until new samples make
    up 1/20 of those held (every sample counts while fewer than 40 are), some
    expire, or ``refresh_s`` passes.
    """

    def __init__(self, window: int = 512, max_age_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 refresh_s: float = 0.1):  # fmt: skip
        self.samples: dict[str, deque[tuple[float, float]]] = {}
        self.recorded: dict[str, int] = {}  # samples ever recorded, per key
        self.known: dict[str, tuple[float, int, float]] = {}  # (when, recorded, p95)
        self.window = window
        self.max_age_s = max_age_s
        self.clock = clock
        self.refresh_s = refresh_s

    def record(self, key: str, ms: float) -> None:
        self.samples.setdefault(key, deque(maxlen=self.window)).append((self.clock(), ms))
        self.recorded[key] = self.recorded.get(key, 0) + 1

    def p95(self, key: str) -> float:
        s = self.samples.get(key)
        if not s:
            return 0.0
        now = self.clock()
        oldest = now - self.max_age_s
        expired = s[0][0] < oldest
        while s and s[0][0] < oldest:
            s.popleft()
        if len(s) < 5:
            return 0.0  # too little recent evidence: try the tier
        recorded = self.recorded[key]
        known = self.known.get(key)
        if (
            known is not None
            and not expired
            and now - known[0] < self.refresh_s
            and recorded - known[1] < max(1, len(s) // 20)
        ):
            return known[2]
        # np.percentile's linear interpolation, in plain Python: 2.7 times faster on a
        # full window (14 against 37 us), and no lazy import on the first call (its
        # np.unique loads numpy.ma: 40 ms of stalled loop, where torch is not loaded).
        ordered = sorted([ms for _, ms in s])
        pos = 0.95 * (len(ordered) - 1)
        lo = int(pos)
        t = pos - lo
        a, b = ordered[lo], ordered[min(lo + 1, len(ordered) - 1)]
        value = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)  # numpy's, to the bit
        self.known[key] = (now, recorded, value)
        return value


# A model that finishes nothing for this long (and for several batches' time) is down.
STALL_AFTER_MS = 1000.0


class Overloaded(Exception):
    """The model's queue is longer than a request may wait."""

    def __init__(self, wait_ms: float, limit_ms: float):
        super().__init__(
            f"its queue has stood {wait_ms:.0f} ms (a request may wait {limit_ms:.0f} ms)"
        )
        self.wait_ms = wait_ms


class Stalled(Exception):
    """The model has finished nothing for longer than a request may wait: it is down
    (a replica lost, a stuck batch), not busy."""


class MicroBatcher:
    """Gathers concurrent model calls into batches; ``max_inflight`` batches run at a time.

    While they run, new requests queue and leave together as soon as one ends
    (so batches grow with load). An idle batcher waits for company at
    most ``max_wait_ms``, or a quarter of the tightest budget waiting, then
    sends what it has; a full batch leaves at once.

    Overload control is by measurement, in the manner of CoDel: while the
    oldest text waiting has waited longer than a request may (``max_queue_ms``,
    or its deadline), the queue is standing, not a burst, and ``submit`` refuses
    newcomers at once (``Overloaded``) instead of letting every request behind
    them queue past its budget. A throughput estimate would need to know how
    batching speeds the model up; the age of the queue's head needs nothing,
    and reopens the door as soon as the queue drains. A queue that stands
    because no batch has finished in that time is a model that is down, not
    busy: ``Stalled``, so that the engine answers degraded instead.
    """

    def __init__(
        self,
        run: Callable[[list[str]], Awaitable[tuple[np.ndarray, np.ndarray | None]]],
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_inflight: int = 1,
    ):
        self.run = run
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        # Batches running at once: 1 for a model in this process (it uses every core);
        # more for remote replicas, so that each of them has a batch to work on.
        self.max_inflight = max_inflight
        self.inflight = 0
        # (text, its waiter, when it arrived on the loop clock)
        self.pending: list[
            tuple[str, asyncio.Future[tuple[np.ndarray, np.ndarray | None]], float]
        ] = []
        self.timer: asyncio.TimerHandle | None = None
        self.fire_at = float("inf")
        self.batches = 0
        self.progress_at = 0.0  # loop time a batch last finished (or the batcher woke up)
        self.text_s = 0.0  # model time per text (moving average over batches)
        self.running = 0  # texts in the batches now running

    def queue_age_ms(self) -> float:
        """How long the oldest text still waiting for a batch has waited."""
        now = asyncio.get_running_loop().time()
        for _, fut, since in self.pending:
            if not fut.done():
                return (now - since) * 1000
        return 0.0

    async def submit(
        self, text: str, budget_ms: float, max_queue_ms: float = float("inf")
    ) -> tuple[np.ndarray, np.ndarray | None]:
        limit = min(budget_ms, max_queue_ms)
        age = self.queue_age_ms()
        loop = asyncio.get_running_loop()
        if age > limit:
            # Stalled only when nothing finished for a second, and for four times what
            # the texts now running should take: a big batch, or a small one on a busy
            # machine, is overload, not an outage (before the first batch: no telling).
            idle_ms = (loop.time() - self.progress_at) * 1000
            expected_ms = 1000 * self.text_s * self.running
            if self.text_s and idle_ms > max(limit, STALL_AFTER_MS, 4 * expected_ms):
                raise Stalled(f"no batch has finished for {idle_ms:.0f} ms")
            raise Overloaded(age, limit)
        fut: asyncio.Future[tuple[np.ndarray, np.ndarray | None]] = loop.create_future()
        self.pending.append((text, fut, loop.time()))
        if self.busy:
            pass  # leaves with the next batch, when a running one ends
        elif len(self.pending) >= self.max_batch:
            self._flush()
        else:
            wait = min(self.max_wait_ms, max(0.0, budget_ms / 4)) / 1000
            fire_at = loop.time() + wait
            if fire_at < self.fire_at:  # a tighter deadline brings the batch forward
                if self.timer is not None:
                    self.timer.cancel()
                self.fire_at = fire_at
                self.timer = loop.call_at(fire_at, self._flush)
        return await fut

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.fire_at = float("inf")
        # Callers that gave up (deadline, cancelled call) cost the model nothing.
        self.pending = [p for p in self.pending if not p[1].done()]
        if self.busy or not self.pending:
            return
        if self.inflight == 0:  # waking up from idle: no batch was late
            self.progress_at = asyncio.get_running_loop().time()
        batch, self.pending = self.pending[: self.max_batch], self.pending[self.max_batch :]
        self.inflight += 1
        self.batches += 1
        self.running += len(batch)
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[str, asyncio.Future[Any], float]]) -> None:
        started = time.perf_counter()
        try:
            logits, vectors = await self.run([t for t, _, _ in batch])
            per_text = (time.perf_counter() - started) / len(batch)
            self.text_s = per_text if not self.text_s else 0.8 * self.text_s + 0.2 * per_text
            if len(logits) != len(batch) or (vectors is not None and len(vectors) != len(batch)):
                raise RuntimeError(f"the model answered {len(logits)} rows for {len(batch)} texts")
        except Exception as e:  # every waiter learns of the failure
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(e)
        else:
            for i, (_, fut, _) in enumerate(batch):
                if not fut.done():
                    fut.set_result((logits[i], None if vectors is None else vectors[i]))
        finally:
            self.inflight -= 1
            self.running -= len(batch)
            self.progress_at = asyncio.get_running_loop().time()
            self._flush()

    @property
    def busy(self) -> bool:
        return self.inflight >= self.max_inflight


class Holders:
    """How many requests are running on a runtime's loaded tiers and model. Shared by
    the runtime's per-task clones: a reload closes a model it dropped only at zero."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class TaskRuntime:
    """One task's loaded bundle: its tiers, gates and model batcher."""

    def __init__(self, task: Task, bundle: Bundle, backend: ModelBackend | None,
                 model_priority: str = "low"):  # fmt: skip
        check_model_priority(model_priority)
        self.task = task
        self.bundle = bundle
        self.labels = bundle.labels
        self.rules: RulesTier | None = None
        if bundle.has("rules"):
            self.rules = RulesTier(bundle.rules(), bundle.labels, bundle.rule_precision())
        self.calibrators: dict[str, Calibrator] = {
            t: bundle.calibrator(t) for t in ("linear", "intent") if bundle.has(t)
        }
        # The calibration goes into the Rust model: one call gives the calibrated
        # top-1 without a numpy round trip (the hot path of the front end).
        self.linear: LinearModel | None = (
            bundle.linear_model(calibrated=True) if bundle.has("linear") else None
        )
        self.linear_confidence = self._confidence_map(self.calibrators.get("linear"))
        self.label_domains = bundle.label_domains
        self._check_mode(task, bundle)
        self.gates, self.label_thresholds = self._gates(task, bundle)
        self._settle_task(task)
        self.backend = backend if bundle.has("intent") else None
        self.batcher: MicroBatcher | None = None
        self.embedder: MicroBatcher | None = None  # embeddings on demand (remote models)
        self.executor: ThreadPoolExecutor | None = None  # the in-process model's thread
        self.holders = Holders()
        remote = getattr(self.backend, "infer_async", None)
        if remote is not None:  # a model served elsewhere: await it, several batches at once
            inflight = getattr(backend, "max_inflight", 4)
            self.batcher = MicroBatcher(remote, max_inflight=inflight)
            embed = getattr(self.backend, "embed_async", None)
            if embed is not None:

                async def vectors(texts: list[str]) -> tuple[np.ndarray, None]:
                    return await embed(texts), None

                self.embedder = MicroBatcher(vectors, max_inflight=inflight)
        elif self.backend is not None:
            backend_ = self.backend
            # Its own thread (torch frees the GIL while it works): slow frontier calls
            # on the default pool can never delay a model batch. At a lower CPU
            # priority: when the cores are busy, the event loop answering from the
            # cheap tiers runs first, and model batches take what is left.
            # A model in a process of its own (tiergate.model_process) lowers its own
            # priority: this thread only pickles, and must not be starved holding the GIL.
            name = f"model-{task.name}"
            if isinstance(backend_, ModelProcess):
                executor = ThreadPoolExecutor(1, thread_name_prefix=name)
            else:
                executor = ThreadPoolExecutor(
                    1, thread_name_prefix=name, initializer=yield_cpu, initargs=(model_priority,)
                )
            self.executor = executor

            async def run(texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(executor, backend_.infer, texts)

            self.batcher = MicroBatcher(run)

    def close(self) -> None:
        """Stops the model's thread, after the batch it is running, and closes the
        model. For a server that takes no more requests; blocks."""
        if isinstance(self.backend, ModelProcess):
            self.backend.close()  # first: it ends a batch that hangs under the thread
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def for_task(self, task: Task) -> TaskRuntime:
        """The same loaded tiers (and batcher) under another task's settings: what a policy
        reload does for a bundle it already has, without reading the bundle again."""
        self._check_mode(task, self.bundle)
        clone = copy.copy(self)
        clone.gates, clone.label_thresholds = self._gates(task, self.bundle)
        clone._settle_task(task)
        return clone

    def _settle_task(self, task: Task) -> None:
        """``task`` and what every request reads of it, worked out once."""
        self.task = task
        self.route = task.mode == "route"
        self.rules_answer = self.rules is not None and task.uses("rules")
        self.linear_runs = self.linear is not None and (task.uses("linear") or self.route)

    @staticmethod
    def _confidence_map(calibrator: Calibrator | None) -> Callable[[float], float]:
        """The linear tier's calibrated confidence from its top-1 probability: the
        identity when the calibration is a temperature (the Rust model applied it)."""
        if calibrator is None or calibrator.method == "temperature":
            return float
        return lambda p: float(calibrator.map_confidence(p))

    @staticmethod
    def _check_mode(task: Task, bundle: Bundle) -> None:
        if task.mode == "route" and not (bundle.has("linear") and bundle.has("intent")):
            raise ConfigError(
                f"task {task.name!r}: mode route needs a linear tier (the router) and an "
                f"intent model in its bundle {task.bundle}"
            )

    @staticmethod
    def _gates(task: Task, bundle: Bundle) -> tuple[dict[str, DomainGate], dict[str, list[float]]]:
        """Each local tier's gate, and its threshold for each label (by index, through
        the label's domain): the hot path reads a list instead of two dicts."""
        gates: dict[str, DomainGate] = {}
        by_label: dict[str, list[float]] = {}
        for tier in LOCAL_TIERS:
            thresholds = dict(bundle.thresholds.get(tier, {GENERAL: 1.01}))
            thresholds.update(task.thresholds.get(tier, {}))
            # An override of "general" must not leave a stricter domain below it.
            general = thresholds.get(GENERAL, 1.01)
            thresholds = {d: max(t, general) for d, t in thresholds.items()}
            gate = gates[tier] = DomainGate(thresholds, {}, {})
            domains = bundle.label_domains
            by_label[tier] = [gate.threshold(domains.get(x, GENERAL)) for x in bundle.labels]
        return gates, by_label


RuntimeFactory = Callable[[Task], TaskRuntime]

# What the caches keep, as a version. It is part of every semantic-cache namespace, so
# the entries of a snapshot kept under other rules (by an older tiergate) are never
# served. 2: frontier answers a local tier agrees with (offered in the task's order),
# or of tasks no local tier answers. 3: the same, under percent-encoded policy versions
# (a snapshot's "x/v3" namespaces would otherwise end like v3's and be kept for good).
CACHE_RULES = 3


def _namespace_tail(policy_version: str) -> str:
    """How every semantic-cache namespace a request under this policy reads ends.

    The version is percent-encoded, so that it holds no "/": otherwise version "x/2"
    would end like version "2", and a reload to "2" would keep x/2's entries forever.
    (Most versions, "2026-11-23.1" say, read the same encoded.)"""
    return f"/{urllib.parse.quote(policy_version, safe='')}/rules{CACHE_RULES}"


# How the local model's compute (its thread, or its process, and the compute threads
# either starts, which inherit it) gives way to the front end on Linux. "low": nice
# +10, a small share of a busy core. "idle": the SCHED_IDLE class, only the cores no
# normal thread wants (CLINC bench, 2 cores, 200 req/s, three measurements each:
# cheap-tier p99 3.1-3.8 against 3.8-4.1 ms), for a host that runs nothing else: any
# busy process starves it. The default for a model in its own process; not for one
# on a thread, which while starved may hold the GIL the event loop needs.
MODEL_PRIORITIES = ("low", "idle")
MODEL_NICE = 10
# Where the local runtime's model runs: a child process of its own, or a thread of the
# front end's (tiergate.model_process says why the first is `tiergate serve`'s default).
MODEL_ISOLATIONS = ("process", "thread")


def default_model_priority(model_isolation: str) -> str:
    return "idle" if model_isolation == "process" else "low"


def check_model_priority(priority: str) -> None:
    if priority not in MODEL_PRIORITIES:
        raise ConfigError(f"model priority {priority!r} is not one of {MODEL_PRIORITIES}")


def yield_cpu(priority: str = "low") -> str:
    """Lowers the calling thread's CPU priority to ``priority`` (see MODEL_PRIORITIES);
    what it got: the priority asked, "low" or "normal" where the system refuses (with
    a warning). On Linux the scheduling class and nice value belong to a thread, not
    the process; elsewhere they would lower the whole process: leave it."""
    if sys.platform != "linux":
        return "normal"
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as e:  # refused here (some sandboxes): a nice value, then
            log.warning("the model thread cannot run in SCHED_IDLE (%s): nice +%d", e,
                        MODEL_NICE)  # fmt: skip
    try:
        os.setpriority(os.PRIO_PROCESS, 0, model_niceness())
        return "low"
    except OSError as e:
        log.warning("the model thread keeps the usual CPU priority (%s)", e)
        return "normal"


def model_niceness() -> int:
    """The nice value model compute runs at: MODEL_NICE below the calling thread's."""
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + MODEL_NICE)


def descendants(pid: int) -> list[int]:
    """The processes started from ``pid``, and from those in turn (Linux: /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if sys.platform == "linux" else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def idle_descendants() -> int | None:
    """Moves every thread of every process started from this one into SCHED_IDLE, where
    it runs only on cores nothing else wants; threads they start later inherit it. How
    many processes moved, or None where the system refuses (or has no SCHED_IDLE)."""
    if sys.platform != "linux" or not hasattr(os, "SCHED_IDLE"):
        return None
    moved = 0
    for pid in descendants(os.getpid()):
        for tid in _threads(pid):
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except PermissionError:
                return None
            except OSError:  # the thread has just ended
                continue
        moved += 1
    return moved


def _threads(pid: int | str) -> list[int]:
    """The thread ids of process ``pid`` ("self": this one); none if it has ended."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def renice_process(niceness: int) -> int:
    """Sets every thread of this process to ``niceness``; threads started later inherit
    their creator's (Linux: a nice value belongs to a thread). Returns the calling
    thread's niceness after: unchanged where the system refuses (a lower value needs
    CAP_SYS_NICE, or root)."""
    if sys.platform == "linux":
        for tid in _threads("self"):
            # Refused, or the thread has just ended: it keeps what it had.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
    return os.getpriority(os.PRIO_PROCESS, 0)


def in_process_runtime(
    task: Task, model_priority: str | None = None, model_isolation: str = "thread"
) -> TaskRuntime:
    """Loads a task's bundle for the local runtime: every tier in this process, the
    intent model on a thread of it (``model_isolation`` "thread") or in a child process
    of its own ("process", what `tiergate serve --runtime local` runs: see
    tiergate.model_process), its compute at ``model_priority`` (see MODEL_PRIORITIES;
    default: default_model_priority)."""
    if model_isolation not in MODEL_ISOLATIONS:
        raise ConfigError(f"model isolation {model_isolation!r} is not one of {MODEL_ISOLATIONS}")
    model_priority = model_priority or default_model_priority(model_isolation)
    check_model_priority(model_priority)  # before anything is loaded
    bundle = load_bundle(task.bundle)
    TaskRuntime._check_mode(task, bundle)  # before a model is loaded for nothing
    backend: ModelBackend | None = None
    if bundle.has("intent") and model_isolation == "process":
        backend = ModelProcess(task.bundle, model_priority)
    elif bundle.has("intent"):
        from tiergate.tiers import load_intent_backend

        # OpenMP's worker threads spin after each parallel region, waiting for more work.
        # Between a server's small batches that spinning takes the cores the event loop
        # needs (CLINC bench, 2 cores, 50 req/s: cheap-tier p99 9.1 -> 3.4 ms). libgomp
        # reads this once, as torch loads it; a value the user set stands.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        backend = load_intent_backend(bundle)
    try:
        return TaskRuntime(task, bundle, backend, model_priority)
    except BaseException:
        # A model (its process, a vLLM engine) must not outlive a runtime that never was.
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        raise


LAST_TIER = len(ORDER) - 1


class Engine:
    IDEMPOTENCY_KEYS = 100_000  # the newest keys kept (with their decisions)

    def __init__(
        self,
        policy: Policy,
        runtimes: dict[str, TaskRuntime],
        *,
        frontier: FrontierClient | None = None,
        ledger: Ledger | None = None,
        books: Books | None = None,
        semantic_dim: int | None = None,
        on_decision: Callable[[Request, Decision, float], None] | None = None,
    ):
        # (policy, runtimes) swap as one value: a request reads it once, so it never
        # pairs one policy version with another's thresholds (reloads run on a thread).
        self.state: tuple[Policy, dict[str, TaskRuntime]] = (policy, runtimes)
        self.frontier = frontier
        # Requests are counted in the ledger; escalations and spend too, unless ``books``
        # are shared with other front ends (then a cluster's caps hold across them).
        self.ledger = ledger or Ledger()
        self.books: Books = books or LocalBooks(self.ledger)
        self.exact = ExactCache()
        self.latency = LatencyTracker()
        self.semantic_dim = semantic_dim
        self.semantic = self._semantic_cache(policy)
        self.previous_version: str | None = None  # the policy's before the last reload
        # Idempotency keys -> the first request's decision, in flight or done: a
        # retry racing the original waits for it instead of deciding (and paying) twice.
        self.idempotent: OrderedDict[
            tuple[str, str], tuple[tuple[Any, ...], asyncio.Future[Decision]]
        ] = OrderedDict()
        # Requests routed to human review: the newest 10,000 in memory; each also
        # goes to ``on_review``, which the server points at a log line and, with a
        # state directory, a file a review system reads (see tiergate.state).
        self.review_queue: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.on_review: Callable[[dict[str, Any]], None] | None = None
        self.on_decision = on_decision
        # An admitted request that ends without a decision (an error, a cancelled
        # call) is recorded too: every admitted request leaves exactly one record.
        self.on_failure: Callable[[Request, str, str, float], None] | None = None

    @property
    def policy(self) -> Policy:
        return self.state[0]

    @property
    def runtimes(self) -> dict[str, TaskRuntime]:
        return self.state[1]

    def _semantic_cache(self, policy: Policy) -> SemanticCache | None:
        if not self.semantic_dim or policy.semantic_ttl_s <= 0:  # a TTL of 0 turns it off
            return None
        return SemanticCache(
            self.semantic_dim,
            threshold=policy.semantic_threshold,
            ttl_seconds=policy.semantic_ttl_s,
            capacity=100_000,
        )

    def swap_policy(self, policy: Policy, runtimes: dict[str, TaskRuntime]) -> None:
        """Installs a validated policy; caches are keyed by version, so none is stale.

        New semantic-cache settings take a new cache: entries of the old version
        could never be served anyway (the namespace includes the version).
        """
        old = self.policy
        if (policy.semantic_threshold, policy.semantic_ttl_s) != (
            old.semantic_threshold,
            old.semantic_ttl_s,
        ):
            self.semantic = self._semantic_cache(policy)
        if policy.version != old.version:
            self.previous_version = old.version
        self.state = (policy, runtimes)

    def servable_versions(self) -> tuple[str, ...]:
        """The policy versions whose semantic-cache entries are kept: the current one and
        the one before the last reload, so that rolling a policy back finds its entries."""
        current, previous = self.policy.version, self.previous_version
        return (current,) if previous in (None, current) else (current, previous)

    def drop_unservable_entries(self, versions: Sequence[str] = ()) -> int:
        """Drops the semantic-cache namespaces of policy versions other than ``versions``
        (default: ``servable_versions()``), and those a snapshot kept under older rules for
        what the caches keep: no request reads them, and they would hold memory (entries
        and index, one namespace per tenant, task and version: every reload adds some),
        and go into every snapshot. Their counters stay in the totals. Returns how many
        entries went."""
        cache = self.semantic
        if cache is None:
            return 0
        tails = tuple(_namespace_tail(v) for v in versions or self.servable_versions())
        dropped = 0
        for namespace, counts in cache.stats()["namespaces"].items():
            if not namespace.endswith(tails) and cache.drop_namespace(namespace):
                dropped += counts["entries"]
        return dropped

    def validate(
        self, req: Request, state: tuple[Policy, dict[str, TaskRuntime]] | None = None
    ) -> TaskRuntime:
        policy, runtimes = state or self.state
        task = req.task or policy.default_task
        runtime = runtimes.get(task)
        if runtime is None:
            raise RequestError(
                "INVALID_ARGUMENT", f"unknown task {task!r}; known: {sorted(runtimes)}"
            )
        text = req.text
        if not text or text.isspace():  # (what strip() would empty, without a copy)
            raise RequestError("INVALID_ARGUMENT", "text is empty")
        # UTF-8 takes at most 4 bytes a character: most texts need no encoding to know.
        if len(text) * 4 > policy.max_text_bytes:
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > policy.max_text_bytes:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"text is {size} bytes; the limit is {policy.max_text_bytes}",
                )
        if req.force_tier or req.max_tier or req.risk_tags or req.idempotency_key or req.client_id:
            _check_hints(req)  # most requests carry none
        return runtime

    async def classify(self, req: Request) -> Decision:
        started = time.perf_counter()
        state = self.state
        runtime = self.validate(req, state)
        policy = state[0]
        key = (req.tenant.name, req.idempotency_key)
        # This request's own future: the table may evict it (or hold a newer attempt's
        # under the same key), but whoever waits on it is answered through it.
        mine: asyncio.Future[Decision] | None = None
        if req.idempotency_key:
            asked = (req.text, req.task, tuple(req.risk_tags), req.force_tier, req.max_tier)
            first = self.idempotent.get(key)
            if first is not None:
                if first[0] != asked:
                    raise RequestError(
                        "INVALID_ARGUMENT",
                        f"idempotency key {req.idempotency_key[:64]!r} was used for a "
                        "different request (text, task or hints); use a new key",
                    )
                answer = await asyncio.shield(first[1])
                return dataclasses.replace(answer, client_id=req.client_id)
            mine = asyncio.get_running_loop().create_future()
            self.idempotent[key] = (asked, mine)
            while len(self.idempotent) > self.IDEMPOTENCY_KEYS:
                self.idempotent.popitem(last=False)
        runtime.holders.count += 1  # (no await since the state was read: a reload waits)
        try:
            self._admit(req, runtime)
            try:
                walk = self._cheap_tiers(req, runtime, policy)
                if isinstance(walk, _Walk):
                    decision = await self._costly_tiers(req, walk, policy)
                else:
                    decision = walk
            except BaseException as e:  # admitted: this request leaves a record all the same
                if self.on_failure is not None:
                    self.on_failure(req, *_failure(e), time.perf_counter() - started)
                raise
        except BaseException as e:
            if mine is not None:  # a failed first attempt may be retried under the same key
                entry = self.idempotent.get(key)
                if entry is not None and entry[1] is mine:  # not a newer attempt's
                    del self.idempotent[key]
                if not mine.done():
                    if not isinstance(e, Exception):  # cancelled: the caller gave up
                        e = RequestError(
                            "UNAVAILABLE",
                            "the first request with this idempotency key was cancelled "
                            "before it was answered; send it again",
                        )
                    mine.set_exception(e)
                    mine.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            runtime.holders.count -= 1
        if mine is not None and not mine.done():
            mine.set_result(decision)
        if self.on_decision is not None:
            self.on_decision(req, decision, time.perf_counter() - started)
        return decision

    def _admit(self, req: Request, runtime: TaskRuntime) -> None:
        """Counts the request against its tenant's quota (or refuses it) and bounds its
        deadline by the task's p99 target."""
        try:
            self.ledger.admit(req.tenant)
        except QuotaExceeded as e:
            raise RequestError(
                "RESOURCE_EXHAUSTED", str(e), retry_after_s=e.retry_after_s
            ) from None
        # A task's p99 target bounds requests that came without a deadline (or a longer one).
        if runtime.task.p99_ms is not None:
            target = time.monotonic() + runtime.task.p99_ms / 1000
            req.deadline = target if req.deadline is None else min(req.deadline, target)

    def _cheap_tiers(self, req: Request, rt: TaskRuntime, policy: Policy) -> Decision | _Walk:
        """The rules tier (and the risk route its tags set), the linear tier and the
        exact cache: the decision if one of them gives it, else the walk so far for
        the model tiers. Synchronous: most requests end here, and nothing on their way
        waits."""
        d = Decision("", 0.0, "", [], req.request_id, policy.version, client_id=req.client_id)
        start_at = ORDER.index(req.force_tier) if req.force_tier else 0
        stop_at = ORDER.index(req.max_tier) if req.max_tier else LAST_TIER
        tags = req.risk_tags
        # Rules run first, even when skipped as a tier: their risk tags route the request,
        # and they read the text as sent, which the exact cache's key does not keep.
        t0 = time.perf_counter()
        rule_pred, rule_conf = -1, 0.0
        rules = rt.rules
        if rules is not None:
            m = rules.rules.match(req.text)
            raised = m.risk_tags
            if raised:
                tags = sorted(set(tags) | set(raised))
            rule_id = m.rule_id
            if rule_id is not None:
                label = m.label
                if label is not None:
                    rule_pred = rules.label_index[label]
                    rule_conf = rules.precision.get(rule_id, m.confidence or 0.0)
        action, strict = "gate", None
        if tags:
            d.risk_tags = tags = list(tags)
            action, why = policy.risk_action(tags)
            if action == "review":
                return self._review(req, d, why or "", t0, policy, rt.task.name)
            strict = next((t for t in STRICT_DOMAINS if t in tags), None)
        walk = _Walk(d, rt, action, strict, start_at, stop_at)

        if (
            rt.rules_answer
            and start_at == 0
            and walk.consider("rules", rule_pred, rule_conf, _us(t0))
        ):
            return d
        # Routing: the linear tier does not answer; its confidence picks the one tier
        # that will, the intent model (confident) or the frontier (not).
        linear = rt.linear
        if linear is not None and rt.linear_runs and start_at <= 1 <= stop_at:
            walk.probs = lambda: linear.proba(req.text)  # (only if needed)
            t0 = time.perf_counter()
            # A text of which training saw no feature (emoji, symbols, unseen words)
            # scores the intercepts alone, the same for all such texts: the tier
            # abstains (-1) rather than answer them all with one confident label.
            lin_pred, prob = linear.top1(req.text, min_known=1)
            lin_conf = rt.linear_confidence(prob)
            if rt.route:
                walk.routed_to_model = walk.consider("linear", lin_pred, lin_conf, _us(t0), True)
            elif lin_pred < 0:
                d.path.append(Step("linear", micros=_us(t0), note="no feature it knows"))
            elif walk.consider("linear", lin_pred, lin_conf, _us(t0)):
                return d

        # The exact cache holds the answers of the tiers after this point (see _finish),
        # so it sits here: the rules and linear tiers' answers never pay for its key.
        # It holds plain answers only. A risk tag (the client's, or one the rules raise
        # on this wording: "sue  you" and "sue you" share a key) can change the route,
        # to review say; a forced tier skips the tiers before it. Such requests neither
        # read the cache nor write to it.
        if not req.force_tier and not tags:
            walk.cache_key = (req.tenant.name, rt.task.name, policy.version, normalise(req.text))
            hit = self.exact.get(walk.cache_key)
            if hit is not None:
                step = Step("exact_cache", hit.label, hit.confidence, 0.0, True, 0, "exact match")
                d.path.append(step)
                d.label, d.confidence, d.tier = hit.label, hit.confidence, hit.tier
                d.cached, d.cache, d.pending_review = True, "exact", hit.pending_review
                return d
        return walk

    async def _costly_tiers(self, req: Request, walk: _Walk, policy: Policy) -> Decision:
        """The intent model, the semantic cache and the frontier, after the cheap tiers
        passed the request on."""
        d, rt, path = walk.d, walk.rt, walk.d.path
        start_at, stop_at, action = walk.start_at, walk.stop_at, walk.action
        vector = None
        # (force_tier=intent skips the router and goes to the model, as in a cascade.)
        routed = walk.routed_to_model or not rt.route or start_at >= 2
        use_model = rt.task.uses("intent") and routed
        if rt.batcher is not None and use_model and start_at <= 2 and stop_at >= 2:
            left = req.remaining_ms()
            why = self._too_slow("intent", left, rt)
            if why:
                path.append(Step("intent", note=f"skipped: {why}"))
                if rt.task.on_skip == "degrade" or stop_at < 3:
                    return self._degrade(d, walk.best, f"latency budget: {why}")
            else:
                t0 = time.perf_counter()
                try:
                    # A model that hangs (a replica lost, a stuck batch) must not take the
                    # request past its deadline: stop in time to answer degraded.
                    logits, vector = await asyncio.wait_for(
                        rt.batcher.submit(req.text, left, policy.max_queue_ms), _until(req)
                    )
                except Overloaded as e:  # more work than the model can do in time
                    self.ledger.unadmit(req.tenant)  # ours to refuse, not the tenant's quota
                    raise RequestError(
                        "RESOURCE_EXHAUSTED",
                        f"the intent model is overloaded: {e}; retry later",
                        retry_after_s=e.wait_ms / 1000,
                    ) from None
                except TimeoutError:
                    path.append(Step("intent", note="no answer within the request's deadline"))
                    return self._degrade(d, walk.best, "intent model did not answer in time")
                except Stalled as e:
                    path.append(Step("intent", note=f"not answering: {e}"))
                    return self._degrade(d, walk.best, "intent model not answering")
                except Exception as e:  # the tier is down: answer from what we have
                    path.append(Step("intent", note=f"failed: {type(e).__name__}: {e}"))
                    return self._degrade(d, walk.best, "intent model unavailable")
                self.latency.record(f"{rt.task.name}/intent", (time.perf_counter() - t0) * 1000)
                calibrator = rt.calibrators["intent"]
                mix = None
                if calibrator.mix > 0 and rt.linear is not None:
                    mix = rt.linear.proba(req.text)
                calibrated, pred, conf = calibrator.one(logits, mix)
                walk.probs = lambda: calibrated
                accepted = walk.consider("intent", pred, conf, _us(t0))
                if rt.route and not accepted and pred >= 0:
                    # Routed here: the model's answer stands whatever its confidence.
                    step = path[-1]
                    step.accepted, step.note = True, "routed: answers below its threshold too"
                    d.label, d.confidence, d.tier = step.label, step.confidence, "intent"
                    accepted = True
                if accepted:
                    return self._finish(d, walk.cache_key, rt, policy)

        namespace = f"{req.tenant.name}/{rt.task.name}{_namespace_tail(policy.version)}"
        if (
            vector is None
            and rt.embedder is not None
            and self.semantic is not None
            and action != "escalate"
        ):
            # A remote model embeds on demand: only requests heading for the semantic
            # cache and the frontier pay for an embedding, not the ones it decides.
            try:
                embedding = rt.embedder.submit(req.text, req.remaining_ms(), policy.max_queue_ms)
                vector = (await asyncio.wait_for(embedding, _until(req)))[0]
            except Exception as e:  # no embedding: no semantic cache, nothing worse
                path.append(Step("semantic_cache", note=f"embedding failed: {e}"))
        if self.semantic is not None and vector is not None and action != "escalate":
            hit2 = self.semantic.get(namespace, vector)
            if hit2 is not None:
                label = hit2[0].decode()
                path.append(
                    Step(
                        "semantic_cache",
                        label,
                        float(hit2[1]),
                        policy.semantic_threshold,
                        True,
                        0,
                        f"similarity {hit2[1]:.3f}",
                    )
                )
                d.label, d.confidence, d.tier, d.cached, d.cache = (
                    label,
                    float(hit2[1]),
                    "frontier",
                    True,
                    "semantic",
                )
                return d

        if stop_at < 3:
            return self._degrade(
                d, walk.best, f"hints.max_tier={req.max_tier} stops before the frontier"
            )
        offered = rt.labels
        if walk.probs is not None:
            # (A provider pinned on the command line comes without the policy's section.)
            k = policy.frontier.candidates if policy.frontier is not None else DEFAULT_CANDIDATES
            offered = shortlist(walk.probs(), rt.labels, k)
        return await self._escalate(
            req, d, rt, policy, walk.best, walk.cache_key, namespace, vector, offered
        )

    async def _escalate(self, req: Request, d: Decision, rt: TaskRuntime, policy: Policy,
                        best: tuple[float, str, str], cache_key: tuple[str, ...] | None,
                        namespace: str, vector: np.ndarray | None,
                        offered: Sequence[str]) -> Decision:  # fmt: skip
        if self.frontier is None:
            d.path.append(Step("frontier", note="no frontier provider configured"))
            return self._degrade(d, best, "frontier tier not configured")
        why = self._too_slow("frontier", req.remaining_ms(), rt)
        if why:
            d.path.append(Step("frontier", note=f"skipped: {why}"))
            return self._degrade(d, best, f"latency budget: {why}")
        estimate = self.frontier.estimate_cost(req.text, offered)
        try:
            reservation = await self.books.reserve_escalation(
                req.tenant, estimate, req.request_id, _until(req)
            )
        except QuotaExceeded as e:
            if req.tenant.on_quota == "reject":
                raise RequestError(
                    "RESOURCE_EXHAUSTED", str(e), retry_after_s=e.retry_after_s
                ) from None
            d.path.append(Step("frontier", note=f"quota: {e}"))
            return self._degrade(d, best, f"quota reached: {e}")
        except BooksUnavailable as e:  # nothing may be spent that the books cannot see
            d.path.append(Step("frontier", note=f"skipped: {e}"))
            return self._degrade(d, best, "spend books unavailable")
        limit = _until(req)
        if limit is not None and limit < MIN_ATTEMPT_S:  # the reservation took the time left
            self.books.settle(reservation, 0.0)
            d.path.append(Step("frontier", note="skipped: no time left after the reservation"))
            return self._degrade(d, best, "latency budget: no time left for the frontier")
        t0 = time.perf_counter()
        tried = ""
        hints = ", ".join(f"{s.tier}: {s.label} ({s.confidence:.2f})" for s in d.path if s.label)
        cost = estimate  # charged if the call is cancelled mid-way: it may have been paid
        # The escalator plans its attempts within a slightly shorter limit, so that it
        # ends them itself and charges only what it tried; wait_for is the backstop
        # for an escalator that does not (charged at the whole reservation).
        inner = None if limit is None else limit - min(0.05, limit / 10)
        try:
            result = await asyncio.wait_for(
                self.frontier.classify(req.text, offered, hints, inner), limit
            )
            label, cost, error = result.label, result.cost, result.error
            tried = result.summary()
        except TimeoutError:
            label, error = None, "no answer within the request's deadline"
            if best[0] < 0:  # nothing else to answer with: the deadline is what failed
                raise RequestError(  # (settled in `finally`)
                    "DEADLINE_EXCEEDED", "no tier answered within the deadline"
                ) from None
        except Exception as e:  # a provider bug must not leak the reservation or crash
            label, cost, error = None, 0.0, f"{type(e).__name__}: {e}"
        finally:
            self.books.settle(reservation, cost)
        self.latency.record(f"{rt.task.name}/frontier", (time.perf_counter() - t0) * 1000)
        d.cost_usd = cost
        if label is None:
            # The escalator stops its attempts in time: out of time is its usual failure.
            if inner is not None and time.perf_counter() - t0 >= inner - MIN_ATTEMPT_S:
                error = f"no answer within the request's deadline ({error})"
                if best[0] < 0:  # nothing else to answer with: the deadline is what failed
                    raise RequestError("DEADLINE_EXCEEDED", f"no tier answered: {error}")
            d.path.append(Step("frontier", note=f"failed: {error}", micros=_us(t0)))
            return self._degrade(d, best, f"frontier failed: {error}")
        if len(offered) < len(rt.labels):
            tried = f"{tried}; offered {len(offered)} of {len(rt.labels)} labels"
        d.path.append(Step("frontier", label, 1.0, 0.0, True, _us(t0), tried))
        d.label, d.confidence, d.tier = label, 1.0, "frontier"
        # The frontier says nothing of how sure it is: its answer is kept for reuse only
        # when a local tier's top label agrees (a router's too), or when no local tier
        # named one (a frontier-only task: nothing to check it against), or when the
        # policy keeps every answer.
        local = {s.label for s in d.path if s.label and s.tier in LOCAL_TIERS}
        corroborated = label in local or not local or policy.cache_min_confidence <= 0
        cacheable = label not in rt.task.no_cache_labels and corroborated
        if self.semantic is not None and vector is not None and cacheable:
            self.semantic.put(namespace, vector, label.encode())
        if cacheable and cache_key is not None:
            self.exact.put(cache_key, d, policy.exact_ttl_s)
        return d

    def _too_slow(self, tier: str, left_ms: float, rt: TaskRuntime) -> str | None:
        """Why ``tier`` must be skipped, or None when it may run.

        Every tier must fit the time left. The model tiers must also fit the
        task's p95 target; the frontier is exempt (escalations are slow by
        nature, and ``on_skip: escalate`` sends requests there on purpose).
        """
        need = self.latency.p95(f"{rt.task.name}/{tier}")
        if need > left_ms:
            return f"{tier} p95 {need:.1f} ms exceeds the {left_ms:.1f} ms left"
        target = rt.task.p95_ms
        if target is not None and need > target and tier != "frontier":
            return f"{tier} p95 {need:.1f} ms exceeds the task's p95 target of {target:g} ms"
        return None

    def _finish(
        self, d: Decision, key: tuple[str, ...] | None, rt: TaskRuntime, policy: Policy
    ) -> Decision:
        if key is None:  # a request whose answer is not for everyone (see _cheap_tiers)
            return d
        # Only the model's answers are kept. Recomputing a rules or linear answer costs
        # what a lookup does, and the room goes to answers that cost model time. And
        # only sure ones: a cache repeats an answer, right or wrong, to every later asker.
        if (
            d.tier == "intent"
            and d.label not in rt.task.no_cache_labels
            and d.confidence >= policy.cache_min_confidence
        ):
            self.exact.put(key, d, policy.exact_ttl_s)
        return d

    def _degrade(self, d: Decision, best: tuple[float, str, str], reason: str) -> Decision:
        d.degraded, d.degraded_reason = True, reason
        if best[0] < 0:
            raise RequestError("UNAVAILABLE", f"no tier could answer ({reason})")
        d.confidence, d.label, d.tier = best
        return d

    def _review(self, req: Request, d: Decision, tag: str, t0: float, policy: Policy,
                task: str) -> Decision:  # fmt: skip
        # The request's own policy and task: a reload may have installed another since.
        record: dict[str, Any] = {
            "request_id": req.request_id,
            "time": round(time.time(), 3),
            "tenant": req.tenant.name,
            "task": task,
            "risk_tags": d.risk_tags,
            "routed_by": tag,
            "policy_version": policy.version,
        }
        if req.client_id:
            record["client_id"] = req.client_id
        if policy.log_raw_text:
            record["text"] = req.text
        self.review_queue.append(record)
        if self.on_review is not None:
            self.on_review(record)
        d.path.append(
            Step("review", "pending_review", 0.0, 0.0, True, _us(t0), f"risk tag {tag!r}")
        )
        d.label, d.tier, d.pending_review = "pending_review", "review", True
        return d


def _failure(e: BaseException) -> tuple[str, str]:
    """(status code, message) of a request that ended without a decision."""
    if isinstance(e, RequestError):
        return e.code, e.message
    if isinstance(e, asyncio.CancelledError):
        return "CANCELLED", "the call ended before a decision"
    return "INTERNAL", repr(e)


def _check_hints(req: Request) -> None:
    """Refuses hints that name no tier or leave none, and ids or tags over their limits."""
    for name, tier in (("force_tier", req.force_tier), ("max_tier", req.max_tier)):
        if tier and tier not in ORDER:
            raise RequestError("INVALID_ARGUMENT", f"hints.{name} {tier!r} is not one of {ORDER}")
    if req.force_tier and req.max_tier and ORDER.index(req.force_tier) > ORDER.index(req.max_tier):
        raise RequestError(
            "INVALID_ARGUMENT",
            f"hints.force_tier {req.force_tier!r} comes after hints.max_tier "
            f"{req.max_tier!r}: no tier is left to answer",
        )
    # Kept per request (keys, review records, logs): bounded like the text.
    for name, value in (("idempotency_key", req.idempotency_key), ("client_id", req.client_id)):
        if len(value) > MAX_ID_CHARS:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"{name} is {len(value)} characters; the limit is {MAX_ID_CHARS}",
            )
    if len(req.risk_tags) > MAX_RISK_TAGS or any(len(t) > MAX_ID_CHARS for t in req.risk_tags):
        raise RequestError(
            "INVALID_ARGUMENT",
            f"hints.risk_tags: at most {MAX_RISK_TAGS} tags of at most {MAX_ID_CHARS} characters",
        )


def _us(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1e6)
