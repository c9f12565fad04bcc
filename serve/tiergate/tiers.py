"""The local tiers as the cascade sees them: batch in, (label, confidence) out.

Each tier returns a :class:`TierOutput` over the bundle's label list: the
predicted label index (-1 where the tier has nothing to say, e.g. no rule
matched), its calibrated confidence, and the risk domain of each answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from tiergate._core import ConfigError, LinearModel, RuleSet
from tiergate.bundle import ZERO_SHOT, Bundle
from tiergate.calibration import Calibrator
from tiergate.gate import GENERAL, STRICT_DOMAINS

if TYPE_CHECKING:
    from tiergate.zero_shot import ZeroShotBackend

# The cascade's tiers in the order a request meets them: the single definition
# the engine, the policy parser and the evaluation share.
LOCAL_TIERS = ("rules", "linear", "intent")
ORDER = (*LOCAL_TIERS, "frontier")


@dataclass
class TierOutput:
    pred: npt.NDArray[np.int64]  # label index, -1 for "no answer"
    confidence: npt.NDArray[np.float64]  # calibrated; 0 where pred is -1
    domains: list[str]  # risk domain of each request as this tier sees it
    seconds: float = 0.0  # wall time of the batch
    # The calibrated distribution: a later tier may mix it into its own, and an
    # escalation offers the frontier its likeliest labels.
    probs: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.pred)


def answer_domains(
    pred: npt.NDArray[np.int64],
    labels: Sequence[str],
    label_domains: dict[str, str],
    risk_tags: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """A request's domain: a strict risk tag raised by the rules, else its label's domain."""
    out = []
    for i, p in enumerate(pred):
        tags = risk_tags[i] if risk_tags is not None else ()
        strict = next((t for t in STRICT_DOMAINS if t in tags), None)
        if strict is not None:
            out.append(strict)
        elif p >= 0:
            out.append(label_domains.get(labels[p], GENERAL))
        else:
            out.append(GENERAL)
    return out


class RulesTier:
    """Written rules. A rule's confidence is replaced by its measured precision.

    The declared confidence acts as a prior worth two examples, so a rule that
    fired rarely on held-out data keeps roughly what its author wrote.
    """

    name = "rules"

    def __init__(
        self, rules: RuleSet, labels: Sequence[str], precision: dict[str, float] | None = None
    ):
        index = {label: i for i, label in enumerate(labels)}
        unknown = [
            (rid, lab)
            for rid, lab in zip(rules.rule_ids, rules.labels, strict=True)
            if lab is not None and lab not in index
        ]
        if unknown:
            rid, lab = unknown[0]
            raise ConfigError(
                f"rule {rid!r} answers label {lab!r}, which is not in the training labels "
                f"({len(unknown)} rule(s) like this)"
            )
        self.rules = rules
        self.labels = list(labels)
        self.label_index = index
        self.rule_label = np.array(
            [index[lab] if lab is not None else -1 for lab in rules.labels], dtype=np.int64
        )
        self.precision = dict(precision or {})

    def match(self, texts: Sequence[str]) -> tuple[TierOutput, list[list[str]]]:
        import time

        started = time.perf_counter()
        matches = self.rules.match_batch(texts)
        seconds = time.perf_counter() - started
        pred = np.full(len(texts), -1, dtype=np.int64)
        conf = np.zeros(len(texts))
        for i, m in enumerate(matches):
            if m.rule_id is not None and m.label is not None:
                pred[i] = self.label_index[m.label]
                conf[i] = self.precision.get(m.rule_id, m.confidence or 0.0)
        tags = [m.risk_tags for m in matches]
        return TierOutput(pred, conf, [GENERAL] * len(texts), seconds), tags

    def fit_precision(
        self, texts: Sequence[str], gold: npt.ArrayLike
    ) -> dict[str, dict[str, float]]:
        """Measures each winning rule's precision on held-out data; returns the report."""
        y = np.asarray(gold)
        winners = [m.rule_id for m in self.rules.match_batch(texts)]
        report: dict[str, dict[str, float]] = {}
        for r, (rid, declared) in enumerate(
            zip(self.rules.rule_ids, self.rules.confidences, strict=True)
        ):
            fired = [i for i, w in enumerate(winners) if w == rid]
            if not fired or self.rule_label[r] < 0:
                continue
            hits = int(sum(y[i] == self.rule_label[r] for i in fired))
            measured = (hits + 2 * declared) / (len(fired) + 2)
            self.precision[rid] = measured
            report[rid] = {"fired": len(fired), "correct": hits, "confidence": measured}
        return report


