"""The local runtime's intent model in a process of its own (tiergate.model_process):
real child processes, the test bundle's real model."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.serving.conftest import sched_idle_allowed, thread_priorities
from tiergate._core import ConfigError
from tiergate.bundle import load_bundle
from tiergate.engine import MODEL_NICE, in_process_runtime
from tiergate.model_process import ModelProcess, ModelProcessError
from tiergate.policy import default_policy
from tiergate.tiers import load_intent_backend

TEXTS = ["where is my package", "I want my money back", "hello there"]


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` ends within ``within_s``: gone, or a zombie (ended, its
    status left for its parent to read, which ModelProcess does)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
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
    # ... and ours is untouched: the front end's threads keep their priority
    assert set(thread_priorities(os.getpid())) == {(os.SCHED_OTHER, ours)}


def test_a_bad_batch_fails_alone(model: ModelProcess) -> None:
    with pytest.raises(ModelProcessError, match="failed a batch of 1"):
        model.infer([None])  # type: ignore[list-item]
    assert model.infer(TEXTS)[0].shape[0] == len(TEXTS)  # the process goes on


def test_a_model_process_that_dies_is_started_again(model: ModelProcess) -> None:
    first = model.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _gone(first, 10)
    with pytest.raises(ModelProcessError, match=r"ended \(exit code -9\)"):
        model.infer(TEXTS)
    logits, _ = model.infer(TEXTS)  # a new process
    assert logits.shape[0] == len(TEXTS)
    assert model.pid not in (None, first)
    assert model.restarts == 1


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


def test_the_local_runtime_serves_through_it_and_closes_it(full_bundle: Path) -> None:
    task = next(iter(default_policy(full_bundle).tasks.values()))
    runtime = in_process_runtime(task, model_priority="low", model_isolation="process")
    assert isinstance(runtime.backend, ModelProcess)
    pid = runtime.backend.pid
    assert pid is not None

    async def one() -> tuple[np.ndarray, np.ndarray | None]:
        assert runtime.batcher is not None
        return await runtime.batcher.submit("where is my package", 5000.0, 250.0)

    logits, vector = asyncio.run(one())
    assert logits.shape == (len(runtime.labels),)
    assert vector is not None
    runtime.close()
    assert _gone(pid, 30), "close() left the model process running"
    runtime.close()  # twice: nothing more to do


def test_an_unknown_model_isolation_is_refused(full_bundle: Path) -> None:
    task = next(iter(default_policy(full_bundle).tasks.values()))
    with pytest.raises(ConfigError, match="model isolation 'container' is not one of"):
        in_process_runtime(task, model_isolation="container")
