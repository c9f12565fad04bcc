"""A short run of `tiergate bench`: four configurations, real servers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import edited_bundle
from tests.serving.conftest import serve_subprocess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "serve" / "tiergate" / "examples" / "intents.jsonl"


def test_bench_smoke_run(full_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    # A linear tier that never answers: on the example intents it is sure of every text,
    # and the caches keep only the model tiers' answers. (Its router then sends all to
    # the frontier; test_modes covers routing to the model.)
    never = {"general": 1.01, "finance": 1.01}
    bundle = edited_bundle(full_bundle, tmp_path / "bundle",
                           lambda m: m["thresholds"].update(linear=never))  # fmt: skip
    cmd = [
        sys.executable, "-m", "tiergate", "bench", "--bundle", str(bundle),
        "--data", str(EXAMPLES), "--out", str(out), "--requests", "120", "--rate", "60",
        "--seconds", "30", "--sim-accuracy", "1.0", "--sim-latency-ms", "5",
        "--sim-p95-ms", "20", "--repeats", "0.2", "--paraphrases", "0.1",
        "--tenant", "gold=3", "--tenant", "trial=1:0.0001",
        "--sweep", "--sweep-seconds", "2", "--sweep-max-rps", "100",
        "--overload", "--overload-seconds", "2",
    ]  # fmt: skip
    run = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[bench] frontier: 120 requests" in run.stderr  # progress on stderr
    doc = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "SIMULATED frontier" in md
    assert "event loop uvloop" in md  # the loop asked for, `tiergate serve`'s default
    assert "2 client processes on uvloop" in md
    assert "| answered req/s (incl. drain) |" in md  # not to be read as the offered rate
    assert doc["simulated_frontier"] is True
    r = doc["results"]
    assert list(r) == ["frontier", "routing", "cascade", "hybrid"]
    for name, res in r.items():
        assert res["requests"] == 120, name
        assert res["answered"] + sum(res["errors"].values()) == 120, name
        assert res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] <= res["latency_ms"]["max"]
        assert res["client_loops"] == {"uvloop": 2}, name  # the loop that ran, not the option
    # The trial tenant's tiny spend cap: with no local tier to degrade to, its
    # requests beyond the cap are refused (UNAVAILABLE), and only those.
    front = r["frontier"]
    assert front["decided_by"]["frontier"] > 0.5
    assert set(front["errors"]) == {"UNAVAILABLE"}
    assert 0 < front["errors"]["UNAVAILABLE"] < 60
    assert not r["hybrid"]["errors"]
    # A perfect simulated frontier: whatever it answered is right; accuracy is per
    # request sent, so the refused ones count against it.
    assert front["accuracy"] == round(front["answered"] / 120, 4) < 1.0
    assert front["cost_per_1k_usd"] > r["hybrid"]["cost_per_1k_usd"]
    assert r["cascade"]["cache_hit_rate"] == 0
    assert r["hybrid"]["cache_hit_rate"] > 0
    assert r["routing"]["decided_by"].get("linear", 0) == 0  # the router never answers
    assert r["hybrid"]["cache_changed_answers"] is not None
    # Wrong cache answers traced to the tier whose answer the cache repeats: every hit
    # has one, and the split adds up to the totals.
    hits = round(r["hybrid"]["cache_hit_rate"] * r["hybrid"]["answered"])
    origin = r["hybrid"]["false_hits_by_origin"]
    assert set(origin) <= {"rules", "linear", "intent", "frontier"}
    assert sum(n for _, n in origin.values()) == hits
    wrong = sum(w for w, _ in r["hybrid"]["false_hits_by_cache"].values())
    assert sum(w for w, _ in origin.values()) == wrong
    assert 0 <= r["hybrid"]["false_hits_out_of_scope"] <= wrong
    assert "by the tier whose answer the cache repeats" in md
    assert {t["target"][:20] for t in doc["targets"]} >= {"hybrid cost per 1k a"}
    # The sweep: rates rising from half of --rate until a step fails or the cap.
    sweep = doc["sweep"]
    rates = [p["offered_rps"] for p in sweep["points"]]
    assert rates == sorted(rates)
    assert rates[0] == 30
    assert sweep["max_sustained_rps"] in rates
    assert sweep["half_rate"]["offered_rps"] == sweep["max_sustained_rps"] / 2
    assert any(t["target"].startswith("cheap-tier p99") for t in doc["targets"])
    echo = sweep["echo_at_half_rate_ms"]
    assert 0 < echo["p50"] <= echo["p99"]
    # Overload: twice the sustained rate, every request accounted for.
    over = sweep["overload"]
    assert over["offered_rps"] == 2 * sweep["max_sustained_rps"]
    assert over["answered"] + sum(over["errors"].values()) == over["requests"] > 0
    assert over["refused"] == over["errors"].get("RESOURCE_EXHAUSTED", 0)
    assert over["peak_rss_mb"] > 50  # the server's own memory, read from /proc
    assert "Overload:" in md
    assert any(t["target"].startswith("at twice the sustained max") for t in doc["targets"])
    for png in ("latency_cdf.png", "tier_mix.png", "sweep.png"):
        assert (out / png).stat().st_size > 10_000


def test_a_sweep_of_a_running_server(full_bundle: Path, tmp_path: Path) -> None:
    """`--target --sweep`: every step on the one server a user runs (on Ray, say), each
    step with texts the steps before did not send."""
    server, banner = serve_subprocess("--bundle", str(full_bundle), "--address",
                                      "127.0.0.1:0", "--state-dir", "none")  # fmt: skip
    try:
        address = banner.split(" on ", 1)[1].split()[0]
        out = tmp_path / "report"
        cmd = [
            sys.executable, "-m", "tiergate", "bench", "--target", address,
            "--data", str(EXAMPLES), "--out", str(out), "--requests", "20", "--rate", "20",
            "--sweep", "--sweep-seconds", "1", "--sweep-max-rps", "40",
        ]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    sweep = doc["sweep"]
    assert sweep["target"] == address
    rates = [p["offered_rps"] for p in sweep["points"]]
    assert rates[0] == 10
    assert rates == sorted(rates)
    assert sweep["max_sustained_rps"] in rates
    assert sweep["half_rate"]["offered_rps"] == sweep["max_sustained_rps"] / 2
    assert any(t["target"].startswith("cheap-tier p99") for t in doc["targets"])
    assert f"Rate sweep ({address}, one server for every step" in (out / "report.md").read_text()
