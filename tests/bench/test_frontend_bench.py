"""A short run of `make bench-frontend`: tiergate next to the bare grpc.aio echo server,
both real servers on loopback. It measures nothing here; it must keep working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_front_end_benchmark_runs_and_reports_each_rounds_ratio(
    full_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "frontend.json"
    cmd = [
        sys.executable, "-m", "benchmarks.frontend", "--bundle", str(full_bundle),
        "--rounds", "2", "--seconds", "1", "--clients", "1", "--concurrency", "4",
        "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert len(doc["echo_runs"]) == len(doc["tiergate_runs"]) == 2
    assert min(doc["echo_runs"] + doc["tiergate_runs"]) > 0
    ratios = [t / e for t, e in zip(doc["tiergate_runs"], doc["echo_runs"], strict=True)]
    assert doc["round_ratios"] == ratios
    assert doc["ratio"] == doc["tiergate_rps"] / doc["echo_rps"]
    assert "ratio per round: median" in run.stderr
    assert "| requests/s, cheap tiers, closed loop (median of 2) |" in run.stdout
    assert (doc["event_loop"], doc["echo_loop"]) == ("uvloop", "asyncio")
    # the loop the clients ran on: 1 process per run, 2 rounds of two runs, 1 open loop
    assert doc["client_loops"] == {"uvloop": 5}


def test_a_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.frontend", "--bundle", str(tmp_path / "none")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "no bundle at" in run.stderr


def test_a_client_that_fails_says_why_rather_than_leave_the_run_waiting() -> None:
    import socket

    from benchmarks.frontend import drive

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=r"client \d+ failed: AioRpcError"):
        drive(port, seconds=1, clients=1, concurrency=1)
