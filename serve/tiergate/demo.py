"""A short tour of the Rust tiers; ``make serve`` runs it until the gRPC server lands.

It loads the example rule file, trains the hashed linear tier on the small
example intent set shipped with the package (written by the tiergate
authors), fills a semantic cache, and classifies a few texts, printing which
tier decided and how long it took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import tiergate
from tiergate import FeatureHasher, LinearModel, RuleSet, SemanticCache

EXAMPLES = Path(__file__).parent / "examples"
DEMO_TEXTS = [
    "I will call my lawyer about this chargeback",
    "where is my package, it is late",
    "I forgot my password again",
    "please cancel the renewal of my plan",
    "mail me at jo@example.com about my refund",
    "what is the weather on mars",
]


def load_examples() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (EXAMPLES / "intents.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def train_linear(texts: list[str], labels: list[str]) -> LinearModel:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:  # the demo needs the dev extras, as `make serve` installs
        raise SystemExit("the demo trains with scikit-learn: pip install 'tiergate[dev]'") from e
    hasher = FeatureHasher(2**16, ngram_range=(1, 2))
    data, indices, indptr = hasher.transform(texts)
    import scipy.sparse as sp

    X = sp.csr_matrix((data, indices, indptr), shape=(len(texts), hasher.n_features))
    clf = LogisticRegression(max_iter=500, C=10.0).fit(X, labels)
    return LinearModel(hasher, clf.coef_, clf.intercept_, [str(c) for c in clf.classes_])


def toy_embedding(hasher: FeatureHasher, text: str) -> np.ndarray:
    """A stand-in embedding (dense hashed char n-grams) until the model tier exists."""
    data, indices, _ = hasher.transform([text])
    v = np.zeros(hasher.n_features, dtype=np.float32)
    np.add.at(v, indices, data)
    return v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tiergate.demo", description="A short tour of tiergate's Rust tiers."
    )
    parser.add_argument("--threshold", type=float, default=0.6, help="linear-tier confidence gate")
    args = parser.parse_args(argv)

    print(f"tiergate {tiergate.__version__}: Rust tiers from tiergate._core\n")
    rules = RuleSet.from_file(EXAMPLES / "support_rules.yaml")
    texts, labels = load_examples()
    started = time.perf_counter()
    model = train_linear(texts, labels)
    print(f"rules tier: {len(rules)} rules; linear tier: trained on {len(texts)} example texts "
          f"in {time.perf_counter() - started:.2f}s; classes {model.labels}\n")  # fmt: skip
    embedder = FeatureHasher(256, analyzer="char_wb", ngram_range=(3, 4))
    cache = SemanticCache(256, threshold=0.9)

    print("   µs (whole demo step, Python included)  decision")
    for text in [*DEMO_TEXTS, DEMO_TEXTS[1].upper()]:
        t0 = time.perf_counter_ns()
        vector = toy_embedding(embedder, text)
        cached = cache.get("demo-tenant", vector)
        matched = rules.match(text)
        if cached is not None:
            decision = json.loads(cached[0]) | {"tier": "semantic cache"}
        elif matched:
            decision = {"label": matched.label, "confidence": matched.confidence, "tier": "rules"}
        else:
            probs = model.predict_proba([text])[0]
            best = int(probs.argmax())
            if probs[best] >= args.threshold:
                decision = {"label": model.labels[best], "confidence": float(probs[best]),
                            "tier": "linear"}  # fmt: skip
            else:
                decision = {"label": None, "confidence": float(probs[best]),
                            "tier": "escalate (no model tier yet)"}  # fmt: skip
        micros = (time.perf_counter_ns() - t0) / 1e3
        if decision["label"] is not None and "pii" not in matched.risk_tags:
            cache.put("demo-tenant", vector, json.dumps(decision).encode())
        tags = ",".join(matched.risk_tags) or "-"
        print(f"{micros:8.1f} µs  {decision['tier']:<28} {decision['label']!s:<20} "
              f"conf={decision['confidence']:.2f}  tags={tags:<14} {text!r}")  # fmt: skip
    print(f"\ncache: {cache.stats()['total']}")
    print("The gRPC server, model tiers and escalation arrive in the next issues.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
