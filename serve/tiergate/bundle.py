"""Model bundles: everything the local tiers need, in one validated directory.

Layout::

    manifest.json      format version, creation time, labels, file hashes,
                       per-tier settings, calibration and gate thresholds
    rules.yaml         the user's rule file, copied (optional)
    linear.npz         hashed linear weights (class-major, float32) and labels
    intent/            a Hugging Face sequence-classification checkpoint that
                       vLLM's pooling runner serves, or an instruct checkpoint
                       used zero-shot (optional)
    reports/           what training measured (not hashed; free to delete)

Loading re-hashes every listed file: a missing file, a hash mismatch, a label
set that differs between tiers or an unknown format version is a
:class:`FormatError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tiergate._core import FeatureHasher, FormatError, LinearModel, RuleSet
from tiergate.calibration import Calibrator
from tiergate.gate import GENERAL, DomainGate

FORMAT = "tiergate-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RULES_FILE = "rules.yaml"
LINEAR_FILE = "linear.npz"
INTENT_DIR = "intent"
# tiers.intent.kind: a fine-tuned sequence classifier (the default when absent), or an
# instruct model used as it is (see tiergate.zero_shot).
FINE_TUNED = "fine-tuned"
ZERO_SHOT = "zero-shot"
REPORTS_DIR = "reports"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded, validated bundle (the tiers themselves are built lazily)."""

    path: Path
    labels: list[str]
    label_domains: dict[str, str]
    tiers: dict[str, dict[str, Any]]
    thresholds: dict[str, dict[str, float]]
    created: str
    manifest: dict[str, Any] = field(repr=False)

    def has(self, tier: str) -> bool:
        return tier in self.tiers

    def calibrator(self, tier: str) -> Calibrator:
        return Calibrator.from_json(
            self.tiers[tier].get("calibration"),
            f"{self.path / MANIFEST}: tiers.{tier}",
            len(self.labels),
        )

    def gate(self, tier: str) -> DomainGate:
        t = self.thresholds.get(tier, {GENERAL: 1.01})
        return DomainGate(dict(t), {}, {})

    def rules(self) -> RuleSet:
        return RuleSet.from_file(self.path / RULES_FILE)

    def rule_precision(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.tiers["rules"].get("precision", {}).items()}

    def linear_model(self, *, calibrated: bool = False) -> LinearModel:
        """The linear tier's weights; ``calibrated`` bakes its calibration into the model so
        that one Rust call returns calibrated probabilities (the front end's hot path)."""
        if not calibrated:
            return load_linear(self.path / LINEAR_FILE, self.tiers["linear"], self.labels)
        cal = self.calibrator("linear")
        return load_linear(
            self.path / LINEAR_FILE, self.tiers["linear"], self.labels, cal.temperature, cal.bias
        )

    def intent_path(self) -> Path:
        return self.path / INTENT_DIR


def save_linear(path: Path, coef: np.ndarray, intercept: np.ndarray, labels: list[str]) -> None:
    with path.open("wb") as f:
        np.savez(
            f,
            coef=np.asarray(coef, dtype=np.float32),
            intercept=np.asarray(intercept, dtype=np.float32),
            labels=np.asarray(labels, dtype=np.str_),
        )


def load_linear(
    path: Path,
    settings: dict[str, Any],
    labels: list[str],
    temperature: float = 1.0,
    bias: tuple[int | None, float] = (None, 0.0),
) -> LinearModel:
    """Loads the weights; a bias b on column i after the division by the temperature T
    is the same model with T * b added to that column's intercept."""
    try:
        with np.load(path, allow_pickle=False) as z:
            coef, intercept, file_labels = z["coef"], z["intercept"], [str(x) for x in z["labels"]]
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{path}: not a linear-tier weights file ({e})") from None
    if file_labels != labels:
        raise FormatError(f"{path}: its labels differ from the manifest's label set")
    try:
        hashers = []
        for params in settings["hashers"]:
            kwargs: dict[str, Any] = dict(params)
            kwargs["ngram_range"] = tuple(kwargs.get("ngram_range", (1, 1)))  # JSON has lists
            hashers.append(FeatureHasher(**kwargs))
        column, value = bias
        if column is not None:
            if column >= len(intercept):
                raise FormatError(f"{path}: calibration bias on column {column}, which it lacks")
            intercept = intercept.copy()
            intercept[column] += temperature * value
        return LinearModel(hashers, coef, intercept, labels, temperature=temperature)
    except (ValueError, TypeError, KeyError, OverflowError) as e:  # Overflow: -1 as a size
        raise FormatError(f"{path}: {e}") from None


