"""The benchmark harness's parts: workload mix, simulated frontier, histogram merging."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from benchmarks.load import report, workload
from benchmarks.load.cli import _is_loopback, _targets, search_rates
from benchmarks.load.cli import main as bench_main
from benchmarks.load.loadgen import Tally, histogram, latency_origin
from benchmarks.load.simulator import answer

import tiergate
from tiergate.data import Example
from tiergate.engine import normalise
from tiergate.frontier import SimulatorParams

POOL = [Example(f"text number {i} about {lab}", lab) for i in range(300)
        for lab in ("a", "b", "oos")][:600]  # fmt: skip


def test_the_mix_is_what_was_asked_and_seeded() -> None:
    tenants = (workload.TenantSpec("big", 3), workload.TenantSpec("small", 1))
    mix = workload.Mix(0.2, 0.1, 0.5, 0.25, tenants)
    items = workload.build(POOL, mix, 4000, seed=1)
    kinds = Counter(i.kind for i in items)
    assert kinds["repeat"] / len(items) == pytest.approx(0.2, abs=0.03)
    assert kinds["paraphrase"] / len(items) == pytest.approx(0.1, abs=0.03)
    fresh = [i for i in items if i.kind == "fresh"]
    assert sum(i.label == "oos" for i in fresh) / len(fresh) == pytest.approx(0.5, abs=0.05)
    assert sum(bool(i.risk_tags) for i in items) / len(items) == pytest.approx(0.25, abs=0.03)
    by_tenant = Counter(i.tenant for i in items)
    assert by_tenant["big"] / len(items) == pytest.approx(0.75, abs=0.03)
    assert workload.build(POOL, mix, 4000, seed=1) == items
    assert workload.build(POOL, mix, 4000, seed=2) != items
    # A repeat or paraphrase rewords an earlier text of the same tenant, label kept.
    earlier: dict[str, set[str]] = {"big": set(), "small": set()}
    for i in items:
        if i.kind == "repeat":
            assert i.text in earlier[i.tenant]
            assert i.source == i.text
        if i.kind == "paraphrase":
            assert i.source in earlier[i.tenant]
        earlier[i.tenant].add(i.text)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_an_out_of_scope_share_draws_each_fresh_text_once(share: float) -> None:
    """Reaching the share must not repeat texts: a duplicate fresh text is an exact
    repeat the mix did not ask for, and it would inflate the cache's hit rate."""
    mix = workload.Mix(0.0, 0.0, share)
    items = workload.build(POOL, mix, 150, seed=3)  # fewer than the pool can fill
    texts = [i.text for i in items]
    assert len(set(texts)) == len(texts)
    assert sum(i.label == "oos" for i in items) / len(items) == pytest.approx(share, abs=0.08)


def test_an_out_of_scope_share_needs_out_of_scope_texts() -> None:
    in_scope_only = [e for e in POOL if e.label != "oos"]
    with pytest.raises(ValueError, match="needs texts labelled 'oos'"):
        workload.build(in_scope_only, workload.Mix(0.2, 0.1, 0.2), 100)
    assert len(workload.build(in_scope_only, workload.Mix(0.2, 0.1, 0.0), 100)) == 100


def test_latency_starts_at_whichever_send_time_came_first() -> None:
    late, early = latency_origin(10.0, 10.004), latency_origin(10.0, 9.9995)
    assert late == 10.0  # the client's lateness counts: no coordinated omission
    assert early == 9.9995  # woken early, sent early: the wait before is not latency


def test_a_paraphrase_is_never_an_exact_cache_key_of_its_source() -> None:
    rng = random.Random(0)
    for e in POOL[:200]:
        p = workload.paraphrase(e.text, rng)
        assert normalise(p) != normalise(e.text)
        assert e.text.rstrip("?.!").lower() in p.lower()  # the request itself is kept


def test_bad_mixes_and_tenants_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats \\+ paraphrases"):
        workload.Mix(0.6, 0.4)
    with pytest.raises(ValueError, match="share"):
        workload.Mix(repeats=-0.1)
    with pytest.raises(ValueError, match="name=weight"):
        workload.TenantSpec.parse("acme=lots")
    assert workload.TenantSpec.parse("acme=2:0.5") == workload.TenantSpec("acme", 2.0, 0.5)


def test_the_simulator_is_right_as_often_as_told_and_consistent() -> None:
    labels = ["a", "b", "c", "oos"]
    gold = {f"t{i}": (labels[i % 4], f"t{i}") for i in range(4000)}
    params = SimulatorParams(accuracy=0.8, seed=3)
    answers = {t: answer(params, gold, t, labels) for t in gold}
    right = sum(answers[t] == gold[t][0] for t in gold) / len(gold)
    assert right == pytest.approx(0.8, abs=0.03)
    assert all(a in labels for a in answers.values())
    assert all(answer(params, gold, t, labels) == answers[t] for t in list(gold)[:200])
    # A rewording gets its original's answer, right or wrong.
    reworded = {f"please t{i}": (gold[f"t{i}"][0], f"t{i}") for i in range(4000)}
    assert all(answer(params, reworded, f"please t{i}", labels) == answers[f"t{i}"]
               for i in range(4000))  # fmt: skip
    perfect = SimulatorParams(accuracy=1.0)
    assert all(answer(perfect, gold, t, labels) == gold[t][0] for t in gold)


