"""What every micro-benchmark section shares: inputs, timing and the result row.

Timings are medians over repeats, taken in one process on the same inputs for
tiergate and its baseline, so the ratio survives a noisy shared machine even
when the absolute numbers move.
"""

from __future__ import annotations

import json
import random
import statistics
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLINC_PATH = ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"


@dataclass
class Inputs:
    """The texts every section runs on, built once per run."""

    quick: bool
    short_texts: list[str]
    """Synthetic ~100-byte texts (seeded), always present."""
    clinc_texts: list[str] | None
    """CLINC150 test texts when the shared data is present, else None."""
    clinc: dict[str, list[list[str]]] | None = None

    @property
    def texts(self) -> list[str]:
        """CLINC150 texts when present (real traffic), else the synthetic ones."""
        return self.clinc_texts if self.clinc_texts else self.short_texts

    @property
    def source(self) -> str:
        return "CLINC150 test" if self.clinc_texts else "synthetic ~100-byte"


def make_inputs(quick: bool, seed: int = 7) -> Inputs:
    rng = random.Random(seed)
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        for _ in range(2_000)
    ]
    short = []
    for _ in range(2_000 if quick else 10_000):
        text = ""
        while len(text) < 100:
            text += rng.choice(words) + " "
        short.append(text[:100].strip())
    clinc = None
    clinc_texts = None
    if CLINC_PATH.exists():
        clinc = json.loads(CLINC_PATH.read_text(encoding="utf-8"))
        clinc_texts = [t for t, _ in clinc["test"] + clinc["oos_test"]]
    return Inputs(quick=quick, short_texts=short, clinc_texts=clinc_texts, clinc=clinc)


def median_seconds(fn: Callable[[], object], *, repeat: int, number: int = 1) -> float:
    """Median wall time of one call of `fn`, over `repeat` samples of `number` calls."""
    fn()  # warm-up: caches, lazy initialisation, branch predictors
    samples = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter_ns() - start) / number / 1e9)
    return statistics.median(samples)


@dataclass
class Row:
    """One comparison: tiergate and its baseline on the same case, same inputs."""

    section: str
    case: str
    unit: str
    ours: float
    baseline_name: str
    baseline: float | None
    higher_is_better: bool = False
    target: str = ""
    target_met: bool | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """How many times better tiergate is than the baseline (>1 means better)."""
        if self.baseline is None or self.ours == 0 or self.baseline == 0:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours

    def as_dict(self) -> dict[str, object]:
        return {
            "section": self.section,
            "case": self.case,
            "unit": self.unit,
            "tiergate": self.ours,
            "baseline_name": self.baseline_name,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "target_met": self.target_met,
            "notes": self.notes,
        }


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown_table(rows: list[Row]) -> str:
    head = "| section | case | unit | tiergate | baseline | baseline value | ratio | target | met |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r.target_met]
        ratio = f"{r.ratio:.1f}x" if r.ratio is not None else "-"
        lines.append(
            f"| {r.section} | {r.case} | {r.unit} | {format_value(r.ours)} | {r.baseline_name} "
            f"| {format_value(r.baseline)} | {ratio} | {r.target} | {met} |"
        )
    return "\n".join(lines)