def write_manifest(
    out: Path,
    *,
    labels: list[str],
    label_domains: dict[str, str],
    tiers: dict[str, dict[str, Any]],
    thresholds: dict[str, dict[str, float]],
    extra: dict[str, Any],
) -> Path:
    """Hashes the tier files under ``out`` and writes the manifest last (atomically)."""
    from tiergate import __version__

    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(REPORTS_DIR + "/"):
            files[rel] = sha256_file(p)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tiergate_version": __version__,
        "labels": labels,
        "label_domains": label_domains,
        "tiers": tiers,
        "thresholds": thresholds,
        "files": files,
        **extra,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def load_bundle(path: str | Path) -> Bundle:
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"no bundle directory at {root}")
    if not manifest_path.exists():
        raise FormatError(f"{manifest_path}: missing (is {root} a tiergate bundle?)")
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise FormatError(f"{manifest_path}: not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{manifest_path}: format version {m.get('format_version')!r} is not supported "
            f"(this tiergate reads version {FORMAT_VERSION})"
        )
    for key in ("labels", "tiers", "thresholds", "files"):
        if key not in m:
            raise FormatError(f"{manifest_path}: lacks {key!r}")
    labels = m["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise FormatError(f"{manifest_path}: labels must be a non-empty list of strings")
    if len(set(labels)) != len(labels):
        raise FormatError(f"{manifest_path}: labels repeat")
    _check_shapes(manifest_path, m)
    for rel, digest in m["files"].items():
        f = root / rel
        if not f.is_file():
            raise FormatError(f"{f}: listed in the manifest but missing")
        if sha256_file(f) != digest:
            raise FormatError(f"{f}: content does not match the manifest's hash (modified?)")
    tiers = m["tiers"]
    needed = {"rules": RULES_FILE, "linear": LINEAR_FILE, "intent": f"{INTENT_DIR}/config.json"}
    for tier, rel in needed.items():
        if tier in tiers and rel not in m["files"]:
            raise FormatError(f"{root / rel}: tier {tier!r} is enabled but its file is not listed")
    if "intent" in tiers and tiers["intent"].get("kind", FINE_TUNED) == FINE_TUNED:
        # A zero-shot model's labels are the manifest's: its prompt is built from them.
        _check_intent_labels(root / INTENT_DIR / "config.json", labels)
    bundle = Bundle(
        root,
        labels,
        dict(m.get("label_domains", {})),
        tiers,
        m["thresholds"],
        str(m.get("created", "")),
        m,
    )
    # Parse every calibration now, so a broken one fails the load, not the first request.
    calibrators = {t: bundle.calibrator(t) for t in ("linear", "intent") if t in tiers}
    if "intent" in calibrators and calibrators["intent"].mix > 0 and "linear" not in tiers:
        raise FormatError(
            f"{manifest_path}: tiers.intent mixes in the linear tier's answer, "
            "but the bundle has no linear tier"
        )
    return bundle


def _check_shapes(manifest_path: Path, m: dict[str, Any]) -> None:
    """The manifest's sections have the types the tiers will read, so a damaged
    manifest fails here, naming itself, and not later inside a tier."""

    def bad(what: str) -> FormatError:
        return FormatError(f"{manifest_path}: {what}")

    def is_number(x: object) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

    files = m["files"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise bad("files must map relative paths to SHA-256 digests")
    for rel in files:
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
            raise bad(f"files: {rel!r} is not a path inside the bundle")
    tiers = m["tiers"]
    if not isinstance(tiers, dict) or not all(isinstance(v, dict) for v in tiers.values()):
        raise bad("tiers must map each tier to its settings")
    thresholds = m["thresholds"]
    if not isinstance(thresholds, dict) or not all(
        isinstance(t, dict) and all(is_number(v) for v in t.values()) for t in thresholds.values()
    ):
        raise bad("thresholds must map tier -> domain -> number")
    for tier, t in thresholds.items():
        if GENERAL not in t:  # the threshold of every label of no domain of its own
            raise bad(f"thresholds.{tier} has no {GENERAL!r} entry")
    domains = m.get("label_domains", {})
    if not isinstance(domains, dict) or not all(isinstance(v, str) for v in domains.values()):
        raise bad("label_domains must map labels to domain names")
    precision = tiers.get("rules", {}).get("precision", {})
    if not isinstance(precision, dict) or not all(is_number(v) for v in precision.values()):
        raise bad("tiers.rules.precision must map rule ids to numbers")
    kind = tiers.get("intent", {}).get("kind", FINE_TUNED)
    if kind not in (FINE_TUNED, ZERO_SHOT):
        raise bad(f"tiers.intent.kind must be {FINE_TUNED!r} or {ZERO_SHOT!r}, not {kind!r}")
    length = tiers.get("intent", {}).get("max_length", 64)
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= 65_536:
        raise bad(f"tiers.intent.max_length must be a whole number of tokens, not {length!r}")


def _check_intent_labels(config_path: Path, labels: list[str]) -> None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        id2label = config["id2label"]
        mine = [id2label[str(i)] for i in range(len(id2label))]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{config_path}: no usable id2label ({e})") from None
    if mine != labels:
        raise FormatError(
            f"{config_path}: the intent model's labels differ from the manifest's "
            f"({len(mine)} vs {len(labels)} labels)"
        )
