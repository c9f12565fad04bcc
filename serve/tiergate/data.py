"""Labelled text datasets: JSONL, CSV, and the CLINC150 JSON layout.

Every loader returns the same thing, a :class:`Splits` of ``(text, label)``
examples, so training and evaluation never care where the data came from.
Out-of-scope examples carry the label :data:`OUT_OF_SCOPE`; they are a class
like any other for the local tiers, so a tier can learn to say "not mine".
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tiergate._core import ConfigError, FormatError

OUT_OF_SCOPE = "oos"

# CLINC150's high-stakes domains (its README names them); a label in one of
# these inherits the ``finance`` risk domain and its stricter gate.
CLINC_FINANCE_DOMAINS = ("banking", "credit_cards")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass
class Splits:
    """Train / validation / test examples plus what we know about the labels."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: str
    # label -> risk domain (e.g. "finance"); labels absent here are "general".
    label_domains: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Every label seen in any split, sorted (the order the tiers use)."""
        return sorted({e.label for part in (self.train, self.val, self.test) for e in part})

    def describe(self) -> str:
        def count(part: list[Example]) -> str:
            oos = sum(e.label == OUT_OF_SCOPE for e in part)
            return f"{len(part)} ({oos} out-of-scope)"

        return (
            f"{self.source}: {len(self.labels)} labels; train {count(self.train)}, "
            f"val {count(self.val)}, test {count(self.test)}"
        )


def _bad(path: Path, where: str, reason: str) -> FormatError:
    return FormatError(f"{path}: {where}: {reason}")


def _example(path: Path, where: str, text: object, label: object) -> Example:
    if not isinstance(text, str):
        raise _bad(path, where, f"text must be a string, not {type(text).__name__}")
    if not isinstance(label, str):
        raise _bad(path, where, f"label must be a string, not {type(label).__name__}")
    if not text.strip():
        raise _bad(path, where, "text is empty")
    if not label.strip():
        raise _bad(path, where, "label is empty")
    return Example(text, label.strip())


def read_jsonl(path: Path) -> list[Example]:
    """One ``{"text": ..., "label": ...}`` object per line; blank lines are skipped."""
    out = []
    with _open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad(path, f"line {n}", f"not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, f"line {n}", f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise _bad(path, f"line {n}", 'expected an object with "text" and "label"')
            out.append(_example(path, f"line {n}", row["text"], row["label"]))
    return out


def read_csv(path: Path) -> list[Example]:
    """A CSV file with a header naming (at least) ``text`` and ``label`` columns."""
    out: list[Example] = []
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        try:
            columns = reader.fieldnames or []
            missing = [c for c in ("text", "label") if c not in columns]
            if missing:
                raise _bad(path, "header", f"missing column(s) {missing}; found {columns}")
            for row in reader:
                out.append(_example(path, f"line {reader.line_num}", row["text"], row["label"]))
        except UnicodeDecodeError as e:
            # The decoder reads ahead, so the line is approximate; the byte offset is exact.
            raise _bad(
                path,
                f"near line {reader.line_num + 1}",
                f"not valid UTF-8 (byte {e.start} of a block)",
            ) from None
    return out


def _open_binary(path: Path):  # type: ignore[no-untyped-def]
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"no dataset at {path}") from None


def _open_text(path: Path, newline: str | None = None):  # type: ignore[no-untyped-def]
    try:
        return path.open(encoding="utf-8", errors="strict", newline=newline)
    except FileNotFoundError:
        raise FileNotFoundError(f"no dataset at {path}") from None


def read_clinc150(path: Path) -> Splits:
    """CLINC150's ``data_full.json``: its own train / val / test, out-of-scope included."""
    try:
        with path.open(encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise _bad(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
    parts: dict[str, list[Example]] = {}
    for part in ("train", "val", "test"):
        rows = list(raw.get(part, [])) + list(raw.get(f"oos_{part}", []))
        if not rows:
            raise _bad(path, part, f'no "{part}" examples: is this the CLINC150 layout?')
        parts[part] = [
            _example(path, f"{part}[{i}]", *_pair(path, part, i, r)) for i, r in enumerate(rows)
        ]
    domains = _clinc_domains(path.parent / "domains.json")
    return Splits(parts["train"], parts["val"], parts["test"], f"CLINC150 ({path})", domains)


def _pair(path: Path, part: str, i: int, row: object) -> tuple[object, object]:
    if not isinstance(row, list) or len(row) != 2:
        raise _bad(path, f"{part}[{i}]", "expected [text, intent]")
    return row[0], row[1]


def _clinc_domains(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with path.open(encoding="utf-8") as f:
        domains: dict[str, list[str]] = json.load(f)
    return {
        label: "finance" for domain in CLINC_FINANCE_DOMAINS for label in domains.get(domain, [])
    }


def is_clinc150(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    with path.open("rb") as f:
        head = f.read(4096)
    return b'"oos_' in head or b'"train"' in head


def seeded_split(
    examples: Sequence[Example], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """A stratified split: each label keeps its share in every part (when it has enough)."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise ConfigError("split fractions must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ConfigError("val and test fractions leave nothing to train on")
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        n_val = round(len(group) * val_fraction)
        test += group[:n_test]
        val += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    for part in (train, val, test):
        rng.shuffle(part)
    return train, val, test


def load_splits(
    path: str | Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    resplit: bool = False,
) -> Splits:
    """Reads a dataset and returns its splits.

    CLINC150 keeps its published splits unless ``resplit``; JSONL and CSV get a
    seeded stratified split.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if is_clinc150(path):
        splits = read_clinc150(path)
        if not resplit:
            return splits
        examples: list[Example] = splits.train + splits.val + splits.test
        domains = splits.label_domains
    else:
        if path.suffix == ".jsonl":
            examples = read_jsonl(path)
        elif path.suffix == ".csv":
            examples = read_csv(path)
        else:
            raise ConfigError(f"{path}: unknown dataset type; use .jsonl, .csv or CLINC150 .json")
        domains = {}
    if len(examples) < 3:
        raise FormatError(f"{path}: {len(examples)} examples are too few to train on")
    train, val, test = seeded_split(
        examples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return Splits(train, val, test, str(path), domains)


def texts(examples: Iterable[Example]) -> list[str]:
    return [e.text for e in examples]
