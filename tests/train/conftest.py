"""Small bundles trained once per session: the tests of bundles and eval share them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from tiergate.data import load_splits
from tiergate.gate import Target
from tiergate.train import TrainOptions, train_bundle
from tiergate.train.intent import IntentTrainConfig

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
