"""The local runtime's intent model in a process of its own (tiergate.model_process):
real child processes, the test bundle's real model."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.serving.conftest import sched_idle_allowed, thread_priorities, thread_priority
from tiergate._core import ConfigError
from tiergate.bundle import load_bundle
from tiergate.engine import MODEL_NICE, descendants, in_process_runtime
from tiergate.model_process import ModelProcess, ModelProcessError
from tiergate.policy import default_policy
from tiergate.tiers import load_intent_backend

TEXTS = ["where is my package", "I want my money back", "hello there"]


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` ends within ``within_s``: for our own child, exited (its
    status left for ModelProcess to read); for another's, gone from /proc."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # not ours: reaped by whoever adopted it
            if not Path(f"/proc/{pid}").exists():
                return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def model(full_bundle: Path) -> Iterator[ModelProcess]:
    proc = ModelProcess(full_bundle, "idle" if sched_idle_allowed() else "low")
    yield proc
    proc.close()


def test_it_answers_as_the_model_in_this_process_would(
    model: ModelProcess, full_bundle: Path
) -> None:
    here = load_intent_backend(load_bundle(full_bundle))
    logits, vectors = model.infer(TEXTS)
    want_logits, want_vectors = here.infer(TEXTS)
    assert model.labels == here.labels
    assert logits.shape == (len(TEXTS), len(here.labels))
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    assert vectors is not None
    assert want_vectors is not None
    assert model.dim == vectors.shape[1] == want_vectors.shape[1]
    np.testing.assert_allclose(vectors, want_vectors, rtol=1e-4, atol=1e-5)
    no_vectors = model.infer(TEXTS[:1], embed=False)
    assert no_vectors[1] is None
    assert no_vectors[0].shape == (1, len(here.labels))


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux's")
def test_every_thread_of_the_model_process_runs_at_the_priority_asked(
    model: ModelProcess,
) -> None:
    model.infer(TEXTS)  # PyTorch's compute threads exist once a batch has run
    assert model.pid is not None
    threads = thread_priorities(model.pid)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    if model.priority == "idle":
        wanted = (os.SCHED_IDLE, ours)
    else:
        wanted = (os.SCHED_OTHER, min(19, ours + MODEL_NICE))
    assert model.priority_got == model.priority
    assert len(threads) > 1
    assert set(threads) == {wanted}, threads


def test_a_bad_batch_fails_alone(model: ModelProcess) -> None:
    with pytest.raises(ModelProcessError, match="failed a batch of 1"):
        model.infer([None])  # type: ignore[list-item]
    assert model.infer(TEXTS)[0].shape[0] == len(TEXTS)  # the process goes on


def test_a_model_process_found_dead_is_started_again_before_the_batch(
    model: ModelProcess,
) -> None:
    first, restarts = model.pid, model.restarts
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _gone(first, 10)
    logits, _ = model.infer(TEXTS)  # not lost: a new process answers it
    assert logits.shape[0] == len(TEXTS)
    assert model.pid not in (None, first)
    assert model.restarts == restarts + 1


def test_group_signals_are_left_to_the_front_end(model: ModelProcess) -> None:
    """Ctrl-C, a hang-up or a service manager's SIGTERM to the whole process group:
    the front end stops its model (after the batch in flight), not the signal."""
    pid = model.pid
    assert pid is not None
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(pid, sig)
    time.sleep(0.5)
    assert model.infer(TEXTS)[0].shape[0] == len(TEXTS)
    assert model.pid == pid


def test_a_model_process_that_hangs_fails_its_batch_and_is_started_again(
    model: ModelProcess,
) -> None:
    pid, restarts, limit = model.pid, model.restarts, model.hang_after_s
    assert pid is not None
    model.hang_after_s = 2.0
    os.kill(pid, signal.SIGSTOP)  # stuck: alive, answering nothing
    try:
        started = time.monotonic()
        with pytest.raises(ModelProcessError, match="did not answer a batch of 3 within 2 s"):
            model.infer(TEXTS)
        assert time.monotonic() - started < 10
        assert _gone(pid, 10)
    finally:
        model.hang_after_s = limit
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert model.infer(TEXTS)[0].shape[0] == len(TEXTS)
    assert model.restarts == restarts + 1


@pytest.mark.parametrize("changed", ["labels", "created"])
def test_a_restart_refuses_a_bundle_changed_on_disk(model: ModelProcess, changed: str) -> None:
    """The front end keeps the labels, calibration and thresholds it loaded: a model
    retrained or replaced since (other labels, or the same labels from another
    training) must not be adopted behind its back."""
    loaded, created = model.labels, model.created
    if changed == "labels":  # as if the bundle on disk had been replaced
        model.labels = list(reversed(loaded))
    else:
        model.created = "an earlier training"
    try:
        assert model.pid is not None
        os.kill(model.pid, signal.SIGKILL)
        assert _gone(model.pid, 10)
        with pytest.raises(ModelProcessError, match="changed on disk since this front end"):
            model.infer(TEXTS)
        assert model.pid is None  # the child that loaded it is gone
    finally:
        model.labels, model.created = loaded, created
        model._retry_at = 0.0  # (the back-off: this test's, not the next test's)
    assert model.infer(TEXTS)[0].shape[0] == len(TEXTS)


def test_a_model_that_cannot_start_again_is_not_retried_at_every_batch(
    full_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(full_bundle, bundle)
    proc = ModelProcess(bundle, "low")
    try:
        shutil.rmtree(load_bundle(bundle).intent_path())  # gone from under it
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        assert _gone(proc.pid, 10)
        with pytest.raises(ModelProcessError, match=r"could not start: .*intent"):
            proc.infer(TEXTS)
        started = time.monotonic()
        with pytest.raises(ModelProcessError, match=r"next attempt in \d+\.\d s"):
            proc.infer(TEXTS)
        assert time.monotonic() - started < 0.5  # at once: no new interpreter
        assert proc.restarts == 1
    finally:
        proc.close()


def _batch_then_close(proc: ModelProcess, meanwhile: Callable[[], None]) -> object:
    """Runs a batch on a thread, ``meanwhile`` (which stops the child somehow), then
    ``close``, which must end it all promptly; what the batch came to."""
    outcome: list[object] = []

    def batch() -> None:
        try:
            outcome.append(proc.infer(TEXTS))
        except ModelProcessError as e:
            outcome.append(e)

    t = threading.Thread(target=batch)
    t.start()
    meanwhile()
    started = time.monotonic()
    proc.close(wait_s=1.0)
    assert time.monotonic() - started < 10
    t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1
    return outcome[0]


def test_closing_ends_a_batch_that_hangs(full_bundle: Path) -> None:
    proc = ModelProcess(full_bundle, "low")
    pid = proc.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    # (sleep: the batch waits on the stopped child)
    outcome = _batch_then_close(proc, lambda: time.sleep(0.5))
    assert isinstance(outcome, ModelProcessError), outcome
    assert _gone(pid, 10)
    with pytest.raises(ModelProcessError, match="was stopped"):
        proc.infer(TEXTS)  # no new child after close


def test_closing_while_a_restart_loads_ends_it_and_runs_no_batch(full_bundle: Path) -> None:
    proc = ModelProcess(full_bundle, "low")
    first = proc.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _gone(first, 10)
    loading: list[subprocess.Popen[bytes]] = []

    def stop_the_load() -> None:
        deadline = time.monotonic() + 30
        while proc._starting is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc._starting is not None, "no restart began"
        loading.append(proc._starting)
        os.kill(proc._starting.pid, signal.SIGSTOP)  # a load that does not end

    outcome = _batch_then_close(proc, stop_the_load)
    assert isinstance(outcome, ModelProcessError), outcome  # no batch ran after close
    assert _gone(loading[0].pid, 10)


def test_sigterm_while_the_model_loads_ends_it(full_bundle: Path) -> None:
    """A stop before the front end serves (a service manager's SIGTERM to the group)
    must not leave the model loading for a front end that is gone."""
    made: list[object] = []

    def start() -> None:
        try:
            made.append(ModelProcess(full_bundle, "low"))
        except ConfigError as e:
            made.append(e)

    before = set(descendants(os.getpid()))  # (another test's model process, say)
    t = threading.Thread(target=start)
    t.start()
    deadline = time.monotonic() + 30
    child = None
    while child is None and time.monotonic() < deadline:
        child = next(iter(set(descendants(os.getpid())) - before), None)
        time.sleep(0.01)
    assert child is not None
    os.kill(child, signal.SIGTERM)
    t.join(30)
    assert len(made) == 1
    assert isinstance(made[0], ConfigError), made
    assert "exit code -15" in str(made[0])


def test_ctrl_c_while_the_model_loads_stops_the_load(full_bundle: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from tiergate.model_process import ModelProcess; ModelProcess(Path(sys.argv[1]))"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(full_bundle)],
                          stderr=subprocess.PIPE, text=True) as front:  # fmt: skip
        child = None
        deadline = time.monotonic() + 30
        while child is None and time.monotonic() < deadline:
            kids = descendants(front.pid)
            child = kids[0] if kids else None
            time.sleep(0.05)
        assert child is not None, "the model process never started"
        # Stopped, it cannot end by itself (when its load ends and it finds the front end
        # gone): only the front end's kill ends it.
        os.kill(child, signal.SIGSTOP)
        os.kill(front.pid, signal.SIGINT)
        _, err = front.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert _gone(child, 5), "the model went on loading for a front end that had stopped"


def test_broken_model_files_are_a_clear_error(full_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "bundle"
    shutil.copytree(full_bundle, broken)
    (load_bundle(broken).intent_path() / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match=r"intent model of .* failed to load: "):
        ModelProcess(broken, "low")


def test_the_model_process_ends_with_the_front_end(full_bundle: Path) -> None:
    """A front end killed outright (no close) leaves no model process behind."""
    code = (
        "import sys, time; from pathlib import Path; "
        "from tiergate.model_process import ModelProcess; "
        "m = ModelProcess(Path(sys.argv[1])); print(m.pid, flush=True); time.sleep(600)"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(full_bundle)],
                          stdout=subprocess.PIPE, text=True) as front:  # fmt: skip
        try:
            assert front.stdout is not None
            child = int(front.stdout.readline())
            os.kill(child, 0)  # alive
        finally:
            front.kill()
    assert _gone(child, 30), "the model process outlived its front end"


def test_the_local_runtime_serves_through_it_and_closes_it(
    full_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module in the working directory must not shadow the model's libraries.
    (tmp_path / "numpy.py").write_text("raise ImportError('the wrong numpy')\n")
    monkeypatch.chdir(tmp_path)
    task = next(iter(default_policy(full_bundle).tasks.values()))
    runtime = in_process_runtime(task, model_isolation="process")
    assert isinstance(runtime.backend, ModelProcess)
    pid = runtime.backend.pid
    assert pid is not None

    async def one() -> tuple[np.ndarray, np.ndarray | None]:
        assert runtime.batcher is not None
        return await runtime.batcher.submit("where is my package", 5000.0, 250.0)

    logits, vector = asyncio.run(one())
    assert logits.shape == (len(runtime.labels),)
    assert vector is not None
    assert runtime.backend.priority == "idle"  # the default for a model in its process
    if sys.platform == "linux":  # this side's thread only pickles: not lowered
        (thread,) = [t for t in threading.enumerate() if t.name.startswith("model-")]
        assert thread.native_id is not None
        ours = thread_priority(threading.get_native_id())
        assert thread_priority(thread.native_id) == ours
    runtime.close()
    assert _gone(pid, 30), "close() left the model process running"
    runtime.close()  # twice: nothing more to do


def test_an_unknown_model_isolation_is_refused(full_bundle: Path) -> None:
    task = next(iter(default_policy(full_bundle).tasks.values()))
    with pytest.raises(ConfigError, match="model isolation 'container' is not one of"):
        in_process_runtime(task, model_isolation="container")
