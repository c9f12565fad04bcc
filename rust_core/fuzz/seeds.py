"""Writes a seed corpus per fuzz target: small valid inputs that libFuzzer mutates
from, so that it starts past the magic bytes and checksums. `make fuzz` runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tiergate._core import AnnIndex, SemanticCache

EXAMPLES = Path(__file__).resolve().parents[2] / "serve" / "tiergate" / "examples"


def main(out: Path) -> None:
    for target in ("ann_index_file", "cache_snapshot", "rule_file", "match_text"):
        (out / target).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, exact_below in ((5, 16), (40, 16)):  # the exact layout, then a graph
        index = AnnIndex(4, exact_below=exact_below)
        index.add(np.arange(n, dtype=np.uint64), rng.normal(size=(n, 4)).astype(np.float32))
        index.save(out / "ann_index_file" / f"index-{n}")
    cache = SemanticCache(4, threshold=0.9, ttl_seconds=3600)
    for i in range(6):
        cache.put(f"tenant{i % 2}", rng.normal(size=4).astype(np.float32), f"label{i}".encode())
    cache.save(out / "cache_snapshot" / "snapshot")
    for rules in EXAMPLES.glob("*rules.yaml"):
        (out / "rule_file" / rules.name).write_bytes(rules.read_bytes())
    texts = ["I want a refund", "sue my lawyer in court", "card 1234 5678 9012 3456", "ünïcödé"]
    for i, text in enumerate(texts):
        (out / "match_text" / f"text{i}").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
