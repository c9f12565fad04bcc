"""The intent model in a process of its own, for the local runtime.

In the front end's process the model shares the GIL with the event loop: its
tokenizer and the Python around each forward pass hold it while cheap requests
wait, and a model thread at a low CPU priority may hold it while it waits for
a core. In a child process it shares nothing but the cores, and the kernel can
give those to the front end first: SCHED_IDLE becomes safe (a starved model
delays only the requests that need it). CLINC150 bench, 2 cores, 150 req/s, five
runs each: cheap-tier p99 2.4-2.9 ms here at SCHED_IDLE, 2.8-3.2 ms on a thread.

The front end sends a batch over a pipe and waits for the answer on a thread
(``TaskRuntime``'s model thread, which holds the GIL only to pickle); texts go
one way, logits and embeddings the other, as numpy arrays. A child found dead
before a batch is started again first; one that dies during a batch, or does
not answer it within ``hang_after_s``, fails that batch (the engine answers
those requests as it does when any model fails) and is started again with the
next. A child that cannot start is tried again after a growing pause, the
batches in between failing at once. A restarted child must serve the bundle the
front end loaded (its labels and its manifest's creation time): one retrained
or replaced on disk since is refused, not adopted, until a reload.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # a first load may compile or read a big checkpoint from disk
HANG_AFTER_S = 60.0  # a batch this late: the child is stuck (or starved), not busy
RETRY_AFTER_S = (1.0, 60.0)  # pause after a failed start: doubles from the first, up to the second


class ModelProcessError(RuntimeError):
    """The model's process failed a batch, or ended."""


