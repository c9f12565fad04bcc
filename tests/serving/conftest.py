"""What the serving tests share: a front end started on loopback, policy files, keys."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tiergate.client import Client
from tiergate.engine import Engine
from tiergate.frontier import ProviderConfig
from tiergate.policy import load_policy
from tiergate.server import Server, build_server

KEY_A, KEY_B = "key-tenant-a", "key-tenant-b"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Running:
    address: str
    server: Server
    engine: Engine
    loop: asyncio.AbstractEventLoop

    def client(self, key: str | None = None) -> Client:
        return Client(self.address, api_key=key)

    def stop(self) -> None:
        """A graceful stop, as on SIGTERM (stopping again later is harmless)."""
        asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self.loop).result(30)


def sched_idle_allowed() -> bool:
    """Whether this system lets a thread put itself in SCHED_IDLE (some sandboxes do not)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    allowed: list[bool] = []

    def probe() -> None:  # a throwaway thread: the class stays with it
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return allowed == [True]


def thread_priority(tid: int, pid: int | None = None) -> tuple[int, int]:
    """(scheduling policy, nice value) of thread ``tid`` of process ``pid`` (default: ours)."""
    stat = Path(f"/proc/{pid or os.getpid()}/task/{tid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[38]), int(fields[16])


def thread_priorities(pid: int) -> list[tuple[int, int]]:
    """(scheduling policy, nice value) of each thread of process ``pid``."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that has just ended
            out.append(thread_priority(int(tid), pid))
    return out


def serve_subprocess(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`tiergate serve --runtime local ARGS` as a user runs it, once it serves: the process
    and its banner line. The caller stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiergate", "serve", "--runtime", "local", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while "serving gRPC" not in line:
        if not line:
            out, _ = proc.communicate(timeout=30)
            raise AssertionError(f"the server exited before serving:\n{out}")
        line = proc.stdout.readline()
    return proc, line


def write_policy(path: Path, bundle: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "version": "v1",
        "tasks": {"intents": {"bundle": str(bundle)}},
        "tenants": {
            "a": {"key_sha256": [sha(KEY_A)]},
            "b": {"key_sha256": [sha(KEY_B)]},
        },
        "risk": {"legal": "review"},
        "limits": {"max_text_bytes": 2000, "max_batch": 8},
    }
    for key, value in changes.items():
        doc[key] = value
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """Starts a front end on a policy file in a background event loop; stops it after."""
    running: list[Running] = []
    threads: list[threading.Thread] = []

    def _start(policy_path: Path, frontier_url: str | None = None, price: float = 1.0,
               state_dir: Path | None = None) -> Running:  # fmt: skip
        provider = None
        if frontier_url:
            provider = ProviderConfig("loopback", frontier_url, "m", None, price, price)
        server = build_server(load_policy(policy_path), policy_path, provider, state_dir=state_dir)
        engine = server.engine
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        threads.append(thread)
        port = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1:0"), loop).result(30)
        r = Running(f"127.0.0.1:{port}", server, engine, loop)
        running.append(r)
        return r

    yield _start
    for r, thread in zip(running, threads, strict=True):
        asyncio.run_coroutine_threadsafe(r.server.stop(0.5), r.loop).result(10)
        r.loop.call_soon_threadsafe(r.loop.stop)
        thread.join(10)
        r.loop.close()


def tenant_a_with(quota: dict[str, float]) -> dict[str, Any]:
    """The tenants section for tenant a (KEY_A) with the given daily quota."""
    return {"a": {"key_sha256": [sha(KEY_A)], "quota": quota}}


def escalate_everything(bundle: Path) -> dict[str, Any]:
    """A task whose cheap tiers never accept: every request goes on to the next tier."""
    never = {"general": 1.01}
    return {"intents": {"bundle": str(bundle), "thresholds": {"rules": never, "linear": never}}}


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()  # type: ignore[no-any-return]
