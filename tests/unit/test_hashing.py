"""FeatureHasher against scikit-learn's HashingVectorizer: the same CSR arrays, exactly."""

from __future__ import annotations

import sys
import unicodedata

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.feature_extraction.text import HashingVectorizer

import tiergate
from tiergate import FeatureHasher

# Characters the running Python's Unicode database assigns (surrogates excluded:
# they cannot be UTF-8). Characters assigned only in newer Unicode versions may
# be classified differently by Rust's tables; the docstring of the module says so.
assigned_chars = st.characters(
    codec="utf-8",
    categories=None,
    exclude_categories=("Cs", "Cn"),
)
texts = st.lists(
    st.one_of(
        st.text(assigned_chars, max_size=40),
        # Mostly-ASCII sentences with separators, the common case.
        st.lists(
            st.sampled_from(["Refund", "my", "ORDER", "ΣΑΣ", "çà", "x", "42", "_", "a-b"]),
            max_size=12,
        ).map(lambda ws: st_join(ws)),
    ),
    min_size=1,
    max_size=6,
)
separators = [" ", "  ", "\t", "\n", "\x1c", "\u00a0", "\u3000", ", ", ".", "\u200b"]


def st_join(words: list[str]) -> str:
    out = ""
    for i, w in enumerate(words):
        out += w + separators[(i * 7 + len(w)) % len(separators)]
    return out


settings_strategy = st.fixed_dictionaries(
    {
        "analyzer": st.sampled_from(["word", "char", "char_wb"]),
        "ngram_range": st.sampled_from([(1, 1), (1, 2), (2, 3), (1, 4), (3, 5)]),
        "n_features": st.sampled_from([1, 7, 2**10, 2**18, 2**20]),
        "norm": st.sampled_from(["l2", "l1", None]),
        "alternate_sign": st.booleans(),
        "lowercase": st.booleans(),
        "binary": st.booleans(),
    }
)


def assert_same_as_sklearn(batch: list[str], params: dict[str, object]) -> None:
    ours = FeatureHasher(**params).transform(batch)  # type: ignore[arg-type]
    theirs = HashingVectorizer(**params).transform(batch)  # type: ignore[arg-type]
    np.testing.assert_array_equal(ours[2], theirs.indptr)
    np.testing.assert_array_equal(ours[1], theirs.indices)
    # Exact equality, bit for bit: no tolerance.
    assert ours[0].tobytes() == theirs.data.astype(np.float64).tobytes(), (batch, params)
    assert ours[0].dtype == np.float64
    assert ours[1].dtype == np.int32
    assert ours[2].dtype == np.int32


@given(batch=texts, params=settings_strategy)
def test_bit_identical_to_hashing_vectorizer(batch: list[str], params: dict[str, object]) -> None:
    assert_same_as_sklearn(batch, params)


@pytest.mark.parametrize(
    "text",
    [
        "ΟΔΟΣ ΣΑ Σ",  # final sigma
        "İstanbul ǅemal ß ﬁ",  # full case mappings that change length
        "cafe\u0301s naïve",  # combining mark splits a Python word
        "a\x1cb\x1dc\x1ed\x1ff",  # whitespace to Python, not to Rust's is_whitespace
        "x\u00b2 \u2460 \u216b \u0660\u0661",  # superscripts, circled, roman, Arabic-Indic digits
        "emoji 🙂🙂 and 𝒳𝒴 math",
        "",
        "   ",
        "a",
    ],
)
@pytest.mark.parametrize("analyzer", ["word", "char", "char_wb"])
def test_known_tricky_texts(text: str, analyzer: str) -> None:
    assert_same_as_sklearn([text, text.upper()], {"analyzer": analyzer, "ngram_range": (1, 3)})


def test_clinc_texts_hash_identically(clinc150: dict[str, list[list[str]]]) -> None:
    batch = [t for t, _ in clinc150["test"][:2000]]
    for params in (
        {"ngram_range": (1, 2), "n_features": 2**18},
        {"analyzer": "char_wb", "ngram_range": (2, 4), "n_features": 2**18},
    ):
        assert_same_as_sklearn(batch, params)


def test_index_modulo_matches_for_unusual_n_features() -> None:
    # Indices are abs(hash) % n_features; odd and extreme n_features exercise
    # the modulo and sign handling. The hash == -2**31 branch is not exercised:
    # no token with that hash is known to us.
    batch = ["some ordinary words to hash"]
    for n in (1, 2, 3, 1000, 2**31 - 1):
        assert_same_as_sklearn(batch, {"n_features": n})


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(tiergate.ConfigError, match="ngram_range"):
        FeatureHasher(ngram_range=(3, 2))
    with pytest.raises(tiergate.ConfigError, match="analyzer"):
        FeatureHasher(analyzer="words")  # type: ignore[arg-type]
    with pytest.raises(tiergate.ConfigError, match="n_features"):
        FeatureHasher(0)
    with pytest.raises(tiergate.ConfigError, match="norm"):
        FeatureHasher(norm="max")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        FeatureHasher(-5)


def test_bad_inputs_raise_and_leave_the_hasher_usable() -> None:
    h = FeatureHasher(2**10, max_text_bytes=1000)
    with pytest.raises(tiergate.InputError, match=r"text 1 is 5000 bytes"):
        h.transform(["fine", "x" * 5000])
    with pytest.raises(tiergate.InputError, match=r"texts\[0\].*lone surrogate"):
        h.transform(["\ud800"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, not int"):
        h.transform(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a single str"):
        h.transform("just one text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        h.transform([b"bytes"])  # type: ignore[list-item]
    data, indices, indptr = h.transform(["still works", ""])
    assert list(indptr) == [0, 2, 2]
    assert len(data) == len(indices) == 2


def test_several_megabytes_are_refused_quickly() -> None:
    h = FeatureHasher()
    with pytest.raises(tiergate.InputError, match="over the limit"):
        h.transform(["word " * 1_000_000])


def test_params_round_trip_and_repr() -> None:
    h = FeatureHasher(2**12, analyzer="char_wb", ngram_range=(2, 4), norm=None)
    again = FeatureHasher(**h.get_params())
    assert again.get_params() == h.get_params()
    assert "char_wb" in repr(h)
    assert "norm=None" in repr(h)


def test_python_unicode_version_is_what_the_property_covers() -> None:
    # A reminder with teeth: if Python's Unicode database moves past Rust's
    # tables, the exclusions above need a second look.
    assert tuple(int(x) for x in unicodedata.unidata_version.split(".")) <= (16, 0, 0)
    assert sys.version_info >= (3, 10)
