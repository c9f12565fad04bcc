"""LinearModel against scikit-learn's LogisticRegression on the same hashed features."""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression

import tiergate
from tiergate import FeatureHasher, LinearModel

INTENTS = {
    "refund": ["i want my money back", "refund my order", "please refund the purchase"],
    "card_lost": ["i lost my card", "my card is missing", "card was stolen yesterday"],
    "greeting": ["hello there", "hi how are you", "good morning friend"],
}


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    filler = ["please", "now", "today", "urgent", "thanks", "ok", "so"]
    texts, labels = [], []
    for i in range(n):
        label = list(INTENTS)[i % len(INTENTS)]
        words = rng.choice(INTENTS[label]).split() + rng.sample(filler, 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def fit(
    texts: list[str], labels: list[str], params: list[dict[str, object]]
) -> tuple[LogisticRegression, list[HashingVectorizer], LinearModel]:
    vectorizers = [HashingVectorizer(**p) for p in params]  # type: ignore[arg-type]
    X = sp.hstack([v.transform(texts) for v in vectorizers]).tocsr()
    clf = LogisticRegression(max_iter=300).fit(X, labels)
    hashers = [FeatureHasher(**p) for p in params]  # type: ignore[arg-type]
    model = LinearModel(hashers, clf.coef_, clf.intercept_, [str(c) for c in clf.classes_])
    return clf, vectorizers, model


def sklearn_proba(
    clf: LogisticRegression, vectorizers: list[HashingVectorizer], texts: list[str]
) -> np.ndarray:
    X = sp.hstack([v.transform(texts) for v in vectorizers]).tocsr()
    return clf.predict_proba(X)  # type: ignore[no-any-return]


WORD = {"n_features": 2**12, "ngram_range": (1, 2)}
CHARS = {"n_features": 2**10, "analyzer": "char_wb", "ngram_range": (2, 4)}


@pytest.mark.parametrize("params", [[WORD], [WORD, CHARS]], ids=["word", "word+char_wb"])
def test_probabilities_match_logistic_regression(params: list[dict[str, object]]) -> None:
    texts, labels = synthetic(300)
    clf, vecs, model = fit(texts, labels, params)
    probe = [*synthetic(50, seed=1)[0], "completely unrelated words", "REFUND!!! now"]
    np.testing.assert_allclose(
        model.predict_proba(probe), sklearn_proba(clf, vecs, probe), atol=2e-5
    )
    assert model.labels == sorted(INTENTS)
    assert model.n_features == sum(int(p["n_features"]) for p in params)  # type: ignore[call-overload]
    # Only the features training saw keep a row of weights in memory.
    assert model.seen_features == int((clf.coef_ != 0).any(axis=0).sum())
    assert 0 < model.seen_features < model.n_features


def test_clinc_slice_matches_sklearn(clinc150: dict[str, list[list[str]]]) -> None:
    # Twenty intents keep the fit to a second; the fidelity question is the same.
    intents = sorted({y for _, y in clinc150["train"]})[:20]
    train = [(t, y) for t, y in clinc150["train"] if y in intents]
    texts, labels = [t for t, _ in train], [y for _, y in train]
    clf, vecs, model = fit(texts, labels, [{"n_features": 2**16, "ngram_range": (1, 2)}])
    probe = [t for t, _ in clinc150["test"][:300] + clinc150["oos_test"][:50]]
    np.testing.assert_allclose(
        model.predict_proba(probe), sklearn_proba(clf, vecs, probe), atol=2e-5
    )


def test_binary_model_uses_sigmoid_like_sklearn() -> None:
    texts, labels = synthetic(120)
    labels = ["refund" if y == "refund" else "other" for y in labels]
    clf, vecs, model = fit(texts, labels, [WORD])
    assert clf.coef_.shape[0] == 1
    probe = synthetic(20, seed=3)[0]
    np.testing.assert_allclose(
        model.predict_proba(probe), sklearn_proba(clf, vecs, probe), atol=2e-5
    )


def test_csr_path_equals_fused_path() -> None:
    texts, labels = synthetic(200)
    _, _, model = fit(texts, labels, [WORD, CHARS])
    probe = synthetic(30, seed=2)[0]
    blocks = [h.transform(probe) for h in model.hashers]
    X = sp.hstack(
        [
            sp.csr_matrix(b, shape=(len(probe), h.n_features))
            for b, h in zip(blocks, model.hashers, strict=True)
        ]
    ).tocsr()
    np.testing.assert_allclose(
        model.predict_proba_csr(X.data, X.indices, X.indptr), model.predict_proba(probe), atol=1e-6
    )


def test_temperature_flattens_without_changing_the_ranking() -> None:
    texts, labels = synthetic(200)
    _, _, model = fit(texts, labels, [WORD])
    probe = synthetic(40, seed=5)[0]
    sharp = model.predict_proba(probe)
    soft = model.with_temperature(4.0).predict_proba(probe)
    np.testing.assert_array_equal(sharp.argmax(axis=1), soft.argmax(axis=1))
    assert (soft.max(axis=1) < sharp.max(axis=1)).all()
    logits = model.decision_function(probe)
    expected = np.exp(logits / 4.0) / np.exp(logits / 4.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soft, expected, atol=1e-6)


def test_top_k_agrees_with_argsort() -> None:
    texts, labels = synthetic(200)
    _, _, model = fit(texts, labels, [WORD])
    probe = synthetic(40, seed=6)[0]
    probs = model.predict_proba(probe)
    idx, val = model.top_k(probe, k=2)
    assert idx.shape == (40, 2)
    np.testing.assert_array_equal(idx[:, 0], probs.argmax(axis=1))
    np.testing.assert_allclose(val, np.take_along_axis(probs, idx.astype(np.int64), axis=1))
    assert model.top_k(probe, k=99)[0].shape == (40, 3)
    # top1: the same first column, for one text, as two numbers.
    best = list(zip(idx[:, 0].tolist(), val[:, 0].tolist(), strict=True))
    assert [model.top1(t) for t in probe] == best
    # proba: one text's row of predict_proba, as one array.
    for i, t in enumerate(probe[:5]):
        np.testing.assert_array_equal(model.proba(t), probs[i])
    with pytest.raises(tiergate.InputError, match="text"):
        model.proba("   ")


def test_a_text_with_no_known_feature_gets_no_label() -> None:
    """Unseen words score the intercepts alone, the same for every such text: with
    min_known=1 top_k says -1 for them, and the linear tier abstains, as in serving."""
    from tiergate.calibration import Calibrator
    from tiergate.tiers import LinearTier

    texts, labels = synthetic(200)
    _, _, model = fit(texts, labels, [WORD])
    probe = ["zebra quantum", "refund my order", "xylophone"]
    unknown = model.predict_proba(["zebra quantum"])
    np.testing.assert_array_equal(model.predict_proba(["xylophone"]), unknown)  # intercepts
    idx, val = model.top_k(probe, k=2, min_known=1)
    assert idx.tolist()[0] == idx.tolist()[2] == [-1, -1]
    assert val[0].tolist() == [0.0, 0.0]
    assert model.labels[idx[1, 0]] == "refund"
    np.testing.assert_array_equal(model.top_k(probe, k=2)[0][1], idx[1])  # the rest as before
    best = list(zip(idx[:, 0].tolist(), val[:, 0].tolist(), strict=True))
    assert [model.top1(t, min_known=1) for t in probe] == best  # (-1, 0.0) for the unknown
    calibrator = Calibrator("temperature", {"temperature": 1.0})
    out = LinearTier(model, calibrator, {}).predict(probe)
    assert out.pred.tolist()[0::2] == [-1, -1]
    assert out.confidence.tolist()[0::2] == [0.0, 0.0]
    assert model.labels[out.pred[1]] == "refund"


def test_large_batches_run_in_parallel_and_agree() -> None:
    texts, labels = synthetic(200)
    _, _, model = fit(texts, labels, [WORD])
    probe = synthetic(2000, seed=7)[0]
    batch = model.predict_proba(probe)
    one_by_one = np.vstack([model.predict_proba([t]) for t in probe[:50]])
    np.testing.assert_array_equal(batch[:50], one_by_one)


def test_invalid_models_are_config_errors() -> None:
    h = FeatureHasher(16)
    good = np.zeros((3, 16))
    with pytest.raises(tiergate.ConfigError, match="coef has 45 values"):
        LinearModel(h, np.zeros((3, 15)), np.zeros(3), ["a", "b", "c"])
    with pytest.raises(tiergate.ConfigError, match="labels has 2 entries"):
        LinearModel(h, good, np.zeros(3), ["a", "b"])
    with pytest.raises(tiergate.ConfigError, match="duplicate"):
        LinearModel(h, good, np.zeros(3), ["a", "b", "a"])
    bad = good.copy()
    bad[2, 7] = np.nan
    with pytest.raises(tiergate.ConfigError, match=r"coef\[2, 7\] is not finite"):
        LinearModel(h, bad, np.zeros(3), ["a", "b", "c"])
    with pytest.raises(tiergate.ConfigError, match="temperature"):
        LinearModel(h, good, np.zeros(3), ["a", "b", "c"], temperature=0.0)
    with pytest.raises(tiergate.ConfigError, match="intercept"):
        LinearModel(h, good, np.zeros(2), ["a", "b", "c"])
    with pytest.raises(TypeError, match=r"hashers\[1\] must be a FeatureHasher"):
        LinearModel([h, "x"], good, np.zeros(3), ["a", "b", "c"])  # type: ignore[list-item]


def test_bad_texts_raise_and_leave_the_model_usable() -> None:
    texts, labels = synthetic(100)
    _, _, model = fit(texts, labels, [WORD])
    with pytest.raises(tiergate.InputError, match="text 1 is empty"):
        model.predict_proba(["ok", "  \n"])
    with pytest.raises(tiergate.InputError, match="over the limit"):
        model.predict_proba(["x" * (2 << 20)])
    with pytest.raises(tiergate.InputError, match="lone surrogate"):
        model.predict_proba(["bad \udcff text"])
    with pytest.raises(TypeError):
        model.predict_proba([None])  # type: ignore[list-item]
    with pytest.raises(tiergate.InputError, match="outside the model"):
        model.predict_proba_csr([1.0], [2**12], [0, 1])
    with pytest.raises(tiergate.InputError, match="indptr"):
        model.predict_proba_csr([1.0], [0], [0, 5])
    with pytest.raises(tiergate.InputError, match="k must be"):
        model.top_k(["ok"], k=0)
    # One text: the error names no position in a batch.
    with pytest.raises(tiergate.InputError, match=r"^the text is empty"):
        model.top1("  \n")
    with pytest.raises(tiergate.InputError, match=r"^text 1 is empty"):
        model.top_k(["ok", "  \n"])
    with pytest.raises(tiergate.InputError, match="lone surrogate"):
        model.top1("bad \udcff text")
    with pytest.raises(TypeError, match="text must be str"):
        model.top1(["a list"])  # type: ignore[arg-type]
    assert model.predict_proba(["refund my order"]).shape == (1, 3)


@given(st.lists(st.one_of(st.text(max_size=30), st.integers(), st.none(), st.binary()), max_size=5))
def test_fuzzed_batches_either_score_or_raise_cleanly(batch: list[object]) -> None:
    model = FUZZ_MODEL
    try:
        probs = model.predict_proba(batch)  # type: ignore[arg-type]
    except (tiergate.InputError, TypeError):
        return
    assert probs.shape == (len(batch), 3)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


FUZZ_MODEL = fit(*synthetic(90), [WORD])[2]
