"""The rules tier: loading, matching semantics, errors, and a differential
property test against a straightforward pure-Python matcher."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tiergate
from tiergate import RuleSet

EXAMPLE = Path(tiergate.__file__).parent / "examples" / "support_rules.yaml"

RULES: list[dict[str, Any]] = [
    {
        "id": "refund",
        "label": "refund",
        "patterns": [{"keywords": ["refund", "money back"]}],
        "priority": 5,
        "confidence": 0.9,
        "risk_tags": ["finance"],
    },
    {
        "id": "chargeback",
        "label": "dispute",
        "patterns": [{"regex": r"charge ?backs?"}],
        "priority": 9,
        "risk_tags": ["legal", "finance"],
    },
    {"id": "ssn", "patterns": [{"regex": r"\b\d{3}-\d{2}-\d{4}\b"}], "risk_tags": ["pii"]},
    {"id": "école", "label": "school", "patterns": [{"keywords": ["ÉCOLE"]}]},
    {
        "id": "exact",
        "label": "shout",
        "patterns": [{"keywords": ["HELP"]}],
        "case_insensitive": False,
    },
]


def test_winner_tags_and_matched_ids() -> None:
    rs = RuleSet(RULES)
    m = rs.match("I want a Refund or a CHARGEBACK, ssn 123-45-6789")
    assert m
    assert (m.label, m.rule_id, m.priority) == ("dispute", "chargeback", 9)
    assert m.confidence == pytest.approx(1.0)
    assert m.risk_tags == ["finance", "legal", "pii"]
    assert m.matched_rule_ids == ["refund", "chargeback", "ssn"]


def test_no_match_still_carries_tags() -> None:
    rs = RuleSet(RULES)
    m = rs.match("my number is 123-45-6789")
    assert not m
    assert m.label is None
    assert m.confidence is None
    assert m.risk_tags == ["pii"]
    assert rs.match("nothing to see").risk_tags == []


def test_whole_words_and_unicode_case_folding() -> None:
    rs = RuleSet(RULES)
    assert rs.match("refunds are slow").label is None
    assert rs.match("à l'école.").label == "school"
    assert rs.match("help me").label is None
    assert rs.match("HELP me").label == "shout"


def test_files_and_strings_load_the_same_rules(tmp_path: Path) -> None:
    doc = {"version": 1, "rules": RULES}
    (tmp_path / "r.json").write_text(json.dumps(doc), encoding="utf-8")
    from_json = RuleSet.from_file(tmp_path / "r.json")
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    from_yaml = RuleSet.from_file(str(tmp_path / "r.yaml"))
    for rs in (from_json, from_yaml, RuleSet.from_json(json.dumps(doc))):
        assert rs.rule_ids == [r["id"] for r in RULES]
        assert rs.confidences == pytest.approx([r.get("confidence", 1.0) for r in RULES])
        assert rs.match("money back please").label == "refund"
    assert len(from_yaml) == 5
    assert from_yaml.risk_tags == ["finance", "legal", "pii"]


def test_example_rule_file_loads_and_routes() -> None:
    rs = RuleSet.from_file(EXAMPLE)
    m = rs.match("I will call my lawyer about this chargeback")
    assert m.label == "dispute_charge"
    assert m.risk_tags == ["finance", "legal"]
    assert rs.match("mail me at jo@example.com").risk_tags == ["pii"]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"id": "a", "patterns": [{"regex": "a(b"}]}], r'(?s)rule "a": patterns\[0\].*unclosed'),
        ([{"id": "a", "patterns": [{"keywords": ["x"]}], "prioirty": 1}], "prioirty"),
        ([{"id": "a", "patterns": []}], "at least one"),
        ([{"patterns": [{"regex": "x"}]}], "rule 0.*id"),
        ([{"id": "a", "patterns": [{"keywords": []}]}], "keywords must not be empty"),
        ([{"id": "a", "patterns": [{"keywords": ["  "]}]}], "non-blank"),
        ([{"id": "a", "patterns": [{"regex": "x"}], "confidence": 2}], "confidence"),
        ([{"id": "a", "patterns": [{"regex": "x"}], "confidence": float("nan")}], "rules must be"),
        ([{"id": "a", "label": "", "patterns": [{"regex": "x"}]}], "label must not be empty"),
        ([{"id": "a", "patterns": [{"regex": "x" * 5000}]}], "1 to 4096 bytes"),
        ([{"id": "a", "patterns": [{"regex": r"\w{1000}\w{1000}\w{1000}"}]}], "size limit"),
        ([{"id": "a", "patterns": [{"regex": "(" * 100 + ")" * 100}]}], "nest"),
        ([], "at least one rule"),
    ],
)
def test_invalid_rules_raise_config_errors(rules: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(tiergate.ConfigError, match=message):
        RuleSet(rules)


def test_broken_files_raise_clear_errors(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("rules: [ {id: a, patterns: [", encoding="utf-8")
    with pytest.raises(tiergate.ConfigError, match=r"bad\.yaml.*invalid YAML"):
        RuleSet.from_file(bad_yaml)
    with pytest.raises(OSError, match=r"missing\.yaml"):
        RuleSet.from_file(tmp_path / "missing.yaml")
    other = tmp_path / "rules.txt"
    other.write_text("{}", encoding="utf-8")
    with pytest.raises(tiergate.ConfigError, match=r"\.yaml, \.yml or \.json"):
        RuleSet.from_file(other)
    future = tmp_path / "future.json"
    future.write_text('{"version": 9, "rules": []}', encoding="utf-8")
    with pytest.raises(tiergate.ConfigError, match="version 9"):
        RuleSet.from_file(future)
    # A billion-laughs style document must be refused by the YAML budget, not expanded.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 12):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [*{chr(96 + i)}, *{chr(96 + i)}, *{chr(96 + i)}]\n"
    bomb += "rules: *l\n"
    with pytest.raises(tiergate.ConfigError):
        RuleSet.from_yaml(bomb)


def test_bad_texts_raise_and_leave_the_ruleset_usable() -> None:
    rs = RuleSet(RULES, max_text_bytes=1000)
    with pytest.raises(tiergate.InputError, match=r"^the text is empty"):
        rs.match("   ")
    with pytest.raises(tiergate.InputError, match=r"^the text is 2000 bytes"):
        rs.match("x" * 2000)
    with pytest.raises(tiergate.InputError, match="text 1 is 2000 bytes"):
        rs.match_batch(["refund", "x" * 2000])
    with pytest.raises(tiergate.InputError, match="lone surrogate"):
        rs.match("refund \ud800")
    with pytest.raises(TypeError, match=r"texts\[0\] must be str, not NoneType"):
        rs.match_batch([None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a single str"):
        rs.match_batch("refund")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be str, not bytes"):
        rs.match(b"refund")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of rule dicts"):
        RuleSet("rules: []")  # type: ignore[arg-type]
    assert rs.match("refund").label == "refund"


def test_match_arrays_agrees_with_match_batch() -> None:
    rs = RuleSet(RULES)
    texts = ["refund now", "chargeback!", "nothing", "ssn 123-45-6789", "ÉCOLE"]
    winners, confidences = rs.match_arrays(texts)
    assert winners.dtype == np.int32
    assert confidences.dtype == np.float32
    for w, c, m in zip(winners, confidences, rs.match_batch(texts), strict=True):
        if m:
            assert rs.rule_ids[w] == m.rule_id
            assert c == pytest.approx(m.confidence)
        else:
            assert w == -1
            assert c == 0


# --- differential property test -------------------------------------------------

VOCAB = ["card", "lost", "refund", "money", "back", "école", "fraud", "c++", "x1", "Σσ"]
REGEXES = [r"\d{3}", r"lo+st", r"ca?rd", r"back\b", r"^money", r"fraud$", r"[xy]1"]
WORD = re.compile(r"\w")


def py_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def reference_match(
    rules: list[dict[str, Any]], text: str
) -> tuple[str | None, list[str], list[str]]:
    """Straightforward semantics: every rule checked on its own with Python's re."""
    matched = []
    for rule in rules:
        ci = rule.get("case_insensitive", True)
        hay = text.lower() if ci else text
        hit = False
        for p in rule["patterns"]:
            if "regex" in p:
                hit |= re.search(p["regex"], text, re.IGNORECASE if ci else 0) is not None
            else:
                for kw in p["keywords"]:
                    kw = kw.lower() if ci else kw
                    for m in re.finditer("(?=" + re.escape(kw) + ")", hay):
                        s, e = m.start(), m.start() + len(kw)
                        left_ok = not (py_word(kw[0]) and s > 0 and py_word(hay[s - 1]))
                        right_ok = not (py_word(kw[-1]) and e < len(hay) and py_word(hay[e]))
                        hit |= left_ok and right_ok
        if hit:
            matched.append(rule)
    winner = None
    for rule in matched:
        if "label" in rule and (winner is None or rule["priority"] > winner["priority"]):
            winner = rule
    tags = sorted({t for r in matched for t in r.get("risk_tags", [])})
    return (winner["id"] if winner else None), [r["id"] for r in matched], tags


