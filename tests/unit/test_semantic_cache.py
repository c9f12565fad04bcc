"""SemanticCache: hits, thresholds, TTL, LRU, and tenant isolation as a property."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tiergate
from tiergate import InputError, SemanticCache


def test_similar_requests_hit_and_others_miss() -> None:
    cache = SemanticCache(3, threshold=0.9)
    cache.put("acme", [1.0, 0.0, 0.0], b'{"label": "refund"}')
    hit = cache.get("acme", [0.98, 0.1, 0.0])
    assert hit is not None
    assert hit[0] == b'{"label": "refund"}'
    assert hit[1] == pytest.approx(0.995, abs=0.01)
    assert cache.get("acme", [0.0, 1.0, 0.0]) is None
    assert cache.get("nobody", [1.0, 0.0, 0.0]) is None
    stats = cache.stats()
    assert stats["total"] == {
        "hits": 1,
        "misses": 2,
        "evictions": 0,
        "expirations": 0,
        "entries": 1,
    }
    assert stats["namespaces"]["acme"]["hits"] == 1


def test_get_batch_matches_get() -> None:
    cache = SemanticCache(2, threshold=0.8)
    cache.put("t", [1, 0], b"x")
    hits = cache.get_batch("t", [[1, 0.1], [0, 1]])
    assert hits[0] is not None
    assert hits[0][0] == b"x"
    assert hits[1] is None


def test_ttl_expires_entries() -> None:
    cache = SemanticCache(2, threshold=0.5, ttl_seconds=0.2)
    cache.put("t", [1, 0], b"x")
    assert cache.get("t", [1, 0]) is not None
    time.sleep(0.3)
    assert cache.get("t", [1, 0]) is None
    assert cache.stats()["total"]["expirations"] == 1
    assert len(cache) == 0


def test_lru_capacity_per_namespace() -> None:
    cache = SemanticCache(3, threshold=0.99, capacity=2)
    eye = np.eye(3, dtype=np.float32)
    cache.put("t", eye[0], b"a")
    cache.put("t", eye[1], b"b")
    assert cache.get("t", eye[0]) is not None  # "a" becomes most recent
    cache.put("t", eye[2], b"c")  # evicts "b"
    assert cache.get("t", eye[1]) is None
    assert cache.get("t", eye[0]) is not None
    cache.put("u", eye[1], b"b2")  # another namespace has its own capacity
    assert len(cache) == 3
    assert cache.stats()["namespaces"]["t"]["evictions"] == 1
    cache.clear("t")
    assert len(cache) == 1
    assert cache.namespaces() == ["t", "u"]


def test_long_churn_keeps_finding_the_live_entries() -> None:
    # Thousands of evictions: the index reclaims removed slots as it goes.
    dim = 16
    vectors = np.random.default_rng(3).normal(size=(3000, dim)).astype(np.float32)
    cache = SemanticCache(dim, threshold=0.999, capacity=100)
    for i, v in enumerate(vectors):
        cache.put("t", v, str(i).encode())
    assert len(cache) == 100
    assert cache.stats()["total"]["evictions"] == 2900
    for i in range(2900, 3000):
        hit = cache.get("t", vectors[i])
        assert hit is not None
        assert hit[0] == str(i).encode()
    assert cache.get("t", vectors[0]) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0}, "capacity"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"ttl_seconds": 0.0}, "ttl_seconds"),
        ({"ttl_seconds": -1.0}, "ttl_seconds"),
        ({"metric": "l2"}, "metric"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(tiergate.ConfigError, match=message):
        SemanticCache(4, **kwargs)  # type: ignore[arg-type]


def test_bad_vectors_and_values_raise_and_change_nothing() -> None:
    cache = SemanticCache(3)
    with pytest.raises(tiergate.InputError, match="dim=3"):
        cache.put("t", [1, 0], b"x")
    with pytest.raises(tiergate.InputError, match="NaN"):
        cache.get("t", [np.nan, 0, 0])
    with pytest.raises(tiergate.InputError, match="zero vector"):
        cache.put("t", [0, 0, 0], b"x")
    with pytest.raises(TypeError):
        cache.put("t", [1, 0, 0], "not bytes")  # type: ignore[arg-type]
    assert len(cache) == 0
    assert cache.namespaces() == []


TENANTS = ["a", "b", "c"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "get"]),
            st.sampled_from(TENANTS),
            st.integers(0, 7),
        ),
        max_size=60,
    )
)
def test_no_lookup_ever_returns_another_tenants_value(ops: list[tuple[str, str, int]]) -> None:
    cache = SemanticCache(8, threshold=0.5, capacity=3)
    eye = np.eye(8, dtype=np.float32)
    for op, tenant, slot in ops:
        if op == "put":
            cache.put(tenant, eye[slot] + 0.01, f"{tenant}:{slot}".encode())
        else:
            hit = cache.get(tenant, eye[slot])
            if hit is not None:
                owner, _, stored_slot = hit[0].decode().partition(":")
                assert owner == tenant
                assert int(stored_slot) == slot
        for name, stats in cache.stats()["namespaces"].items():
            assert stats["entries"] <= 3, name


def test_a_bad_vector_is_an_error_even_for_an_unknown_namespace() -> None:
    cache = SemanticCache(4)
    for namespace in ("nobody", "a"):
        if namespace == "a":
            cache.put("a", np.ones(4, dtype=np.float32), b"x")
        with pytest.raises(InputError, match="one vector of dim 4"):
            cache.get(namespace, np.ones((3, 4), dtype=np.float32))
        with pytest.raises(InputError):
            cache.get(namespace, np.full(4, np.nan, dtype=np.float32))
