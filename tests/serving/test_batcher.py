"""MicroBatcher: concurrent model calls share batches, deadlines pull batches forward."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.serving.conftest import sched_idle_allowed, thread_priority, write_policy
from tiergate._core import ConfigError
from tiergate.engine import (
    MODEL_NICE,
    MicroBatcher,
    Overloaded,
    Request,
    Stalled,
    TaskRuntime,
    in_process_runtime,
    yield_cpu,
)
from tiergate.policy import Task, default_policy, load_policy
from tiergate.server import ANONYMOUS, build_server


class Model:
    """Stands in for the model: logits encode each text's number; records batch sizes."""

    def __init__(self, seconds: float = 0.02, fail: bool = False):
        self.seconds = seconds
        self.fail = fail
        self.sizes: list[int] = []

    async def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        self.sizes.append(len(texts))
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("replica died")
        return np.array([[float(t)] for t in texts]), np.array([[float(t)] for t in texts])


def test_concurrent_calls_share_batches_and_get_their_own_answers() -> None:
    model = Model()

    async def run() -> list[float]:
        b = MicroBatcher(model, max_batch=64, max_wait_ms=1.0)
        out = await asyncio.gather(*(b.submit(str(i), budget_ms=1000) for i in range(50)))
        return [float(logits[0]) for logits, _ in out]

    assert asyncio.run(run()) == [float(i) for i in range(50)]
    assert sum(model.sizes) == 50
    assert len(model.sizes) <= 3  # one batch at a time: the rest wait and leave together


def test_full_batches_leave_at_once_and_never_exceed_the_cap() -> None:
    model = Model(seconds=0.0)

    async def run() -> None:
        b = MicroBatcher(model, max_batch=8, max_wait_ms=10_000)
        await asyncio.wait_for(asyncio.gather(*(b.submit(str(i), 1e9) for i in range(20))), 5)

    asyncio.run(run())
    assert max(model.sizes) <= 8
    assert sum(model.sizes) == 20


def test_a_tight_deadline_brings_the_batch_forward() -> None:
    model = Model(seconds=0.0)

    async def run() -> float:
        b = MicroBatcher(model, max_batch=64, max_wait_ms=5_000)
        started = time.perf_counter()
        slow = asyncio.ensure_future(b.submit("1", budget_ms=60_000))  # would wait 5 s
        await asyncio.sleep(0)
        await b.submit("2", budget_ms=8)  # waits at most 2 ms: both leave together
        await slow
        return time.perf_counter() - started

    assert asyncio.run(run()) < 1.0
    assert model.sizes == [2]


