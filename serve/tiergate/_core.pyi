"""Type stubs for the compiled extension ``tiergate._core`` (rust_core/py)."""

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, final

import numpy as np
import numpy.typing as npt

__version__: str
DEFAULT_MAX_TEXT_BYTES: int
# One-text calls (RuleSet.match, LinearModel.top1 and .proba) keep the GIL for shorter texts.
KEEP_GIL_BELOW_BYTES: int

class TiergateError(ValueError):
    """Base class of every error raised by tiergate's Rust tiers."""

class ConfigError(TiergateError):
    """A rule file, model parameter or other configuration is invalid."""

class InputError(TiergateError):
    """A request input is invalid (empty or oversized text, bad vector, unknown id, ...)."""

class FormatError(TiergateError):
    """A file is truncated, corrupt, or of an unsupported format version."""

# ---------------------------------------------------------------- rules tier

@final
class RuleSet:
    """Regex and whole-word keyword rules compiled into one matcher."""

    def __new__(
        cls, rules: Sequence[Mapping[str, Any]], *, max_text_bytes: int = 1048576
    ) -> RuleSet: ...
    @staticmethod
    def from_file(path: str | os.PathLike[str], *, max_text_bytes: int = 1048576) -> RuleSet:
        """Loads rules from a .yaml, .yml or .json file."""
    @staticmethod
    def from_yaml(text: str, *, max_text_bytes: int = 1048576) -> RuleSet:
        """Parses a YAML rule document."""
    @staticmethod
    def from_json(text: str, *, max_text_bytes: int = 1048576) -> RuleSet:
        """Parses a JSON rule document."""
    def match(self, text: str) -> RuleMatch:
        """Matches one text (holding the GIL for a text under KEEP_GIL_BELOW_BYTES)."""
    def match_batch(self, texts: Sequence[str]) -> list[RuleMatch]:
        """Matches a batch of texts, one RuleMatch each."""
    def match_arrays(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """(winning rule index or -1, confidence or 0) per text."""
    @property
    def rule_ids(self) -> list[str]: ...
    @property
    def labels(self) -> list[str | None]: ...
    @property
    def confidences(self) -> list[float]: ...
    @property
    def risk_tags(self) -> list[str]: ...
    @property
    def max_text_bytes(self) -> int: ...
    def __len__(self) -> int: ...

@final
class RuleMatch:
    """The outcome of matching one text; truthy when a labelled rule decided."""

    @property
    def rule_id(self) -> str | None: ...
    @property
    def label(self) -> str | None: ...
    @property
    def confidence(self) -> float | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def risk_tags(self) -> list[str]: ...
    @property
    def matched_rule_ids(self) -> list[str]: ...
    def __bool__(self) -> bool: ...

# ---------------------------------------------------------- hashed linear tier

@final
class FeatureHasher:
    """Hashes texts into sparse features, bit-identical to scikit-learn's HashingVectorizer."""

    def __new__(
        cls,
        n_features: int = 1048576,
        *,
        analyzer: Literal["word", "char", "char_wb"] = "word",
        ngram_range: tuple[int, int] = (1, 1),
        lowercase: bool = True,
        norm: Literal["l2", "l1"] | None = "l2",
        alternate_sign: bool = True,
        binary: bool = False,
        max_text_bytes: int = 1048576,
    ) -> FeatureHasher: ...
    def transform(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """CSR arrays (data, indices, indptr) equal to HashingVectorizer.transform's."""
    @property
    def n_features(self) -> int: ...
    @property
    def analyzer(self) -> str: ...
    @property
    def ngram_range(self) -> tuple[int, int]: ...
    @property
    def lowercase(self) -> bool: ...
    @property
    def norm(self) -> str | None: ...
    @property
    def alternate_sign(self) -> bool: ...
    @property
    def binary(self) -> bool: ...
    @property
    def max_text_bytes(self) -> int: ...
    def get_params(self) -> dict[str, Any]:
        """The settings as keyword arguments of the constructor."""

@final
class LinearModel:
    """A linear classifier over hashed features, with calibrated probabilities."""

    def __new__(
        cls,
        hashers: FeatureHasher | Sequence[FeatureHasher],
        coef: npt.ArrayLike,
        intercept: npt.ArrayLike,
        labels: Sequence[str],
        *,
        temperature: float = 1.0,
    ) -> LinearModel: ...
    def predict_proba(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Calibrated probabilities, shape (len(texts), n_classes)."""
    def decision_function(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Raw scores before calibration, shape (len(texts), n_outputs)."""
    def predict_proba_csr(
        self, data: npt.ArrayLike, indices: npt.ArrayLike, indptr: npt.ArrayLike
    ) -> npt.NDArray[np.float32]:
        """Probabilities for rows already hashed, given as CSR arrays."""
    def top_k(
        self, texts: Sequence[str], k: int = 1, min_known: int = 0
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """(class indices, probabilities) of the k best classes per text, best first;
        index -1 and probability 0 for a text with fewer than ``min_known`` features
        that training saw."""
    def top1(self, text: str, min_known: int = 0) -> tuple[int, float]:
        """(class index, probability) of one text's best class: ``top_k([text], 1,
        min_known)`` as two numbers (holding the GIL for a text under
        KEEP_GIL_BELOW_BYTES)."""
    def proba(self, text: str) -> npt.NDArray[np.float32]:
        """One text's probabilities, shape (n_classes,): ``predict_proba([text])[0]``
        (holding the GIL for a text under KEEP_GIL_BELOW_BYTES)."""
    def with_temperature(self, temperature: float) -> LinearModel:
        """The same weights with another calibration temperature."""
    @property
    def labels(self) -> list[str]: ...
    @property
    def n_classes(self) -> int: ...
    @property
    def n_features(self) -> int: ...
    @property
    def seen_features(self) -> int:
        """How many features training saw: only their weight rows are held in memory."""
    @property
    def temperature(self) -> float: ...
    @property
    def hashers(self) -> list[FeatureHasher]: ...

# ------------------------------------------------------------ semantic cache tier

@final
class AnnIndex:
    """Approximate nearest-neighbour index over float32 vectors keyed by uint64 ids."""

    def __new__(
        cls,
        dim: int,
        *,
        metric: Literal["cosine", "ip"] = "cosine",
        dtype: Literal["f32", "i8"] = "f32",
        m: int = 16,
        ef_construction: int = 128,
        ef_search: int = 64,
        exact_below: int = 2048,
    ) -> AnnIndex: ...
    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Adds vectors (n, dim) under ids; nothing is added if any row is invalid."""
    def search(
        self, queries: npt.ArrayLike, k: int = 10, ef: int | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """(ids, scores) of shape (n, k), best first; missing slots are -1 / -inf."""
    def remove(self, ids: npt.ArrayLike) -> None:
        """Removes ids; all must be present."""
    def get(self, id: int) -> npt.NDArray[np.float32] | None:
        """The stored vector of id, or None."""
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index atomically in tiergate's checksummed format."""
    @staticmethod
    def load(path: str | os.PathLike[str]) -> AnnIndex:
        """Reads an index written by save(); damage raises FormatError."""
    @property
    def dim(self) -> int: ...
    @property
    def metric(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def ef_search(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, id: int, /) -> bool: ...

@final
class SemanticCache:
    """Per-namespace cache of bytes values looked up by embedding similarity."""

    def __new__(
        cls,
        dim: int,
        *,
        threshold: float = 0.95,
        ttl_seconds: float | None = None,
        capacity: int = 10000,
        metric: Literal["cosine", "ip"] = "cosine",
    ) -> SemanticCache: ...
    def put(self, namespace: str, vector: npt.ArrayLike, value: bytes) -> None:
        """Stores value for the request embedded as vector."""
    def get(self, namespace: str, vector: npt.ArrayLike) -> tuple[bytes, float] | None:
        """(value, similarity) of the best live entry at or above threshold, else None."""
    def get_batch(self, namespace: str, vectors: npt.ArrayLike) -> list[tuple[bytes, float] | None]:
        """get() for each row of vectors."""
    def clear(self, namespace: str) -> None:
        """Drops every entry of namespace."""
    def drop_namespace(self, namespace: str) -> bool:
        """Removes namespace whole (entries, index, its own counters; the totals keep
        them); whether there was one."""
    def save(self, path: str | os.PathLike[str]) -> int:
        """Writes every live entry to path (atomically); returns how many."""
    def restore(self, path: str | os.PathLike[str]) -> int:
        """Adds a snapshot's entries; returns how many were still live.

        Raises FormatError (naming the path, restoring nothing) for a corrupt,
        truncated or foreign file, or one made for another dim or metric."""
    def namespaces(self) -> list[str]:
        """Namespaces that have held entries, sorted."""
    def stats(self) -> dict[str, Any]:
        """{"total": {...}, "namespaces": {name: {...}}} counters."""
    @property
    def threshold(self) -> float: ...
    @property
    def dim(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def ttl_seconds(self) -> float | None: ...
    def __len__(self) -> int: ...
