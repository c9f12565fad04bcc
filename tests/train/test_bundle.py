"""Bundles: what training writes loads back; any damage is a clear FormatError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import INTENTS
from tiergate import ConfigError, FormatError
from tiergate.bundle import load_bundle
from tiergate.data import load_splits, texts
from tiergate.train import TrainOptions, train_bundle
from tiergate.train.linear import features


def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "b"))


def test_linear_tier_scores_with_the_saved_weights(linear_bundle: Path) -> None:
    bundle = load_bundle(linear_bundle)
    model = bundle.linear_model()
    sample = texts(load_splits(INTENTS).test)
    x = features(model.hashers, sample)
    with np.load(linear_bundle / "linear.npz") as z:
        expected = x @ z["coef"].T.astype(np.float64) + z["intercept"]
    assert np.allclose(model.decision_function(sample), expected, atol=1e-4)


def test_manifest_describes_the_bundle(linear_bundle: Path) -> None:
    bundle = load_bundle(linear_bundle)
    assert bundle.labels == sorted(bundle.labels)
    assert set(bundle.tiers) == {"rules", "linear"}
    assert set(bundle.thresholds) == {"rules", "linear"}
    manifest = json.loads((linear_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert set(manifest["files"]) == {"rules.yaml", "linear.npz"}
    for png in ("reliability_linear.png", "sweep.png"):
        assert (linear_bundle / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = (linear_bundle / "reports" / "sweep.md").read_text()
    assert "**(chosen)**" in sweep
    assert "| 0.50" in sweep
    assert "| 0.99" in sweep


def test_tampered_file_is_named(linear_bundle: Path, tmp_path: Path) -> None:
    b = copy(linear_bundle, tmp_path)
    with (b / "rules.yaml").open("a") as f:
        f.write("# edited\n")
    with pytest.raises(FormatError, match=r"rules\.yaml: content does not match"):
        load_bundle(b)


def test_missing_file_is_named(linear_bundle: Path, tmp_path: Path) -> None:
    b = copy(linear_bundle, tmp_path)
    (b / "linear.npz").unlink()
    with pytest.raises(FormatError, match=r"linear\.npz: listed in the manifest but missing"):
        load_bundle(b)


def rewrite_manifest(b: Path, **changes: object) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m.update(changes)
    (b / "manifest.json").write_text(json.dumps(m))


def test_unknown_version_and_broken_manifest(linear_bundle: Path, tmp_path: Path) -> None:
    b = copy(linear_bundle, tmp_path)
    rewrite_manifest(b, format_version=99)
    with pytest.raises(FormatError, match="format version 99 is not supported"):
        load_bundle(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"manifest\.json: not valid JSON"):
        load_bundle(b)
    (b / "manifest.json").unlink()
    with pytest.raises(FormatError, match=r"missing \(is .* a tiergate bundle\?\)"):
        load_bundle(b)


def test_a_tier_without_a_general_threshold_is_refused_at_load(
    linear_bundle: Path, tmp_path: Path
) -> None:
    # Labels of no domain of their own are gated by "general": without it a request
    # would fail inside the gate (found by the mutated-manifest fuzz test).
    b = copy(linear_bundle, tmp_path)
    thresholds = json.loads((b / "manifest.json").read_text())["thresholds"]
    del thresholds["linear"]["general"]
    rewrite_manifest(b, thresholds=thresholds)
    with pytest.raises(FormatError, match=r"thresholds\.linear has no 'general' entry"):
        load_bundle(b)


def test_label_set_mismatch_is_caught_when_the_tier_loads(
    linear_bundle: Path, tmp_path: Path
) -> None:
    b = copy(linear_bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    rewrite_manifest(b, labels=[*m["labels"][:-1], "something_else"])
    bundle = load_bundle(b)
    with pytest.raises(FormatError, match=r"linear\.npz: its labels differ"):
        bundle.linear_model()


def test_intent_labels_must_match(full_bundle: Path, tmp_path: Path) -> None:
    import hashlib

    b = copy(full_bundle, tmp_path)
    config = json.loads((b / "intent" / "config.json").read_text())
    config["id2label"]["0"] = "renamed"
    (b / "intent" / "config.json").write_text(json.dumps(config))
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["intent/config.json"] = hashlib.sha256(
        (b / "intent" / "config.json").read_bytes()
    ).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=r"intent/config\.json: the intent model's labels differ"):
        load_bundle(b)


def test_training_refuses_to_overwrite_and_unknown_rule_labels(
    linear_bundle: Path, tmp_path: Path
) -> None:
    splits = load_splits(INTENTS)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        train_bundle(splits, linear_bundle, TrainOptions(intent=None, progress=False))
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - id: x\n    label: nope\n    patterns: [{keywords: [a]}]\n"
    )
    with pytest.raises(ConfigError, match="rule 'x' answers label 'nope'"):
        train_bundle(
            splits, tmp_path / "new", TrainOptions(rules=rules, intent=None, progress=False)
        )


def test_calibration_baked_into_the_linear_model_matches_the_calibrator(
    linear_bundle: Path, tmp_path: Path
) -> None:
    """The front end scores with the calibration folded into the Rust model's weights;
    it must give the calibrator's distribution, bias on the out-of-scope column included."""
    root = copy(linear_bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tiers"]["linear"]["calibration"].update(bias_index=2, bias=1.7)
    (root / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(root)
    sample = texts(load_splits(INTENTS).test)
    cal = bundle.calibrator("linear")
    expected = cal.probabilities(bundle.linear_model().decision_function(sample))
    baked = bundle.linear_model(calibrated=True).predict_proba(sample)
    assert np.allclose(baked, expected, atol=1e-5)
    # and the bias did something: column 2's score moved by T * bias, the others not at all
    shift = bundle.linear_model(calibrated=True).decision_function(sample) - (
        bundle.linear_model().decision_function(sample)
    )
    assert np.allclose(shift[:, 2], cal.temperature * 1.7, atol=1e-4)
    assert np.allclose(np.delete(shift, 2, axis=1), 0.0)
    manifest["tiers"]["linear"]["calibration"]["bias_index"] = 10_000
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="not a label column"):
        load_bundle(root)
