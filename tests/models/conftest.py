"""A tiny decoder checkpoint for the model tests: no instruct model can be downloaded here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiergate.train.intent import PACKAGED_MODEL, resolve_base_model


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer Qwen2 causal LM around the packaged MiniLM's
    tokenizer: the shape of Qwen2.5-0.5B(-Instruct), a few MB big."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
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
