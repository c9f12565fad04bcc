"""`tiergate serve` as a user runs it: a subprocess, SIGHUP reload, metrics over HTTP, Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.serving.conftest import sched_idle_allowed, serve_subprocess, thread_priorities
from tiergate import ConfigError
from tiergate.accounting import DAY_S
from tiergate.client import Client
from tiergate.engine import MODEL_NICE, descendants
from tiergate.event_loop import run_event_loop
from tiergate.state import LEDGER, replay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_reloads_on_sighup_serves_metrics_and_stops_cleanly(
    linear_bundle: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    doc = {"version": "v1", "tasks": {"intents": {"bundle": str(linear_bundle)}}}
    policy.write_text(yaml.safe_dump(doc))
    port, metrics_port = free_port(), free_port()
    proc, banner = serve_subprocess(
        "--policy", str(policy), "--address", f"127.0.0.1:{port}",
        "--metrics-port", str(metrics_port), "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    try:
        assert f"127.0.0.1:{port}" in banner
        assert "uvloop event loop" in banner  # the default
        with Client(f"127.0.0.1:{port}") as c:
            assert c.classify("hello there", timeout=10).policy_version == "v1"
            # Rewrite the file but keep its mtime: only SIGHUP can trigger the reload.
            stat = policy.stat()
            policy.write_text(yaml.safe_dump({**doc, "version": "v2"}))
            os.utime(policy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            time.sleep(1.5)
            assert c.classify("hello there", timeout=10).policy_version == "v1"
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            version = "v1"
            while version != "v2" and time.monotonic() < deadline:
                time.sleep(0.2)
                version = c.classify("hello there", timeout=10).policy_version
            assert version == "v2"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert "tiergate_requests_total{" in metrics
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "shutting down" in out
        # The default keeps the books on disk: a clean stop flushed the request counts.
        books = replay(tmp_path / "state" / LEDGER, int(time.time() // DAY_S))
        assert sum(u.requests for u in books.usage.values()) >= 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_event_loop_is_the_one_asked() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_event_loop(which(), "uvloop").startswith("uvloop")
    assert run_event_loop(which(), "asyncio").startswith("asyncio")
    main = which()
    with pytest.raises(ConfigError, match="event loop 'tokio' is not one of"):
        run_event_loop(main, "tokio")
    main.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux's")
@pytest.mark.parametrize(
    ("isolation", "priority"), [("process", None), ("process", "low"), ("thread", "low")]
)
def test_serve_runs_the_model_at_the_priority_asked(
    full_bundle: Path, tmp_path: Path, isolation: str, priority: str | None
) -> None:
    """The model's compute runs below the front end's priority: in a process of its own
    (the default; idle unless asked otherwise), or on a thread of the front end's."""
    if (priority or "idle") == "idle" and not sched_idle_allowed():
        pytest.skip("this system does not let a thread enter SCHED_IDLE")
    port = free_port()
    asked = ["--model-priority", priority] if priority else []
    proc, _ = serve_subprocess(
        "--bundle", str(full_bundle), "--address", f"127.0.0.1:{port}", "--metrics-port", "0",
        "--state-dir", "none", "--model-isolation", isolation, *asked,
    )  # fmt: skip
    try:
        with Client(f"127.0.0.1:{port}") as c:
            assert c.classify("where is my parcel", force_tier="intent", timeout=30).tier
        front = thread_priorities(proc.pid)
        children = descendants(proc.pid)
        model = [t for pid in children for t in thread_priorities(pid)]
    finally:
        proc.kill()
        proc.communicate()
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the server's, inherited from us
    wanted = (
        (os.SCHED_IDLE, base)
        if (priority or "idle") == "idle"
        else (os.SCHED_OTHER, min(19, base + MODEL_NICE))
    )
    if isolation == "process":
        assert len(children) == 1, "one model process"
        assert set(front) == {(os.SCHED_OTHER, base)}  # the front end: every thread
        assert len(model) > 1
        assert set(model) == {wanted}
    else:
        assert children == []
        assert (os.SCHED_OTHER, base) in front  # the front end's
        assert wanted in front  # the model's thread and PyTorch's
        assert os.SCHED_IDLE not in {t[0] for t in front}


def test_model_isolation_is_refused_on_ray(full_bundle: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tiergate", "serve", "--runtime", "ray", "--bundle",
         str(full_bundle), "--model-isolation", "thread"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "--model-isolation is for --runtime local" in run.stderr