def _serve(fd: int, bundle_dir: str, priority: str) -> None:
    """The child: lowers its CPU priority (its threads, torch's too, inherit it),
    loads the bundle's model and answers batches until told to stop or orphaned."""
    # Signals to the whole process group (Ctrl-C, a terminal hang-up, a service
    # manager's SIGTERM) are the front end's to act on: it stops its model through
    # the pipe, after the batch in flight, and the pipe's end ends it in any case.
    # While loading, the child would not notice the front end going until loaded:
    # only Ctrl-C is left to the front end then (it kills a load it gave up on).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_inheritable(fd, False)  # a process the model starts must not hold the pipe open
    conn = Connection(fd)
    from tiergate.engine import yield_cpu  # before torch starts its threads

    got = yield_cpu(priority)
    _lower_earlier_threads()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see engine.in_process_runtime
    try:
        from tiergate.bundle import load_bundle
        from tiergate.tiers import load_intent_backend

        bundle = load_bundle(Path(bundle_dir))
        backend = load_intent_backend(bundle)
        # The width of its embeddings (the semantic cache's), as engine.embedding_dim
        # reads it from a model in the front end's process; None: it gives none.
        dim = getattr(backend, "dim", None)
        if dim is None:
            config = getattr(getattr(backend, "model", None), "config", None)
            dim = getattr(config, "hidden_size", None)
        ready: tuple[object, ...] = ("ready", list(backend.labels), dim, got, bundle.created)
    except Exception as e:  # the parent raises it as a ConfigError
        ready = ("error", f"{type(e).__name__}: {e}")
        backend = None
    try:
        conn.send(ready)
    except OSError:  # the front end went while we loaded: nothing to say, to anyone
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while backend is not None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the front end has gone: so does its model
            break
        if msg[0] == "stop":
            break
        try:
            logits, vectors = backend.infer(msg[1], embed=msg[2])
            reply: tuple[object, ...] = ("ok", logits, vectors)
        except Exception as e:  # one bad batch must not end the process
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except OSError:  # the front end went during the batch
            break
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def _lower_earlier_threads() -> None:
    """Gives the threads this process started before (OpenBLAS's, as numpy loaded) the
    calling thread's scheduling class and nice value: on Linux each thread has its own."""
    if sys.platform != "linux":
        return
    me = threading.get_native_id()
    policy, nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid == me:
            continue
        with contextlib.suppress(OSError):  # refused, or the thread has just ended
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def _child_env() -> dict[str, str]:
    """Ours, for a child that runs from "/": safe paths, and a PYTHONPATH whose relative
    entries still name what they name here."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(  # ("" is the working directory, as ".")
            os.path.abspath(p or ".") for p in env["PYTHONPATH"].split(os.pathsep)
        )
    return env


class ModelProcess:
    """A bundle's intent model served by a child process (see the module's doc).

    ``infer`` blocks: call it from one thread at a time (the runtime's model thread).
    """

    def __init__(
        self, bundle_dir: Path, priority: str = "idle", hang_after_s: float = HANG_AFTER_S
    ):
        # Absolute: the child runs from the root directory (see _start).
        self.bundle_dir = bundle_dir.resolve()
        self.priority = priority
        self.hang_after_s = hang_after_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._starting: subprocess.Popen[bytes] | None = None  # loading, not yet ready
        self._conn: Connection | None = None
        self._closed = False
        self.restarts = 0
        self._retry_at = 0.0  # after a failed start: no new attempt before then
        self._retry_pause = 0.0
        self._last_failure = ""
        self.labels: list[str] = []
        self.created = ""  # the bundle's, as first loaded: a restart must load the same
        self._start()

    def _start(self) -> None:
        # A plain child process (not multiprocessing's): it may start processes of its
        # own (a zero-shot bundle's vLLM engine), whatever process we run in (a daemonic
        # one may not have multiprocessing children), and imports nothing of our
        # caller's main module. It runs from "/" (with safe paths too, from Python 3.11):
        # a module file in our working directory ("numpy.py") must not shadow a library.
        # The pipe is a socket pair, the child's end passed by number.
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tiergate.model_process", str(theirs.fileno()),
                 str(self.bundle_dir), self.priority],
                pass_fds=(theirs.fileno(),), cwd="/", env=_child_env(),
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child's end alone keeps the pipe open on its side
        parent = Connection(ours.detach())
        self._starting = proc  # close() may end a load that has not finished
        try:
            msg = self._first_word(proc, parent)
            labels = list(msg[1])  # type: ignore[call-overload]
            created = str(msg[4])
            if self.labels and (labels != self.labels or created != self.created):
                raise ConfigError(
                    f"the bundle at {self.bundle_dir} changed on disk since this front end "
                    "loaded it: reload the policy (SIGHUP, with --config) or restart the "
                    "server to serve the new one"
                )
        except BaseException:  # Ctrl-C, a failed or refused load: the child must not go on
            parent.close()
            proc.kill()
            proc.wait()
            raise
        finally:
            self._starting = None
        self.labels, self.created = labels, created
        self.dim = msg[2]
        self.priority_got = str(msg[3])
        self._proc, self._conn = proc, parent

    def _first_word(self, proc: subprocess.Popen[bytes], parent: Connection) -> tuple[object, ...]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while not parent.poll(1.0):
                if self._closed:
                    raise ModelProcessError(
                        "the intent model's process was stopped while it loaded"
                    )
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the intent model of {self.bundle_dir} did not load within "
                        f"{READY_TIMEOUT_S:.0f} s"
                    )
            msg: tuple[object, ...] = parent.recv()
        except (EOFError, OSError):  # it ended before a word
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            raise ConfigError(
                f"the intent model of {self.bundle_dir} could not start: its process ended "
                f"with exit code {code} before loading (its error is in the log above)"
            ) from None
        if msg[0] != "ready":
            raise ConfigError(f"the intent model of {self.bundle_dir} failed to load: {msg[1]}")
        return msg

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _restart(self) -> None:
        """A new child for a dead one; a failed start is not tried again at once."""
        now = time.monotonic()
        if now < self._retry_at:
            raise ModelProcessError(
                f"the intent model's process could not start ({self._last_failure}); "
                f"next attempt in {self._retry_at - now:.1f} s"
            )
        log.warning("starting the intent model's process again (%s)", self.bundle_dir)
        self.restarts += 1
        try:
            self._start()
        except Exception as e:
            first, most = RETRY_AFTER_S
            self._retry_pause = min(most, 2 * self._retry_pause) if self._retry_pause else first
            self._retry_at = time.monotonic() + self._retry_pause
            self._last_failure = str(e)
            raise ModelProcessError(f"the intent model's process could not start: {e}") from e
        self._retry_pause = 0.0

    def infer(
        self, texts: Sequence[str], *, embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        with self._lock:
            if self._closed:
                raise ModelProcessError("the intent model's process was stopped")
            if self._proc is None or self._proc.poll() is not None:
                code = self._reap(0)  # died between batches (or at the last one): a new one
                if code is not None:
                    log.warning("the intent model's process ended (exit code %s)", code)
                self._restart()
                if self._closed:  # stopped while the new one loaded
                    self._reap(0)
                    raise ModelProcessError("the intent model's process was stopped")
            proc, conn = self._proc, self._conn
            assert proc is not None
            assert conn is not None
            try:
                conn.send(("infer", list(texts), embed))
                waited = 0.0
                while not conn.poll(1.0):  # ready, ended (EOF) or hung
                    waited += 1.0
                    if proc.poll() is not None:
                        raise EOFError
                    if waited >= self.hang_after_s:
                        self._reap(0)  # killed: started again with the next batch
                        raise ModelProcessError(
                            f"the intent model's process did not answer a batch of "
                            f"{len(texts)} within {self.hang_after_s:.0f} s: stopped; it "
                            "starts again with the next batch"
                        )
                msg = conn.recv()
            except (EOFError, OSError) as e:
                code = self._reap(5)
                raise ModelProcessError(
                    f"the intent model's process ended (exit code {code}) during a batch "
                    f"of {len(texts)}; it starts again with the next one"
                ) from e
        if msg[0] != "ok":
            raise ModelProcessError(f"the intent model failed a batch of {len(texts)}: {msg[1]}")
        return msg[1], msg[2]

    def _reap(self, timeout_s: float) -> int | None:
        """Ends the child (waiting ``timeout_s`` for it to end by itself) and its pipe."""
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self, wait_s: float = 30.0) -> None:
        """Stops the child after the batch it is running, if that ends within
        ``wait_s`` (else it is killed); idempotent. No batch runs after."""
        self._closed = True
        if not self._lock.acquire(timeout=wait_s):
            # A batch that does not end, or a restart still loading: end the child.
            for proc in (self._proc, self._starting):
                if proc is not None:
                    proc.kill()
            self._lock.acquire()
        try:
            if self._conn is not None:
                with contextlib.suppress(OSError):  # already gone
                    self._conn.send(("stop",))
            self._reap(wait_s)  # a vLLM engine takes a while to stop its own processes
        finally:
            self._lock.release()


if __name__ == "__main__":  # the child (see ModelProcess._start): fd, bundle, priority
    _serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