class LinearTier:
    """The hashed linear model; its temperature is the calibration."""

    name = "linear"

    def __init__(self, model: LinearModel, calibrator: Calibrator, label_domains: dict[str, str]):
        self.model = model
        self.calibrator = calibrator
        self.label_domains = label_domains

    def logits(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        return np.asarray(self.model.decision_function(texts), dtype=np.float64)

    def predict(self, texts: Sequence[str]) -> TierOutput:
        import time

        started = time.perf_counter()
        probs = self.calibrator.probabilities(self.logits(texts))
        pred, conf = self.calibrator.apply_probabilities(probs)
        # As the engine does: no answer for a text of which training saw no feature
        # (its scores are the intercepts alone), so gates and evaluations match serving.
        unknown = self.model.top_k(texts, 1, min_known=1)[0][:, 0] < 0
        pred[unknown], conf[unknown] = -1, 0.0
        seconds = time.perf_counter() - started
        domains = answer_domains(pred, self.model.labels, self.label_domains)
        return TierOutput(pred, conf, domains, seconds, probs)


class IntentBackend(Protocol):
    """Anything that turns texts into classification logits over the bundle's labels."""

    labels: list[str]

    def logits(self, texts: Sequence[str]) -> npt.NDArray[np.float64]: ...


class TransformersIntentModel:
    """The intent model run in-process with PyTorch (offline evaluation, tests).

    Serving uses vLLM's pooling runner on the same checkpoint; this backend
    exists so `tiergate eval` needs no server and gives the reference logits.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 64, max_length: int = 64):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path))
        self.model.eval()
        id2label = self.model.config.id2label
        self.labels = [id2label[i] for i in range(len(id2label))]
        self.batch_size = batch_size
        self.max_length = max_length

    def logits(self, texts: Sequence[str]) -> npt.NDArray[np.float64]:
        return self.infer(texts, embed=False)[0]

    def close(self) -> None:
        """Nothing to stop: the model is memory, freed with this object."""

    def infer(
        self, texts: Sequence[str], *, embed: bool = True
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        """Logits and (optionally) unit-length sentence embeddings from one forward pass.

        The embedding is the mean of the encoder's last hidden states over real
        tokens, the pooling all-MiniLM-L6-v2 was trained with; it feeds the
        semantic cache at no extra model cost.
        """
        out, vectors = [], []
        with self.torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                result = self.model(**enc, output_hidden_states=embed)
                out.append(result.logits.float().numpy())
                if embed:
                    mask = enc["attention_mask"].unsqueeze(-1).float()
                    pooled = (result.hidden_states[-1] * mask).sum(1) / mask.sum(1).clamp(min=1)
                    pooled = self.torch.nn.functional.normalize(pooled, dim=1)
                    vectors.append(pooled.float().numpy())
        if not out:
            return np.zeros((0, len(self.labels))), None
        logits: npt.NDArray[np.float64] = np.concatenate(out).astype(np.float64)
        return logits, (np.concatenate(vectors).astype(np.float32) if embed else None)


def load_intent_backend(bundle: Bundle) -> TransformersIntentModel | ZeroShotBackend:
    """The bundle's intent model, in-process: PyTorch for a fine-tuned classifier, a vLLM
    engine for a zero-shot instruct model (scored as it is served)."""
    settings = bundle.tiers["intent"]
    max_length = int(settings.get("max_length", 64))
    if settings.get("kind") == ZERO_SHOT:
        from tiergate.zero_shot import ZeroShotBackend

        return ZeroShotBackend(bundle.intent_path(), bundle.labels, max_length)
    return TransformersIntentModel(bundle.intent_path(), max_length=max_length)


class IntentTier:
    name = "intent"

    def __init__(
        self, backend: IntentBackend, calibrator: Calibrator, label_domains: dict[str, str]
    ):
        self.backend = backend
        self.calibrator = calibrator
        self.label_domains = label_domains

    def predict(
        self, texts: Sequence[str], linear_probs: npt.NDArray[np.float64] | None = None
    ) -> TierOutput:
        """``linear_probs``: the linear tier's calibrated distribution on the same texts,
        needed when the calibration mixes it in."""
        import time

        started = time.perf_counter()
        probs = self.calibrator.probabilities(self.backend.logits(texts), linear_probs)
        pred, conf = self.calibrator.apply_probabilities(probs)
        seconds = time.perf_counter() - started
        domains = answer_domains(pred, self.backend.labels, self.label_domains)
        return TierOutput(pred, conf, domains, seconds, probs)
