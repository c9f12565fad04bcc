"""The frontier tier: a large LLM behind an OpenAI-compatible API, or a simulator.

The simulator stands in for a real provider in offline evaluation and
benchmarks. Its accuracy, latency distribution and prices are explicit
parameters, printed with every result it produces, and every result is
labelled ``simulated`` so it can never pass for a measurement.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError
from tiergate.data import OUT_OF_SCOPE


@dataclass(frozen=True)
class FrontierAnswer:
    label: str | None  # None when the provider gave no usable label
    cost: float  # US dollars
    seconds: float
    simulated: bool
    error: str | None = None


def estimate_tokens(text: str) -> int:
    """~4 characters per token for ASCII, the usual rule of thumb for English BPE
    vocabularies. Other characters (CJK, emoji, accented letters) take about a token
    or more each: counted at 1.5, so that a reservation made from it still covers them."""
    if text.isascii():
        return max(1, math.ceil(len(text) / 4))
    ascii_chars = len(text.encode("ascii", "ignore"))
    return max(1, math.ceil(ascii_chars / 4 + 1.5 * (len(text) - ascii_chars)))


def prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Estimated input tokens of a chat prompt (see :func:`estimate_tokens`)."""
    return sum(estimate_tokens(m["content"]) for m in messages)


# How many of the local tiers' likeliest labels an escalation offers the frontier.
# The prompt lists the labels it may answer, so its length, and the price of every
# escalation, grows with the label set: on CLINC150 the 151 labels are ~95% of the
# prompt. There, the 20 likeliest held the true label for 98.4% of the in-scope
# requests the cascade escalated (`tiergate eval`); the rest are lost, since the
# frontier cannot name a label it is not offered. The out-of-scope label is always
# offered.
DEFAULT_CANDIDATES = 20


def shortlist(
    probs: npt.ArrayLike, labels: Sequence[str], k: int, always: Sequence[str] = (OUT_OF_SCOPE,)
) -> list[str]:
    """The ``k`` likeliest labels under ``probs``, plus those of ``always`` that the
    label set has, listed in the task's order; the whole set when ``k`` is 0 or covers it.

    Not likeliest first: models lean towards the first options they are shown, and the
    frontier's answer enters the caches when it agrees with a local tier, so the order
    must not push it towards the local tiers' guess. (The prompt's hints still name
    that guess: this removes one pull towards agreement, not every one.)"""
    if k <= 0 or k >= len(labels):
        return list(labels)
    p = np.asarray(probs, dtype=np.float64)
    chosen = set(np.argpartition(-p, k - 1)[:k].tolist())
    chosen |= {i for i, label in enumerate(labels) if label in always}
    return [labels[i] for i in sorted(chosen)]


def prompt_for(text: str, labels: Sequence[str], hints: str = "") -> list[dict[str, str]]:
    system = (
        "You label requests for an intent classifier. Answer with exactly one label "
        "from the list, or 'oos' when none fits. Labels: " + ", ".join(labels)
    )
    user = text if not hints else f"{text}\n\n(cheaper tiers suggested: {hints})"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class SimulatorParams:
    accuracy: float = 0.97
    latency_median_ms: float = 900.0
    latency_p95_ms: float = 2500.0
    price_in_per_mtok: float = 2.50
    price_out_per_mtok: float = 10.00
    output_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.accuracy <= 1:
            raise ConfigError(f"simulator accuracy must be in [0, 1], not {self.accuracy}")
        if not 0 < self.latency_median_ms <= self.latency_p95_ms:
            raise ConfigError("simulator latency needs 0 < median <= p95")

    def describe(self) -> str:
        return (
            f"SIMULATED frontier: accuracy {self.accuracy:.3f}, latency lognormal "
            f"median {self.latency_median_ms:.0f} ms / p95 {self.latency_p95_ms:.0f} ms, "
            f"${self.price_in_per_mtok}/M input and ${self.price_out_per_mtok}/M output tokens"
        )


def simulated_draw(seed: int, text: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, text, salt): the simulator's answer to a
    text is the same every time it is asked, as a real model's at temperature 0."""
    digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def simulated_answer(seed: int, accuracy: float, truth: str, source: str,
                     labels: Sequence[str]) -> str:  # fmt: skip
    """The simulated label for a text whose true label is ``truth``, out of ``labels``
    (in the task's order when shortlisted): right with probability ``accuracy``, else a
    wrong label. ``source`` fixes the draw (a paraphrase gets its original's answer).
    A true label that is not offered cannot be named: the first one offered stands in
    (the worst case of a model's lean towards the first options)."""
    if not labels:
        return truth
    if simulated_draw(seed, source, "correct") < accuracy or len(labels) < 2:
        return truth if truth in labels else labels[0]
    others = [x for x in labels if x != truth]
    return others[int(simulated_draw(seed, source, "wrong") * len(others))]


