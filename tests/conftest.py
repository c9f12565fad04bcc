"""Shared test configuration.

Hypothesis runs a fast profile by default so `make test` stays quick; set
TIERGATE_HYPOTHESIS_PROFILE=thorough for many more examples per property.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tiergate.data import load_splits
from tiergate.gate import Target
from tiergate.train import TrainOptions, train_bundle
from tiergate.train.intent import IntentTrainConfig

settings.register_profile(
    "fast", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("TIERGATE_HYPOTHESIS_PROFILE", "fast"))

ROOT = Path(__file__).resolve().parent.parent
CLINC_DIR = ROOT.parent / "shared" / "data" / "clinc150"


@pytest.fixture(scope="session")
def clinc150() -> dict[str, list[list[str]]]:
    """The CLINC150 'full' split, or a skip where the shared data is absent."""
    import json

    path = CLINC_DIR / "data_full.json"
    if not path.exists():
        pytest.skip(
            f"CLINC150 not found at {path}: it lives in the shared data folder beside the "
            "repository, which a user's clone does not have"
        )
    with path.open(encoding="utf-8") as f:
        data: dict[str, list[list[str]]] = json.load(f)
    return data


# Small bundles trained once per session, shared by the training and serving tests.

INTENTS = ROOT / "serve" / "tiergate" / "examples" / "intents.jsonl"

# Rules whose labels are in intents.jsonl, plus a tag-only finance rule.
RULES = """\
version: 1
rules:
  - id: refund
    label: refund
    patterns: [{keywords: [refund, money back]}]
    priority: 10
    confidence: 0.95
    risk_tags: [finance]
  - id: password
    label: reset_password
    patterns: [{regex: '\\bpass(word|code)\\b'}]
    priority: 5
    confidence: 0.9
  - id: card-words
    patterns: [{keywords: [credit card, bank account]}]
    risk_tags: [finance]
"""


@pytest.fixture(scope="session")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(RULES, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def linear_bundle(tmp_path_factory: pytest.TempPathFactory, rules_file: Path) -> Path:
    """Rules + linear tiers on the shipped example intents (seconds to train)."""
    out = tmp_path_factory.mktemp("bundles") / "linear"
    options = TrainOptions(rules=rules_file, intent=None, progress=False)
    train_bundle(load_splits(INTENTS, seed=0), out, options)
    return out


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory: pytest.TempPathFactory, rules_file: Path) -> Path:
    """All three tiers; the intent model gets a few optimiser steps of real fine-tuning."""
    out = tmp_path_factory.mktemp("bundles") / "full"
    options = TrainOptions(
        rules=rules_file,
        intent=IntentTrainConfig(max_steps=12, batch_size=16, learning_rate=3e-4, threads=2),
        target=Target(precision=0.9),
        progress=False,
    )
    train_bundle(load_splits(INTENTS, seed=0), out, options)
    return out


def edited_bundle(bundle: Path, out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of ``bundle`` at ``out`` whose manifest ``edit`` changed in place."""
    shutil.copytree(bundle, out)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return out