def test_a_failure_reaches_every_waiter_and_the_batcher_recovers() -> None:
    model = Model(fail=True)

    async def run() -> None:
        b = MicroBatcher(model, max_wait_ms=1.0)
        results = await asyncio.gather(
            *(b.submit(str(i), 100) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        model.fail = False
        logits, _ = await b.submit("7", 100)
        assert float(logits[0]) == 7.0

    asyncio.run(run())
    assert model.sizes[-1] == 1


def test_a_standing_queue_refuses_newcomers_at_once_and_reopens_when_drained() -> None:
    # 4 texts per 0.1 s batch: a burst of 20 takes 0.5 s to drain.
    model = Model(seconds=0.1)
    b = MicroBatcher(model, max_batch=4, max_wait_ms=1)

    async def main() -> None:
        burst = [asyncio.ensure_future(b.submit(str(i), 1000, max_queue_ms=150)) for i in range(20)]
        await asyncio.sleep(0.25)  # the queue's head has now waited ~0.15 s or more
        late = await asyncio.gather(
            *(b.submit(str(i), 1000, max_queue_ms=150) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(x, Overloaded) for x in late), late
        assert all(x.wait_ms > 150 for x in late if isinstance(x, Overloaded))
        # A newcomer with less time left than the queue has stood is refused too.
        with pytest.raises(Overloaded):
            await b.submit("9", budget_ms=100)
        answers = await asyncio.gather(*burst)  # the burst itself was admitted whole
        assert [int(a[0][0]) for a in answers] == list(range(20))
        # Drained: the door is open again.
        assert int((await b.submit("7", 1000, max_queue_ms=150))[0][0]) == 7

    asyncio.run(main())
    assert sum(model.sizes) == 21  # no refused text reached the model


def test_callers_that_gave_up_cost_the_model_nothing() -> None:
    model = Model(seconds=0.05)
    b = MicroBatcher(model, max_batch=8, max_wait_ms=1)

    async def main() -> None:
        first = asyncio.ensure_future(b.submit("0", budget_ms=1000))
        await asyncio.sleep(0.01)  # the first batch is running: the next ones queue
        waiting = [asyncio.ensure_future(b.submit(str(i), budget_ms=1000)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        waiting[1].cancel()  # its caller hit its deadline
        await first
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)

    asyncio.run(main())
    assert model.sizes == [1, 2]


def test_a_queue_behind_a_model_that_finishes_nothing_is_a_stall_not_overload() -> None:
    model = Model(seconds=0.01)
    b = MicroBatcher(model, max_batch=4, max_wait_ms=1)

    async def main() -> None:
        await b.submit("0", 5000)  # a healthy batch: 10 ms a text
        model.seconds = 60  # then the replica is lost: calls never come back
        stuck = asyncio.ensure_future(b.submit("1", 5000))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit("2", 5000))
        await asyncio.sleep(0.3)
        with pytest.raises(Overloaded):  # a queue 0.3 s old: could still be a slow batch
            await b.submit("3", 5000, max_queue_ms=100)
        await asyncio.sleep(0.8)  # over a second without progress: down, not busy
        with pytest.raises(Stalled, match="no batch has finished"):
            await b.submit("4", 5000, max_queue_ms=100)
        stuck.cancel()
        queued.cancel()

    asyncio.run(main())


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux's")
@pytest.mark.parametrize("priority", ["low", "idle"])
def test_the_in_process_model_runs_below_the_event_loops_cpu_priority(
    full_bundle: Path, priority: str
) -> None:
    """When the cores are busy, the loop answering from the cheap tiers runs first: the
    model's thread, and every thread it starts (PyTorch's compute team), runs at nice
    +10 ("low", the default), or in the SCHED_IDLE class ("idle")."""
    if priority == "idle" and not sched_idle_allowed():
        pytest.skip("this system does not let a thread enter SCHED_IDLE")
    policy = default_policy(full_bundle)
    runtime = in_process_runtime(next(iter(policy.tasks.values())), model_priority=priority)
    assert runtime.batcher is not None
    before, started = _threads(), set(threading.enumerate())  # the model's thread: at
    # its first batch, and so is PyTorch's compute team for it

    async def one() -> None:
        assert runtime.batcher is not None
        await runtime.batcher.submit("where is my package", 5000.0, 250.0)

    asyncio.run(one())
    try:
        model = [t for t in set(threading.enumerate()) - started if t.name.startswith("model-")]
        assert len(model) == 1
        assert model[0].native_id is not None
        ours = thread_priority(threading.get_native_id())
        assert ours == (os.SCHED_OTHER, os.getpriority(os.PRIO_PROCESS, 0))  # as before
        if priority == "idle":
            wanted = (os.SCHED_IDLE, ours[1])
        else:
            wanted = (os.SCHED_OTHER, min(19, ours[1] + MODEL_NICE))
        assert thread_priority(model[0].native_id) == wanted
        for tid in _threads() - before:  # started since: by the model's thread
            assert thread_priority(tid) == wanted, f"thread {tid}"
    finally:
        runtime.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux's")
def test_a_refused_sched_idle_falls_back_to_nice_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    got: list[tuple[str, tuple[int, int]]] = []

    def model_thread() -> None:  # a throwaway thread: the priority stays with it
        got.append((yield_cpu("idle"), thread_priority(threading.get_native_id())))

    with caplog.at_level(logging.WARNING, logger="tiergate.engine"):
        t = threading.Thread(target=model_thread)
        t.start()
        t.join()
    ours = thread_priority(threading.get_native_id())
    assert got == [("low", (os.SCHED_OTHER, min(19, ours[1] + MODEL_NICE)))]
    assert "cannot run in SCHED_IDLE" in caplog.text
    assert ours == (os.SCHED_OTHER, os.getpriority(os.PRIO_PROCESS, 0))  # ours: as before


def test_an_unknown_model_priority_is_refused(full_bundle: Path) -> None:
    task = next(iter(default_policy(full_bundle).tasks.values()))
    with pytest.raises(ConfigError, match="model priority 'realtime' is not one of"):
        in_process_runtime(task, model_priority="realtime")


@pytest.mark.skipif(sys.platform != "linux", reason="PyTorch's Linux wheels use libgomp")
@pytest.mark.parametrize(("preset", "spin"), [(None, "0"), ("ACTIVE", None)])
def test_the_in_process_models_openmp_threads_sleep_between_batches(
    full_bundle: Path, preset: str | None, spin: str | None
) -> None:
    """Spinning OpenMP threads would take the cores the event loop needs. libgomp reads
    the setting once, as torch loads it: a fresh process shows what it read (its own
    report on stderr). A value the user set stands."""
    code = (
        "import sys; from pathlib import Path; from tiergate.engine import in_process_runtime; "
        "from tiergate.policy import default_policy; "
        "in_process_runtime(next(iter(default_policy(Path(sys.argv[1])).tasks.values())))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    run = subprocess.run([sys.executable, "-c", code, str(full_bundle)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    spins = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", run.stderr)
    assert spins, run.stderr[-2000:]  # libgomp loaded and reported (each copy loaded)
    if spin is not None:
        # torch's copy, loaded after the setting, reads it. (Another library's copy loaded
        # earlier in the process, if any, keeps its own default: seen under `make test`.)
        assert spin in spins
    else:
        assert all(int(n) > 0 for n in spins)  # ACTIVE: the user's choice, spinning


def test_a_stopped_server_leaves_no_model_thread_behind(full_bundle: Path) -> None:
    """Stopping the front end ends the in-process model's thread (after its batch)."""
    policy = default_policy(full_bundle)
    before = set(threading.enumerate())

    async def serve_one() -> None:
        server = build_server(policy)
        await server.start("127.0.0.1:0")
        request = Request("where is my package", ANONYMOUS, force_tier="intent")
        assert (await server.engine.classify(request)).label
        model = [t for t in set(threading.enumerate()) - before if t.name.startswith("model-")]
        assert len(model) == 1, "the request must have started the model's thread"
        await server.stop(0.1)
        model[0].join(10)
        assert not model[0].is_alive()

    asyncio.run(serve_one())


def test_a_reload_closes_the_model_it_dropped_once_no_request_runs_on_it(
    full_bundle: Path, tmp_path: Path
) -> None:
    """A reload to another bundle closes the first bundle's model (its thread, and for a
    zero-shot bundle a vLLM engine), but not under a request still running on it."""
    second = tmp_path / "second-bundle"
    shutil.copytree(full_bundle, second)
    closing: list[Path] = []  # bundles whose runtime close() was called, in order
    entered, release = threading.Event(), threading.Event()

    def factory(task: Task) -> TaskRuntime:
        rt = in_process_runtime(task)
        assert rt.backend is not None
        infer, close = rt.backend.infer, rt.close

        def held_infer(texts: list[str]) -> Any:
            entered.set()
            release.wait(30)
            return infer(texts)

        def recorded_close() -> None:
            closing.append(task.bundle)
            close()

        rt.backend.infer = held_infer  # type: ignore[method-assign]
        rt.close = recorded_close  # type: ignore[method-assign]
        return rt

    path = write_policy(tmp_path / "p.yaml", full_bundle)

    async def scenario() -> None:
        server = build_server(load_policy(path), path, runtime_factory=factory)
        await server.start("127.0.0.1:0")
        try:
            request = Request("where is my package", ANONYMOUS, force_tier="intent")
            running = asyncio.create_task(server.engine.classify(request))
            assert await asyncio.to_thread(entered.wait, 30), "the model never got the request"
            write_policy(path, second)
            assert await asyncio.to_thread(server.reload)
            await asyncio.sleep(1.5)  # three ticks of the policy watch
            assert closing == [], "the dropped model was closed under a running request"
            release.set()
            answer = await running
            assert any(s.tier == "intent" and s.label for s in answer.path), answer.path
            for _ in range(100):
                if closing:
                    break
                await asyncio.sleep(0.1)
            assert closing == [full_bundle.resolve()], "the dropped model was never closed"
        finally:
            release.set()
            await server.stop(0.1)
        assert closing == [full_bundle.resolve(), second.resolve()]  # stop closes the new one

    asyncio.run(scenario())


class Loads:
    """A runtime factory that records what it loaded and what got closed (a model
    loading takes ``seconds``, so that two reloads can overlap)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.loaded: list[TaskRuntime] = []
        self.closed: list[TaskRuntime] = []

    def __call__(self, task: Task) -> TaskRuntime:
        time.sleep(self.seconds)
        rt = in_process_runtime(task)
        close = rt.close

        def recorded_close() -> None:
            self.closed.append(rt)
            close()

        rt.close = recorded_close  # type: ignore[method-assign]
        self.loaded.append(rt)
        return rt


def test_reloads_run_one_at_a_time_and_every_model_is_closed_once(
    linear_bundle: Path, tmp_path: Path
) -> None:
    """Two reloads at once (an edit seen by the watch, a SIGHUP) must not both load the
    new bundle: the copy installed first would be replaced without ever being closed."""
    second = tmp_path / "second-bundle"
    shutil.copytree(linear_bundle, second)
    loads = Loads(seconds=0.3)
    path = write_policy(tmp_path / "p.yaml", linear_bundle)

    async def scenario() -> None:
        server = build_server(load_policy(path), path, runtime_factory=loads)
        await server.start("127.0.0.1:0")
        try:
            write_policy(path, second)
            both = await asyncio.gather(*(asyncio.to_thread(server.reload) for _ in range(2)))
            assert all(both)
            assert [rt.task.bundle for rt in loads.loaded] == [
                linear_bundle.resolve(),
                second.resolve(),
            ], "the new bundle was loaded twice"
        finally:
            await server.stop(0.1)
        assert sorted(map(id, loads.closed)) == sorted(map(id, loads.loaded))

    asyncio.run(scenario())


@pytest.mark.parametrize("failure", ["a task's mode", "a frontier key"])
def test_a_rejected_reload_closes_the_models_it_loaded(
    linear_bundle: Path, tmp_path: Path, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy that fails after a new bundle was loaded (a vLLM engine, say) must not
    leave that model running: each save of the broken file would start another."""
    second = tmp_path / "second-bundle"
    shutil.copytree(linear_bundle, second)
    loads = Loads()
    path = write_policy(tmp_path / "p.yaml", linear_bundle)
    broken: dict[str, Any] = {"tasks": {"intents": {"bundle": str(second)}}}
    if failure == "a task's mode":  # route needs an intent model this bundle lacks
        broken["tasks"]["other"] = {"bundle": str(linear_bundle), "mode": "route"}
    else:
        monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
        provider = {"name": "p", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                    "api_key_env": "NO_SUCH_KEY_VARIABLE"}  # fmt: skip
        broken["frontier"] = {"providers": [provider]}

    async def scenario() -> None:
        server = build_server(load_policy(path), path, runtime_factory=loads)
        await server.start("127.0.0.1:0")
        try:
            write_policy(path, linear_bundle, **broken)
            assert not await asyncio.to_thread(server.reload)
            assert server.engine.runtimes["intents"].task.bundle == linear_bundle.resolve()
            for _ in range(50):  # closed at once, or at the watch's next tick
                if loads.closed:
                    break
                await asyncio.sleep(0.1)
            assert [rt.task.bundle for rt in loads.closed] == [second.resolve()]
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())


RENICE_CHILD = """
import json, os, threading
from tiergate.engine import renice_process
started = threading.Event()
stop = threading.Event()
def idle():
    started.set()
    stop.wait()
t = threading.Thread(target=idle, daemon=True)  # a failing child still exits
t.start()
started.wait()
got = [renice_process(int(n)) for n in os.environ["NICE_STEPS"].split(",")]
tids = [int(x) for x in os.listdir("/proc/self/task")]
late = []
later = threading.Thread(target=lambda: late.append(os.getpriority(os.PRIO_PROCESS, 0)))
later.start()
later.join()
print(json.dumps({"got": got, "tids": tids, "pid": os.getpid(), "late": late}), flush=True)
input()
stop.set()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="nice values per thread are Linux's")
def test_renice_process_moves_every_thread_and_reports_a_refusal() -> None:
    """What Ray's replicas use: the model's go lower, the front end's back up (to 0),
    which needs privileges; a refusal shows in the value returned."""
    root = os.geteuid() == 0
    proc = subprocess.Popen(
        [sys.executable, "-c", RENICE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "NICE_STEPS": "7,3"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        out = json.loads(proc.stdout.readline())
        # every thread, the idle one too, at the last value the system allowed
        expected = 3 if root else 7
        assert out["got"] == [7, expected]
        assert {thread_priority(t, out["pid"])[1] for t in out["tids"]} == {expected}
        assert out["late"] == [expected]  # a thread started later inherits it
    finally:
        proc.communicate("\n", timeout=30)


IDLE_CHILD = """
import json, os, subprocess, sys
from tiergate.engine import idle_descendants
grandchild = "import sys; sys.stdin.read()"
child = (
    "import subprocess, sys, threading\\n"
    f"c = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdin=subprocess.PIPE)\\n"
    "threading.Thread(target=sys.stdin.read, daemon=True).start()\\n"
    "print(c.pid, flush=True)\\n"
    "threading.Event().wait()\\n"
)
b = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
c = int(b.stdout.readline())
moved = idle_descendants()
print(json.dumps({"moved": moved, "a": os.getpid(), "b": b.pid, "c": c}), flush=True)
try:
    input()
finally:
    os.kill(c, 9)
    b.kill()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="scheduling classes per thread are Linux's")
def test_idle_descendants_moves_the_processes_started_from_this_one() -> None:
    """What a Ray model replica does to its vLLM engines: every thread of every process
    it started, and of theirs, goes to SCHED_IDLE; the replica itself stays as it is."""
    proc = subprocess.Popen([sys.executable, "-c", IDLE_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        out = json.loads(proc.stdout.readline())
        if not sched_idle_allowed():
            assert out["moved"] is None  # refused: reported, not raised
            return
        assert out["moved"] == 2
        b_threads = os.listdir(f"/proc/{out['b']}/task")
        assert len(b_threads) >= 2  # the child's second thread moved too
        for pid in (out["b"], out["c"]):
            policies = {thread_priority(int(t), pid)[0] for t in os.listdir(f"/proc/{pid}/task")}
            assert policies == {os.SCHED_IDLE}, (pid, policies)
        own = {thread_priority(int(t), out["a"])[0] for t in os.listdir(f"/proc/{out['a']}/task")}
        assert own == {os.SCHED_OTHER}
    finally:
        proc.communicate("\n", timeout=30)