def test_tallies_merge_counts_and_histograms() -> None:
    a, b = Tally(ok=2, sent=2), Tally(ok=1, sent=1)
    ha, hb = histogram(), histogram()
    for v in (100, 200):
        ha.record_value(v)
    hb.record_value(10_000)
    a.latency, b.latency = str(ha.encode(), "ascii"), str(hb.encode(), "ascii")
    a.codes["OK"], b.codes["UNAVAILABLE"] = 2, 1
    a.hits_by_origin["linear"], b.hits_by_origin["linear"] = 3, 2
    b.false_by_origin["intent"], a.false_oos_hits, b.false_oos_hits = 1, 1, 2
    a.merge(b)
    assert a.hits_by_origin == Counter({"linear": 5})
    assert (a.false_by_origin, a.false_oos_hits) == (Counter({"intent": 1}), 3)
    h, cheap = a.histograms()
    assert (a.ok, a.sent, h.get_total_count(), cheap.get_total_count()) == (3, 3, 3, 0)
    assert h.get_max_value() == pytest.approx(10_000, rel=0.01)
    assert a.codes == Counter({"OK": 2, "UNAVAILABLE": 1})


def test_only_loopback_targets_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert _is_loopback("127.0.0.1:50051")
    assert _is_loopback("localhost:1")
    assert not _is_loopback("10.1.2.3:50051")
    assert bench_main(["--target", "10.1.2.3:50051"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert bench_main(["--bundle", "/nonexistent", "--requests", "5"]) == 2
    assert "no bundle at /nonexistent" in capsys.readouterr().err
    assert bench_main(["--bundle", str(Path(__file__)), "--configs", "fast"]) == 2
    assert "unknown configuration 'fast'" in capsys.readouterr().err
    assert bench_main(["--target", "127.0.0.1:1", "--overload"]) == 2
    assert "cannot load a --target" in capsys.readouterr().err


def test_no_cache_answer_does_not_pass_the_false_hit_target() -> None:
    """A run whose caches never answered says nothing of their false hits."""
    t = Tally()
    t.sent = t.ok = 100
    t.codes["OK"] = 100
    t.correct = 97
    result = report.summarize(t)
    assert result["false_hit_rate"] is None
    (row,) = _targets({"hybrid": result}, workload.Mix(0.2, 0.1), None, 500.0)
    assert row["measured"] == "no cache answers"
    assert row["met"] is False


def test_a_failed_request_counts_against_accuracy() -> None:
    t = Tally()
    t.sent, t.ok, t.correct, t.cost_usd = 100, 80, 80, 0.5
    t.codes.update({"OK": 80, "RESOURCE_EXHAUSTED": 20})
    result = report.summarize(t)
    assert result["accuracy"] == 0.8  # not 1.0: a fifth of the requests got no answer
    assert result["cost_per_1k_usd"] == 5.0


@pytest.mark.parametrize(
    ("capacity", "start", "cap", "found", "tried"),
    [
        (1000, 100, 1600, 800, [100, 200, 400, 800, 1600, 1200]),
        (1300, 100, 1600, 1200, [100, 200, 400, 800, 1600, 1200]),
        (30, 100, 1600, 25, [100, 50, 25, 37.5]),  # below the first step: down by halves
        (5000, 100, 700, 400, [100, 200, 400]),  # the cap stops the doubling
        (0.5, 4, 100, 0.0, [4, 2, 1]),  # nothing sustained
    ],
)
def test_the_sweep_finds_the_highest_sustained_rate(
    capacity: float, start: float, cap: float, found: float, tried: list[float]
) -> None:
    points: list[dict[str, Any]] = []
    best = search_rates(lambda r: {"offered_rps": r, "sustained": r <= capacity}, points,
                        start, cap)  # fmt: skip
    assert best == found
    assert [p["offered_rps"] for p in points] == tried


def test_a_configuration_that_fails_is_reported_and_the_run_goes_on(
    linear_bundle: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(linear_bundle, broken)
    (broken / "linear.npz").write_bytes(b"not a model")
    out = tmp_path / "out"
    examples = Path(tiergate.__file__).parent / "examples" / "intents.jsonl"
    code = bench_main(["--bundle", str(broken), "--data", str(examples), "--requests", "20",
                       "--rate", "20", "--configs", "cascade", "--out", str(out)])  # fmt: skip
    assert code == 1
    doc = json.loads((out / "report.json").read_text())
    assert "does not match the manifest's hash" in doc["failed"]["cascade"]
    assert "FAILED, not in the tables: cascade" in (out / "report.md").read_text()


def test_client_processes_run_on_the_loop_asked() -> None:
    """Against the real echo server on loopback: each client process reports the event
    loop it ran on (uvloop, the default, or asyncio's own when asked)."""
    from benchmarks.load import loadgen, servers

    items = [workload.Item(f"text {i}", "a", "fresh", "t") for i in range(40)]
    with servers.echo() as address:
        for loop, clients in (("asyncio", 1), ("uvloop", 2)):
            t = loadgen.drive(address, items, {"t": ""}, clients=clients, rate=None,
                              concurrency=2, seconds=20, event_loop=loop)  # fmt: skip
            assert (t.ok, t.loops) == (40, Counter({loop: clients})), loop


def test_the_header_says_when_the_clients_ran_on_another_loop_than_asked() -> None:
    from benchmarks.load.cli import client_loop_note
    from benchmarks.load.loadgen import Tally

    def ran(**loops: int) -> Tally:
        t = Tally()
        t.loops.update(loops)
        return t

    assert client_loop_note("uvloop", [ran(uvloop=2), ran(uvloop=2)]) == []
    assert client_loop_note("uvloop", []) == []  # nothing ran: nothing to say
    (note,) = client_loop_note("uvloop", [ran(uvloop=2), ran(asyncio=2)])
    assert note.startswith("- the client processes ran on asyncio and uvloop, not uvloop")
    (note,) = client_loop_note("uvloop", [ran(asyncio=2)])
    assert "ran on asyncio, not uvloop as asked" in note