rule_strategy = st.fixed_dictionaries(
    {
        "patterns": st.lists(
            st.one_of(
                st.builds(lambda r: {"regex": r}, st.sampled_from(REGEXES)),
                st.builds(
                    lambda ws: {"keywords": ws},
                    st.lists(
                        st.sampled_from(VOCAB).flatmap(
                            lambda w: st.sampled_from([w, w.upper(), f"{w} back"])
                        ),
                        min_size=1,
                        max_size=3,
                    ),
                ),
            ),
            min_size=1,
            max_size=3,
        ),
        "priority": st.integers(-2, 2),
        "case_insensitive": st.booleans(),
        "risk_tags": st.lists(st.sampled_from(["finance", "legal", "pii"]), max_size=2),
        "labelled": st.booleans(),
    }
)
text_strategy = st.lists(
    st.one_of(st.sampled_from([*VOCAB, "CARD", "Lost", "123", "looost"]), st.text(max_size=3)),
    min_size=1,
    max_size=8,
).map(lambda ws: " ".join(ws))


@given(
    specs=st.lists(rule_strategy, min_size=1, max_size=6), texts=st.lists(text_strategy, max_size=5)
)
def test_agrees_with_a_pure_python_reference(specs: list[dict[str, Any]], texts: list[str]) -> None:
    rules = []
    for i, spec in enumerate(specs):
        rule = {k: v for k, v in spec.items() if k != "labelled"}
        rule["id"] = f"r{i}"
        if spec["labelled"]:
            rule["label"] = f"label{i}"
        rules.append(rule)
    rs = RuleSet(rules)
    texts = [t for t in texts if t.strip()]
    for text, got in zip(texts, rs.match_batch(texts), strict=True):
        winner, matched, tags = reference_match(rules, text)
        assert (got.rule_id, got.matched_rule_ids, got.risk_tags) == (winner, matched, tags), text


@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text: str) -> None:
    try:
        m = FUZZ_SET.match(text)
    except tiergate.InputError:
        assert not text.strip() or any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert isinstance(m.risk_tags, list)


FUZZ_SET = RuleSet.from_file(EXAMPLE)
