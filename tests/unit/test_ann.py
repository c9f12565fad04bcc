"""AnnIndex: recall against numpy brute force, concurrency, files, bad input."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tiergate
from tiergate import AnnIndex, ConfigError, InputError


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ data.T
    return np.argsort(-sims, axis=1)[:, :k]


@pytest.mark.parametrize("exact_below", [0, 100_000], ids=["hnsw", "exact"])
def test_recall_against_brute_force(exact_below: int) -> None:
    data = unit_vectors(2000, 64, 0)
    queries = unit_vectors(100, 64, 1)
    index = AnnIndex(64, ef_search=128, exact_below=exact_below)
    index.add(np.arange(2000, dtype=np.uint64), data)
    ids, scores = index.search(queries, k=10)
    truth = brute_force(data, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= (0.999 if exact_below else 0.9), recall
    # Scores are cosine similarities, best first.
    expected = np.take_along_axis(queries @ data.T, ids, axis=1)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_ids_are_the_callers_and_missing_slots_are_marked() -> None:
    index = AnnIndex(3)
    index.add([10**12, 7], [[1, 0, 0], [0, 1, 0]])
    ids, scores = index.search([1, 0.1, 0], k=3)
    assert ids.shape == (1, 3)
    assert list(ids[0]) == [10**12, 7, -1]
    assert scores[0, 2] == -np.inf
    assert 7 in index
    assert 8 not in index
    assert len(index) == 2
    index.remove([10**12])
    assert list(index.search([1, 0, 0], k=1)[0][0]) == [7]
    stored = index.get(7)
    assert stored is not None
    np.testing.assert_allclose(stored, [0, 1, 0], atol=1e-6)
    assert index.get(10**12) is None


def test_inner_product_and_int8() -> None:
    ip = AnnIndex(2, metric="ip")
    ip.add([1, 2], [[2.0, 0.0], [0.0, 1.0]])
    ids, scores = ip.search([1.0, 0.0], k=1)
    assert ids[0, 0] == 1
    assert scores[0, 0] == pytest.approx(2.0, abs=1e-4)
    q8 = AnnIndex(32, dtype="i8", exact_below=0)
    data = unit_vectors(500, 32, 3)
    q8.add(np.arange(500), data)
    ids, _ = q8.search(data[:20], k=1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9
    with pytest.raises(tiergate.ConfigError, match="i8"):
        AnnIndex(4, dtype="i8", metric="ip")


def test_bad_input_raises_and_leaves_the_index_unchanged() -> None:
    index = AnnIndex(4)
    index.add([1], [[1, 0, 0, 0]])
    cases = [
        (
            lambda: index.add([2], [[np.nan, 0, 0, 0]]),
            tiergate.InputError,
            r"vectors\[0, 0\] is NaN",
        ),
        (lambda: index.add([2], [[np.inf, 0, 0, 0]]), tiergate.InputError, "finite"),
        (lambda: index.add([2], [[0, 0, 0, 0]]), tiergate.InputError, "zero vector"),
        (lambda: index.add([2], [[1, 0, 0]]), tiergate.InputError, "3 columns.*dim=4"),
        (lambda: index.add([2, 2], [[1, 0, 0, 0], [0, 1, 0, 0]]), tiergate.InputError, "twice"),
        (lambda: index.add([3, 1], [[1, 0, 0, 0], [0, 1, 0, 0]]), tiergate.InputError, "already"),
        (lambda: index.add([2, 3], [[1, 0, 0, 0]]), tiergate.InputError, "2 ids for 1 vectors"),
        (lambda: index.add([-1], [[1, 0, 0, 0]]), OverflowError, ""),
        (lambda: index.remove([1, 99]), tiergate.InputError, r"ids\[1\] = 99 is not"),
        (lambda: index.search([1, 0, 0, 0], k=0), tiergate.InputError, "k must be"),
        (lambda: index.search([1, 0, 0, 0], k=5, ef=2), tiergate.InputError, "ef"),
        (lambda: index.search(np.ones((2, 2, 4)), k=1), tiergate.InputError, "3-dimensional"),
        (lambda: index.search(["a", "b", "c", "d"], k=1), ValueError, ""),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message or None):
            call()
    assert len(index) == 1
    assert 1 in index
    assert index.search([1, 0, 0, 0], k=1)[0][0, 0] == 1
    with pytest.raises(tiergate.ConfigError, match="dim"):
        AnnIndex(0)
    with pytest.raises(tiergate.ConfigError, match="metric"):
        AnnIndex(4, metric="l2")  # type: ignore[arg-type]


def test_empty_index_search_returns_only_missing_slots() -> None:
    ids, scores = AnnIndex(4).search(np.eye(4, dtype=np.float32)[:2], k=2)
    assert (ids == -1).all()
    assert np.isneginf(scores).all()


def test_searches_run_while_another_thread_adds() -> None:
    dim = 32
    data = unit_vectors(6000, dim, 5)
    index = AnnIndex(dim, exact_below=0)
    index.add(np.arange(1000), data[:1000])
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for start in range(1000, 6000, 250):
                index.add(np.arange(start, start + 250), data[start : start + 250])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    searches = 0
    self_found = 0

    def reader() -> None:
        nonlocal searches, self_found
        try:
            while not done.is_set():
                ids, scores = index.search(data[:8], k=5)
                # Mid-insert the graph is approximate, never corrupt: a slot is
                # either a real entry with its true similarity, or marked missing.
                found = ids >= 0
                assert (ids[found] < 6000).all()
                assert np.isneginf(scores[~found]).all()
                true = np.einsum("qd,qkd->qk", data[:8], data[np.maximum(ids, 0)])
                np.testing.assert_allclose(scores[found], true[found], atol=1e-4)
                self_found += int((ids[:, 0] == np.arange(8)).sum())
                searches += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(index) == 6000
    assert searches > 0
    assert self_found / (8 * searches) >= 0.95
    ids, _ = index.search(data[:200], k=1)
    assert (ids[:, 0] == np.arange(200)).mean() >= 0.99


def test_removed_ids_are_never_returned_and_can_come_back() -> None:
    data = unit_vectors(3000, 24, 12)
    index = AnnIndex(24, exact_below=0)
    index.add(np.arange(3000), data)
    gone = np.arange(0, 3000, 2)
    index.remove(gone)
    ids, _ = index.search(data[:100], k=10, ef=64)
    assert (ids % 2 == 1).all()
    assert (ids[1::2, 0] == np.arange(1, 100, 2)).all()
    # Removed, then added again under another vector: found by the new one.
    index.add([0], data[1:2] * -1)
    ids, scores = index.search(-data[1], k=1)
    assert ids[0, 0] == 0
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert len(index) == 1501
    with pytest.raises(tiergate.InputError, match="reserved"):
        index.add([2**64 - 1], data[:1])


def test_removing_most_entries_reclaims_them_and_keeps_the_rest() -> None:
    data = unit_vectors(5000, 16, 13)
    index = AnnIndex(16, exact_below=1000)
    index.add(np.arange(5000), data)
    index.remove(np.arange(4900))
    assert len(index) == 100
    ids, _ = index.search(data[4900:], k=1)
    assert (ids[:, 0] == np.arange(4900, 5000)).all()
    index.add(np.arange(2000), data[:2000])
    ids, _ = index.search(data[:200], k=1)
    assert (ids[:, 0] == np.arange(200)).mean() >= 0.99


def test_save_load_round_trip(tmp_path: Path) -> None:
    data = unit_vectors(3000, 16, 7)
    index = AnnIndex(16, exact_below=0, ef_search=80)
    index.add(np.arange(3000) * 3, data)
    index.remove([0, 3])
    path = tmp_path / "idx.tgann"
    index.save(path)
    back = AnnIndex.load(path)
    assert len(back) == len(index) == 2998
    assert (back.dim, back.metric, back.ef_search) == (16, "cosine", 80)
    for a, b in zip(index.search(data[:50], k=5), back.search(data[:50], k=5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob("*.tmp-write"))
    # Small (exact) and int8 indexes come back the same way.
    for small in (AnnIndex(16), AnnIndex(16, dtype="i8", exact_below=0)):
        small.add(np.arange(500), data[:500])
        small.save(path)
        again = AnnIndex.load(path)
        assert (again.dtype, len(again)) == (small.dtype, 500)
        for a, b in zip(small.search(data[:30], k=3), again.search(data[:30], k=3), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:5], "too short"),
        (lambda b: b"XXXXXXXX" + b[8:], "magic"),
        (lambda b: b[:8] + (7).to_bytes(4, "little") + b[12:], "version 7"),
        (lambda b: b[:-40] + bytes([b[-40] ^ 1]) + b[-39:], "checksum"),
        (lambda b: b + b"\0", "padded"),
        (lambda b: b"", "too short"),
    ],
)
def test_damaged_files_raise_format_errors(tmp_path: Path, damage: object, message: str) -> None:
    index = AnnIndex(8)
    index.add(np.arange(100), unit_vectors(100, 8, 9))
    good = tmp_path / "good.tgann"
    index.save(good)
    bad = tmp_path / "bad.tgann"
    bad.write_bytes(damage(good.read_bytes()))  # type: ignore[operator]
    with pytest.raises(tiergate.FormatError, match=message) as info:
        AnnIndex.load(bad)
    assert "bad.tgann" in str(info.value)
    with pytest.raises(OSError, match="nowhere"):
        AnnIndex.load(tmp_path / "nowhere.tgann")


SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)


@given(
    st.one_of(
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64]),
            shape=SHAPES,
            elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
        ),
        hnp.arrays(dtype=np.int32, shape=SHAPES, elements=st.integers(-3, 3)),
    ),
    st.integers(-2, 12),
)
def test_fuzzed_queries_answer_or_raise_cleanly(queries: np.ndarray, k: int) -> None:
    try:
        ids, scores = FUZZ_INDEX.search(queries, k=k)
    except (tiergate.InputError, OverflowError, TypeError):
        return
    assert ids.shape == scores.shape
    assert ids.shape[1] == k
    assert np.isin(ids, [-1, *range(40)]).all()


FUZZ_INDEX = AnnIndex(4)
FUZZ_INDEX.add(np.arange(40), unit_vectors(40, 4, 11))


def test_absurd_k_and_ef_are_errors_not_aborts() -> None:
    idx = AnnIndex(4)
    idx.add(np.array([1, 2], dtype=np.uint64), np.eye(4, dtype=np.float32)[:2])
    q = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(InputError, match="k must be at most"):
        idx.search(q, k=2**40)
    with pytest.raises(InputError, match="ef must be at most"):
        idx.search(q, k=1, ef=2**40)
    with pytest.raises(ConfigError, match="at most"):
        AnnIndex(4, ef_search=2**50)
    ip = AnnIndex(2, metric="ip")
    with pytest.raises(InputError, match="components must stay within"):
        ip.add(np.array([1], dtype=np.uint64), np.array([[1e6, 0.0]], dtype=np.float32))
    assert idx.search(q, k=2)[0].shape == (1, 2)
