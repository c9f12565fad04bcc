"""`tiergate eval` and `tiergate train` end to end, with a simulated and a real HTTP frontier."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import INTENTS
from tests.fake_openai import Script, fake_provider
from tiergate.bundle import load_bundle
from tiergate.cli import main
from tiergate.data import Example, load_splits, read_jsonl
from tiergate.evaluate import cascade_route, evaluate, markdown, run_tiers
from tiergate.frontier import FrontierSimulator, OpenAIFrontier, ProviderConfig, SimulatorParams
from tiergate.gate import Prices


def test_cascade_decisions_respect_the_thresholds(full_bundle: Path) -> None:
    bundle = load_bundle(full_bundle)
    sample = [e.text for e in read_jsonl(INTENTS)]
    outputs, _ = run_tiers(bundle, sample)
    assert set(outputs) == {"rules", "linear", "intent"}
    pred, decided = cascade_route(bundle, outputs)
    for i, tier in enumerate(decided):
        if tier == "frontier":
            assert pred[i] == -1
            for name, out in outputs.items():  # no tier was confident enough
                ok = out.pred[i] >= 0 and out.confidence[i] >= bundle.gate(name).threshold(
                    out.domains[i]
                )
                assert not ok
        else:
            out = outputs[tier]
            assert pred[i] == out.pred[i]
            assert out.confidence[i] >= bundle.gate(tier).threshold(out.domains[i])
    # the refund rule raises the finance tag, so every tier sees that domain there
    i = next(j for j, t in enumerate(sample) if "refund" in t.lower())
    assert outputs["linear"].domains[i] == "finance"


def test_eval_cli_reports_every_configuration(full_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code = main(["eval", "--bundle", str(full_bundle), "--data", str(INTENTS), "--all",
                 "--out", str(out), "--sim-accuracy", "0.9"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "cascade"
    assert {"rules only", "linear only", "intent only", "frontier only"} <= set(names)
    cascade = result["rows"][0]
    assert sum(cascade["share_by_tier"].values()) == pytest.approx(1.0)
    frontier_only = next(r for r in result["rows"] if r["name"] == "frontier only")
    # the simulator answers right with its stated accuracy (90 texts, so loosely)
    assert 0.75 <= frontier_only["in_scope_accuracy"] <= 1.0
    assert frontier_only["cost_per_1k"] > cascade["cost_per_1k"] or cascade["escalation_rate"] == 1
    assert result["frontier"]["simulated"] is True
    assert "SIMULATED" in (out / "eval.md").read_text()
    assert (out / "cost_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_offers_the_frontier_the_likeliest_labels(full_bundle: Path) -> None:
    bundle = load_bundle(full_bundle)
    never = {"general": 1.01, "finance": 1.01}
    bundle.thresholds = {tier: never for tier in bundle.thresholds}  # everything escalates
    # Texts the tiers cannot place, each with a label to be scored on: the intent model's
    # likeliest label is the true one only now and then.
    labels = bundle.labels
    examples = [Example(f"zq{i} xv{i * 7} wk{i % 5}", labels[i % len(labels)]) for i in range(60)]
    perfect = SimulatorParams(accuracy=1.0)

    def run(candidates: int) -> dict[str, Any]:
        frontier = FrontierSimulator(bundle.labels, perfect)
        return evaluate(bundle, examples, frontier, Prices(), candidates)

    every, one = run(0), run(1)
    cascade_all, cascade_one = every["rows"][0], one["rows"][0]
    assert cascade_all["escalation_rate"] == cascade_one["escalation_rate"] == 1.0
    # A perfect frontier offered every label is always right; offered one, it is right
    # exactly when that one is the true label.
    assert cascade_all["in_scope_accuracy"] == 1.0
    assert one["candidates"] == {"offered": 1, "of": len(bundle.labels),
                                 "recall": cascade_one["in_scope_accuracy"]}  # fmt: skip
    assert 0 < cascade_one["in_scope_accuracy"] < 1.0
    assert cascade_one["cost_per_1k"] < cascade_all["cost_per_1k"]
    assert "likeliest labels" in markdown(one)
    assert "likeliest labels" not in markdown(every)


@pytest.fixture
def provider() -> Iterator[str]:
    with fake_provider(SCRIPT) as url:
        yield url


SCRIPT = Script()


def test_real_http_frontier_labels_and_prices(provider: str) -> None:
    labels = ["greeting", "refund"]
    SCRIPT.answers = {"hello": "greeting", "money back please": "refund"}
    frontier = OpenAIFrontier(
        labels,
        ProviderConfig(
            "loopback", provider, "m", None, price_in_per_mtok=2.0, price_out_per_mtok=8.0
        ),
    )
    good, other, bad = frontier.classify(["hello", "money back please", "what is this"])
    assert (good.label, other.label) == ("greeting", "refund")
    assert good.cost == pytest.approx((100 * 2.0 + 5 * 8.0) / 1e6)
    assert bad.label is None
    assert "not in the label set" in (bad.error or "")
    assert not good.simulated


def test_unreachable_frontier_is_an_answer_with_an_error() -> None:
    frontier = OpenAIFrontier(["a"], ProviderConfig("down", "http://127.0.0.1:9/v1", "m", None,
                                                    timeout_s=2.0))  # fmt: skip
    (answer,) = frontier.classify(["hi"])
    assert answer.label is None
    assert answer.error


def test_train_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(INTENTS), "--out", str(tmp_path / "b"),
                 "--no-intent", "--quiet"]) == 0  # fmt: skip
    assert "thresholds" in capsys.readouterr().out
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "x"}\n')
    assert main(["train", "--data", str(broken), "--out", str(tmp_path / "c"), "--no-intent"]) == 2
    assert "line 1" in capsys.readouterr().err


def test_clinc150_slice_linear_tier(clinc150: dict[str, list[list[str]]], tmp_path: Path) -> None:
    """20 CLINC150 intents plus out-of-scope: the hashed linear tier is accurate and calibrated."""
    from tests.conftest import CLINC_DIR
    from tiergate.train import TrainOptions, train_bundle

    full = load_splits(CLINC_DIR / "data_full.json")
    keep = set(sorted({e.label for e in full.train} - {"oos"})[:20]) | {"oos"}
    full.train = [e for e in full.train if e.label in keep]
    full.val = [e for e in full.val if e.label in keep]
    # Test with the validation split's share of out-of-scope (20%): calibration
    # fitted on one distribution is only promised for that distribution.
    test_in = [e for e in full.test if e.label in keep and e.label != "oos"]
    full.test = test_in + [e for e in full.test if e.label == "oos"][: len(test_in) // 4]
    report = train_bundle(full, tmp_path / "b", TrainOptions(intent=None, progress=False))
    linear = report["tiers"]["linear"]
    bundle = load_bundle(tmp_path / "b")
    model = bundle.linear_model()
    pred = np.array(model.labels)[model.top_k([e.text for e in test_in])[0][:, 0]]
    accuracy = float(np.mean(pred == np.array([e.label for e in test_in])))
    assert accuracy >= 0.9, accuracy
    # ~750 test texts in 15 bins: ECE this small is within sampling noise
    assert linear["ece_test_after"] <= 0.06
