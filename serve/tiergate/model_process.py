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
one way, logits and embeddings the other, as numpy arrays. A child that dies
is started again on the next batch; the batch it was running fails, and the
engine answers those requests as it does when any model fails.
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


class ModelProcessError(RuntimeError):
    """The model's process failed a batch, or ended."""


def _serve(conn: Connection, bundle_dir: str, priority: str) -> None:
    """The child: lowers its CPU priority (its threads, torch's too, inherit it),
    loads the bundle's model and answers batches until told to stop or orphaned."""
    from tiergate.engine import yield_cpu  # before torch starts its threads

    # Ctrl-C in a terminal reaches the whole process group: the front end decides when
    # the model stops (it closes the pipe), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    got = yield_cpu(priority)
    _lower_earlier_threads()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see engine.in_process_runtime
    try:
        from tiergate.bundle import load_bundle
        from tiergate.tiers import load_intent_backend

        backend = load_intent_backend(load_bundle(Path(bundle_dir)))
        # The width of its embeddings (the semantic cache's), as engine.embedding_dim
        # reads it from a model in the front end's process; None: it gives none.
        dim = getattr(backend, "dim", None)
        if dim is None:
            config = getattr(getattr(backend, "model", None), "config", None)
            dim = getattr(config, "hidden_size", None)
        conn.send(("ready", list(backend.labels), dim, got))
    except Exception as e:  # the parent raises it as a ConfigError
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
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


class ModelProcess:
    """A bundle's intent model served by a child process (see the module's doc).

    ``infer`` blocks: call it from one thread at a time (the runtime's model thread).
    """

    def __init__(self, bundle_dir: Path, priority: str = "low"):
        self.bundle_dir = bundle_dir
        self.priority = priority
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        # A plain child process (not multiprocessing's): it may start processes of its
        # own (a zero-shot bundle's vLLM engine), whatever process we run in (a daemonic
        # one may not have multiprocessing children), and imports nothing of our
        # caller's main module. The pipe is a socket pair, its end passed by number.
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tiergate.model_process", str(theirs.fileno()),
             str(self.bundle_dir), self.priority],
            pass_fds=(theirs.fileno(),),
        )  # fmt: skip
        theirs.close()  # the child's end alone keeps the pipe open on its side
        parent = Connection(ours.detach())
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while not parent.poll(1.0):
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise ConfigError(
                        f"the intent model of {self.bundle_dir} did not load within "
                        f"{READY_TIMEOUT_S:.0f} s"
                    )
            msg = parent.recv()
        except (EOFError, OSError):  # it ended before a word
            parent.close()
            raise ConfigError(
                f"the intent model of {self.bundle_dir} could not start: its process ended "
                f"with exit code {proc.wait()} before loading (its error is in the log above)"
            ) from None
        if msg[0] != "ready":
            parent.close()
            proc.wait()
            raise ConfigError(f"the intent model of {self.bundle_dir} failed to load: {msg[1]}")
        _, self.labels, self.dim, self.priority_got = msg
        self._proc, self._conn = proc, parent

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def infer(
        self, texts: Sequence[str], *, embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        with self._lock:
            if self._conn is None:  # the last batch found it dead: a new one
                log.warning("starting the intent model's process again (%s)", self.bundle_dir)
                self.restarts += 1
                self._start()
            conn = self._conn
            assert conn is not None
            try:
                conn.send(("infer", list(texts), embed))
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

    def close(self) -> None:
        """Stops the child after the batch it is running (if any); idempotent."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):  # already gone
                    self._conn.send(("stop",))
            self._reap(30)  # a vLLM engine takes a while to stop its own processes


if __name__ == "__main__":  # the child (see ModelProcess._start): fd, bundle, priority
    _serve(Connection(int(sys.argv[1])), sys.argv[2], sys.argv[3])
