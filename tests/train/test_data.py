"""Dataset loading: formats, clear errors, and the seeded stratified split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tiergate import ConfigError, FormatError
from tiergate.data import OUT_OF_SCOPE, Example, load_splits, read_csv, read_jsonl, seeded_split


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_read_the_same_examples(tmp_path: Path) -> None:
    rows = [("hello there", "greeting"), ('a "quoted", text', "other"), ("héllo ✓", "greeting")]
    jsonl = write(
        tmp_path / "d.jsonl",
        "\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows) + "\n\n",
    )
    import csv

    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i, (t, lab) in enumerate(rows):
            w.writerow([i, t, lab])
    expected = [Example(t, lab) for t, lab in rows]
    assert read_jsonl(jsonl) == expected
    assert read_csv(tmp_path / "d.csv") == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x"}\n{not json\n', "line 2: not valid JSON"),
        ('{"text": "a"}\n', 'line 1: expected an object with "text" and "label"'),
        ('{"text": "  ", "label": "x"}\n', "line 1: text is empty"),
        ('{"text": 3, "label": "x"}\n', "text must be a string, not int"),
    ],
)
def test_broken_jsonl_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_jsonl(write(tmp_path / "d.jsonl", content))


def test_csv_without_label_column_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"missing column\(s\) \['label'\]"):
        read_csv(write(tmp_path / "d.csv", "text,intent\nhi,greet\n"))


def test_invalid_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(FormatError, match=r"line 2: not valid UTF-8"):
        read_jsonl(path)
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text,label\nok,x\ncaf\xe9,x\n")
    with pytest.raises(FormatError, match="not valid UTF-8"):
        read_csv(csv_path)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset type"):
        load_splits(write(tmp_path / "d.txt", "hello"))
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        load_splits(tmp_path / "absent.jsonl")


def test_seeded_split_is_stratified_and_reproducible() -> None:
    examples = [Example(f"text {lab} {i}", lab) for lab in "abcd" for i in range(40)]
    examples += [Example(f"oos {i}", OUT_OF_SCOPE) for i in range(20)]
    one = seeded_split(examples, val_fraction=0.25, test_fraction=0.25, seed=7)
    two = seeded_split(examples, val_fraction=0.25, test_fraction=0.25, seed=7)
    other = seeded_split(examples, val_fraction=0.25, test_fraction=0.25, seed=8)
    assert one == two
    assert one != other
    train, val, test = one
    assert sorted(e.text for e in train + val + test) == sorted(e.text for e in examples)
    for part, share in ((val, 0.25), (test, 0.25)):
        counts = Counter(e.label for e in part)
        assert counts == {"a": 10, "b": 10, "c": 10, "d": 10, OUT_OF_SCOPE: 5}, share


def test_split_fractions_are_checked() -> None:
    with pytest.raises(ConfigError, match="leave nothing to train on"):
        seeded_split([Example("a", "b")], val_fraction=0.5, test_fraction=0.5, seed=0)


def test_clinc150_keeps_its_published_splits(clinc150: dict[str, list[list[str]]]) -> None:
    from tests.conftest import CLINC_DIR

    splits = load_splits(CLINC_DIR / "data_full.json")
    assert len(splits.train) == len(clinc150["train"]) + len(clinc150["oos_train"])
    assert len(splits.test) == len(clinc150["test"]) + len(clinc150["oos_test"])
    assert len(splits.labels) == 151
    assert OUT_OF_SCOPE in splits.labels
    # banking and credit_cards intents carry the finance risk domain
    assert splits.label_domains["transfer"] == "finance"
    assert "weather" not in splits.label_domains