class FrontierSimulator:
    """Answers the gold label with probability ``accuracy``, else a random other label;
    the same answer every time for the same text (see :func:`simulated_answer`)."""

    simulated = True

    def __init__(self, labels: Sequence[str], params: SimulatorParams | None = None):
        self.labels = list(labels)
        self.params = params or SimulatorParams()
        self.rng = np.random.default_rng(self.params.seed)
        # Lognormal with the given median and 95th percentile.
        self.mu = math.log(self.params.latency_median_ms / 1000)
        self.sigma = (math.log(self.params.latency_p95_ms / 1000) - self.mu) / 1.6449

    def cost_of(self, text: str, labels: Sequence[str] | None = None) -> float:
        tokens_in = prompt_tokens(prompt_for(text, self.labels if labels is None else labels))
        p = self.params
        return (tokens_in * p.price_in_per_mtok + p.output_tokens * p.price_out_per_mtok) / 1e6

    def classify(
        self,
        texts: Sequence[str],
        gold: Sequence[str],
        candidates: Sequence[Sequence[str]] | None = None,
    ) -> list[FrontierAnswer]:
        """``candidates``: the labels offered for each text (default: the whole set)."""
        out = []
        for i, (text, truth) in enumerate(zip(texts, gold, strict=True)):
            offered = self.labels if candidates is None else candidates[i]
            p = self.params
            label = simulated_answer(p.seed, p.accuracy, truth, text, offered)
            seconds = float(self.rng.lognormal(self.mu, self.sigma))
            out.append(FrontierAnswer(label, self.cost_of(text, offered), seconds, True))
        return out

    def as_dict(self) -> dict[str, object]:
        return {"simulated": True, **asdict(self.params)}


@dataclass(frozen=True)
class ProviderConfig:
    """One OpenAI-compatible chat-completions endpoint."""

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    timeout_s: float = 30.0

    def api_key(self) -> str:
        """The key from the environment (a clear error when the variable is unset)."""
        if not self.api_key_env:
            return "unused"  # the client insists on a value; keyless servers ignore it
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(
                f"provider {self.name!r}: environment variable {self.api_key_env} is unset"
            )
        return key


class OpenAIFrontier:
    """A real provider: asks for one label with structured output; cost from reported usage."""

    simulated = False

    def __init__(self, labels: Sequence[str], provider: ProviderConfig):
        from openai import OpenAI  # the maintained client for this API, retries included

        self.labels = list(labels)
        self.provider = provider
        self.client = OpenAI(
            base_url=provider.base_url,
            api_key=provider.api_key(),
            timeout=provider.timeout_s,
            max_retries=1,
        )

    def classify_one(
        self, text: str, hints: str = "", labels: Sequence[str] | None = None
    ) -> FrontierAnswer:
        """One escalation; ``labels`` replaces the client's label set for this call only."""
        import openai

        from tiergate.escalation import label_schema, parse_label

        labels = list(labels) if labels is not None else self.labels

        started = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(  # type: ignore[call-overload]
                model=self.provider.model,
                messages=prompt_for(text, labels, hints),
                response_format=label_schema(labels),
                temperature=0,
                max_tokens=32,
            )
        except openai.OpenAIError as e:
            return FrontierAnswer(None, 0.0, time.perf_counter() - started, False, str(e))
        seconds = time.perf_counter() - started
        usage = resp.usage
        cost = 0.0
        if usage is not None:
            cost = (
                usage.prompt_tokens * self.provider.price_in_per_mtok
                + usage.completion_tokens * self.provider.price_out_per_mtok
            ) / 1e6
        content = resp.choices[0].message.content if resp.choices else None
        label, error = parse_label(content, labels)
        return FrontierAnswer(label, cost, seconds, False, error)

    def classify(
        self,
        texts: Sequence[str],
        gold: Sequence[str] | None = None,
        candidates: Sequence[Sequence[str]] | None = None,
    ) -> list[FrontierAnswer]:
        return [
            self.classify_one(t, labels=None if candidates is None else candidates[i])
            for i, t in enumerate(texts)
        ]
