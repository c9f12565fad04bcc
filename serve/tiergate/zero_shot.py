"""Zero-shot intent classification: an instruct model picks one label of the set.

An instruct checkpoint (e.g. Qwen2.5-0.5B-Instruct) needs no fine-tuning to be
the intent tier. The prompt lists the labels and asks for one; each label,
followed by the end-of-answer token, is scored as a continuation of that prompt.
The sum of its tokens' log-probabilities is log P(answer = label): those sums
are the tier's logits, a distribution over exactly the label set (a constrained
choice), calibrated and gated like a fine-tuned classifier's.

:class:`LabelPrompt` is the one place the prompt and the answers are built, so
training (which calibrates on these scores) and serving (vLLM, in
:mod:`tiergate.model_server`) score the very same token sequences.
:class:`ZeroShotBackend` runs the vLLM scorer synchronously, for `tiergate
train`, `tiergate eval` and the in-process engine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError

# Files a checkpoint directory needs to be served; anything else (caches, README
# images, other formats' weights) stays out of the bundle.
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


class LabelPrompt:
    """The prompt for one text and the token ids of every label's answer."""

    def __init__(self, tokenizer: Any, labels: Sequence[str], max_text_tokens: int):
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_text_tokens = max_text_tokens
        self.system = (
            "Classify the user's request. Answer with exactly one label from this list and "
            "nothing else: " + ", ".join(self.labels)
        )
        # What closes an answer: the chat template's end-of-turn token, else EOS. It makes
        # every answer complete, so a label that prefixes another ("pay", "pay_bill")
        # cannot borrow the longer one's probability.
        end = tokenizer.eos_token_id
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            end = im_end
        closing = [end] if end is not None else []
        self.answers = [
            [*tokenizer.encode(label, add_special_tokens=False), *closing] for label in self.labels
        ]

    def prompt_ids(self, text: str) -> list[int]:
        # A long text is cut to max_text_tokens, as the fine-tuned tier truncates its input:
        # the prompt then always fits the engine's context (see max_model_len).
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.max_text_tokens:
            text = self.tokenizer.decode(ids[: self.max_text_tokens])
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": text}]
        if getattr(self.tokenizer, "chat_template", None):
            return list(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True, return_dict=False
                )
            )
        return list(self.tokenizer.encode(f"{self.system}\nRequest: {text}\nLabel: "))

    def max_model_len(self) -> int:
        """Context the engine needs: the prompt around a longest text, plus the longest
        answer, with slack for tokens that merge differently at the text's edges."""
        empty = len(self.prompt_ids(""))
        return empty + self.max_text_tokens + max(len(a) for a in self.answers) + 16


def load_tokenizer(checkpoint: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{checkpoint}: no usable tokenizer ({e})") from None


def is_causal_lm(checkpoint: str | Path) -> bool:
    """Does the checkpoint generate text (a ``...ForCausalLM``) rather than classify?"""
    try:
        config = json.loads(Path(checkpoint, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{checkpoint}: unreadable config.json ({e})") from None
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def copy_checkpoint(source: str, dest: Path) -> None:
    """Puts an instruct checkpoint (local directory or hub id) into a bundle as it is."""
    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, allow_patterns=list(CHECKPOINT_PATTERNS)))
        except Exception as e:  # network, auth, unknown repo: all mean "not available"
            raise ConfigError(
                f"{source!r} is neither a local checkpoint directory nor a hub model that "
                f"could be downloaded ({type(e).__name__}: {e})"
            ) from None
    if not is_causal_lm(path):
        raise ConfigError(
            f"{source}: zero-shot needs an instruct model (a ...ForCausalLM checkpoint); "
            "to fine-tune a classifier instead, leave out --zero-shot"
        )
    dest.mkdir(parents=True)
    for pattern in CHECKPOINT_PATTERNS:
        for f in path.glob(pattern):
            shutil.copyfile(f, dest / f.name)


class ZeroShotBackend:
    """The vLLM zero-shot scorer behind a synchronous ``logits``/``infer``.

    The engine lives on one private event loop (vLLM's output handler is bound to
    the loop that first used it); a lock keeps callers from different threads
    from driving that loop at once.
    """

    def __init__(self, checkpoint: str | Path, labels: Sequence[str], max_text_tokens: int):
        from tiergate.model_server import VllmZeroShotModel

        self.labels = list(labels)
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()

        async def start() -> VllmZeroShotModel:
            return VllmZeroShotModel(checkpoint, labels, None, max_text_tokens=max_text_tokens)

        self._model: Any = self._loop.run_until_complete(start())

    def logits(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.infer(texts, embed=False)[0]

    def infer(
        self, texts: Sequence[str], *, embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        """Logits; no embeddings (an instruct model is no sentence embedder)."""
        if self._model is None:
            raise RuntimeError("the zero-shot model was closed")
        with self._lock:
            logits, _ = self._loop.run_until_complete(self._model.infer(list(texts), embed=False))
        return logits, None

    def close(self) -> None:
        if self._model is not None:
            self._model.shutdown()
            self._model = None
        if self._loop.is_closed():
            return
        # vLLM's output handler still has a task on our loop: let it end as asyncio.run
        # would, or it fails later against a closed loop and leaks its sockets.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()
