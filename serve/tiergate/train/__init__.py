"""`tiergate train`: every local tier on the same labels, calibrated and gated.

Order of work: load and split the data; copy the rules; fit the hashed linear
tier; fine-tune the intent model; on the validation split fit each tier's
calibration and choose its gate thresholds; measure calibration on the test
split (never used for fitting); write the bundle and its reports.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiergate._core import ConfigError, RuleSet
from tiergate.bundle import (
    FINE_TUNED,
    INTENT_DIR,
    LINEAR_FILE,
    REPORTS_DIR,
    RULES_FILE,
    ZERO_SHOT,
    save_linear,
    write_manifest,
)
from tiergate.calibration import (
    Calibrator,
    Method,
    expected_calibration_error,
    reliability_table,
    softmax,
)
from tiergate.data import OUT_OF_SCOPE, Splits, texts
from tiergate.gate import GENERAL, SWEEP, DomainGate, Prices, Target, fit_domain_gate
from tiergate.tiers import IntentBackend, RulesTier, answer_domains
from tiergate.train.intent import IntentTrainConfig, resolve_base_model, train_intent
from tiergate.train.linear import train_linear


@dataclass
class TrainOptions:
    rules: Path | None = None
    intent: IntentTrainConfig | None = field(default_factory=IntentTrainConfig)
    calibration: Method = "temperature"
    # Per-tier choices that override ``calibration`` (e.g. {"linear": "platt"}).
    tier_calibration: dict[str, Method] = field(default_factory=dict)
    target: Target = field(default_factory=Target)
    prices: Prices = field(default_factory=Prices)
    seed: int = 0
    linear_epochs: int = 30
    progress: bool = True


def _log(msg: str) -> None:
    print(f"[tiergate train] {msg}", file=sys.stderr, flush=True)


@dataclass
class _TierFit:
    """What calibration and gating need from one tier on val and test."""

    val_pred: np.ndarray
    val_conf: np.ndarray
    report: dict[str, Any]
    # Calibrated distributions, for a later tier that mixes this one in.
    val_probs: np.ndarray
    test_probs: np.ndarray


def _intent_logits(
    splits: Splits, y_train: np.ndarray, labels: list[str], out: Path, options: TrainOptions
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Puts the intent model into the bundle (fine-tuned, or an instruct model as it is)
    and returns its logits on val and test, scored the way it will be served."""
    cfg = options.intent
    assert cfg is not None
    if cfg.zero_shot:
        from tiergate.zero_shot import ZeroShotBackend, copy_checkpoint

        _log(f"intent model: {cfg.base_model} zero-shot (no fine-tuning), scoring on vLLM")
        copy_checkpoint(resolve_base_model(cfg.base_model), out / INTENT_DIR)
        backend = ZeroShotBackend(out / INTENT_DIR, labels, cfg.max_length)
        try:
            val, test = _scored(backend, splits, options.progress)
        finally:
            backend.close()
        return val, test, {}
    _log(
        f"intent model: fine-tuning {cfg.base_model} for {cfg.steps(len(splits.train))} "
        f"steps (batch {cfg.batch_size})"
    )
    info = train_intent(
        texts(splits.train), y_train, labels, out / INTENT_DIR, cfg, progress=options.progress
    )
    from tiergate.tiers import TransformersIntentModel

    model = TransformersIntentModel(out / INTENT_DIR, max_length=cfg.max_length)
    val, test = _scored(model, splits, options.progress)
    return val, test, info


def _scored(
    backend: IntentBackend, splits: Splits, progress: bool, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The backend's logits on val and test, in chunks behind a progress bar."""
    from tqdm import tqdm

    parts = {"val": texts(splits.val), "test": texts(splits.test)}
    out: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    with tqdm(
        total=sum(len(t) for t in parts.values()),
        desc="intent model: scoring val and test",
        unit="text",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for name, items in parts.items():
            for start in range(0, len(items), chunk):
                out[name].append(backend.logits(items[start : start + chunk]))
                bar.update(len(items[start : start + chunk]))
    n = len(splits.labels)
    val, test = (np.concatenate(out[k]) if out[k] else np.zeros((0, n)) for k in ("val", "test"))
    return val, test


def train_bundle(splits: Splits, out: Path, options: TrainOptions) -> dict[str, Any]:
    """Trains, calibrates and gates every tier; writes the bundle to ``out``."""
    started = time.perf_counter()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new --out directory")
    labels = splits.labels
    index = {label: i for i, label in enumerate(labels)}
    y_train = np.array([index[e.label] for e in splits.train])
    y_val = np.array([index[e.label] for e in splits.val])
    y_test = np.array([index[e.label] for e in splits.test])
    in_scope = y_test != index.get(OUT_OF_SCOPE, -1)
    oos_column = index.get(OUT_OF_SCOPE)
    if len(splits.val) == 0:
        raise ConfigError("calibration needs a validation split; the data gave none")
    _log(splits.describe())
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORTS_DIR).mkdir()
    tiers: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"data": splits.describe(), "tiers": {}}

    # (tier, val predictions, confidences, domains) in cascade order: gated together at the end
    stages: list[tuple[str, np.ndarray, np.ndarray, list[str]]] = []

    # Rules: written, not learned; measured on val so their confidence is honest.
    risk_val: list[list[str]] = [[] for _ in splits.val]
    if options.rules is not None:
        rules = RuleSet.from_file(options.rules)
        shutil.copyfile(options.rules, out / RULES_FILE)
        tier = RulesTier(rules, labels)
        fired = tier.fit_precision(texts(splits.val), y_val)
        val_out, risk_val = tier.match(texts(splits.val))
        tiers["rules"] = {"file": RULES_FILE, "precision": tier.precision}
        declared = dict(zip(rules.rule_ids, rules.confidences, strict=True))
        report["tiers"]["rules"] = {"rules": len(rules), "fired_on_val": fired}
        report["tiers"]["rules"]["calibration"] = _rules_calibration_report(
            tier, declared, texts(splits.test), y_test, out
        )
        val_out.domains = answer_domains(val_out.pred, labels, splits.label_domains, risk_val)
        stages.append(("rules", val_out.pred, val_out.confidence, val_out.domains))

    # Hashed linear tier.
    _log(f"linear tier: fitting on {len(splits.train)} texts")
    t0 = time.perf_counter()
    model, coef, intercept, hashers = train_linear(
        texts(splits.train), y_train, labels, epochs=options.linear_epochs, seed=options.seed
    )
    save_linear(out / LINEAR_FILE, coef, intercept, labels)
    fit = _calibrate(
        "linear",
        np.asarray(model.decision_function(texts(splits.val)), dtype=np.float64),
        np.asarray(model.decision_function(texts(splits.test)), dtype=np.float64),
        y_val,
        y_test,
        options.tier_calibration.get("linear", options.calibration),
        out,
        in_scope,
        oos_column if len(labels) > 2 else None,  # a binary model has one output column
    )
    linear_fit = fit
    tiers["linear"] = {
        "file": LINEAR_FILE,
        "hashers": hashers,
        "calibration": fit.report["calibrator"],
    }
    fit.report["train_seconds"] = round(time.perf_counter() - t0, 1)
    report["tiers"]["linear"] = fit.report
    domains = answer_domains(fit.val_pred, labels, splits.label_domains, risk_val)
    stages.append(("linear", fit.val_pred, fit.val_conf, domains))
    _log(f"linear tier: {fit.report['summary']}")

    # Intent model.
    if options.intent is not None:
        cfg = options.intent
        t0 = time.perf_counter()
        val_logits, test_logits, info = _intent_logits(splits, y_train, labels, out, options)
        fit = _calibrate(
            "intent",
            val_logits,
            test_logits,
            y_val,
            y_test,
            options.tier_calibration.get("intent", options.calibration),
            out,
            in_scope,
            oos_column,
            (linear_fit.val_probs, linear_fit.test_probs),
        )
        tiers["intent"] = {
            "dir": INTENT_DIR,
            "kind": ZERO_SHOT if cfg.zero_shot else FINE_TUNED,
            "base_model": cfg.base_model,
            "max_length": cfg.max_length,
            "calibration": fit.report["calibrator"],
        }
        fit.report.update(info)
        fit.report["train_seconds"] = round(time.perf_counter() - t0, 1)
        report["tiers"]["intent"] = fit.report
        domains = answer_domains(fit.val_pred, labels, splits.label_domains, risk_val)
        stages.append(("intent", fit.val_pred, fit.val_conf, domains))
        _log(f"intent model: {fit.report['summary']}")

    gates, raised = _fit_gates(stages, y_val, options)
    if raised is not None and raised["floor"] > 0:
        _log(
            f"gate: {raised['tier']} tier thresholds raised to at least {raised['floor']:.2f}; "
            f"local tiers answer {raised['answered_val']:.1%} of val "
            f"(tier by tier: {raised['answered_val_unraised']:.1%})"
        )
    thresholds = {name: g.thresholds for name, g in gates.items()}
    report["gate"] = {
        "target": {
            "precision": options.target.precision,
            "max_escalation": options.target.max_escalation,
            "margin_z": options.target.margin_z,
        },
        "raised": raised,
        "prices": {
            "frontier_per_request": options.prices.frontier_per_request,
            "local_per_request": options.prices.local_per_request,
        },
        "thresholds": thresholds,
        "reasons": {name: g.reasons for name, g in gates.items()},
    }
    _write_sweeps(out, gates)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / REPORTS_DIR / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(
        out,
        labels=labels,
        label_domains=splits.label_domains,
        tiers=tiers,
        thresholds=thresholds,
        extra={"training": {"data": splits.source, "seed": options.seed}},
    )
    _log(f"bundle written to {out} in {report['seconds']:.0f} s")
    return report


def _calibrate(
    name: str,
    val_logits: np.ndarray,
    test_logits: np.ndarray,
    y_val: np.ndarray,
    y_test: np.ndarray,
    method: Method,
    out: Path,
    in_scope: np.ndarray,
    oos_column: int | None,
    mix_with: tuple[np.ndarray, np.ndarray] | None = None,
) -> _TierFit:
    """Fits the tier's calibration on val and measures it on test.

    ``oos_column``: the out-of-scope label, whose logit gets a fitted bias.
    ``mix_with``: an earlier tier's calibrated distributions on (val, test).
    """
    from tiergate.plots import reliability_diagram

    val_mix, test_mix = mix_with if mix_with is not None else (None, None)
    calibrator = Calibrator.fit(val_logits, y_val, method, bias_index=oos_column, mix_with=val_mix)
    raw = softmax(test_logits)
    raw_pred, raw_conf = raw.argmax(axis=1), raw.max(axis=1)
    test_probs = calibrator.probabilities(test_logits, test_mix)
    cal_pred, cal_conf = calibrator.apply_probabilities(test_probs)
    before = expected_calibration_error(raw_conf, raw_pred == y_test)
    after = expected_calibration_error(cal_conf, cal_pred == y_test)
    val_probs = calibrator.probabilities(val_logits, val_mix)
    val_pred, val_conf = calibrator.apply_probabilities(val_probs)
    reliability_diagram(
        out / REPORTS_DIR / f"reliability_{name}.png",
        f"{name} tier, test split",
        {
            "uncalibrated": reliability_table(raw_conf, raw_pred == y_test),
            f"{method}": reliability_table(cal_conf, cal_pred == y_test),
        },
        {"uncalibrated": before, f"{method}": after},
    )
    accuracy = float(np.mean(cal_pred == y_test)) if len(y_test) else float("nan")
    # Out-of-scope texts are where classifiers are confidently wrong and the
    # validation split may hold few of them: report in-scope figures apart.
    ok = cal_pred == y_test
    extra: dict[str, float] = {}
    if calibrator.mix > 0:
        # The tier answers with the mix; the model's own accuracy is worth knowing too.
        extra["model_alone_test_accuracy_in_scope"] = round(
            float(np.mean(raw_pred[in_scope] == y_test[in_scope])), 4
        )
    if in_scope.any() and not in_scope.all():
        extra |= {
            "test_accuracy_in_scope": round(float(ok[in_scope].mean()), 4),
            "ece_test_after_in_scope": round(
                expected_calibration_error(cal_conf[in_scope], ok[in_scope]), 4
            ),
            "test_out_of_scope_share": round(float(1 - in_scope.mean()), 4),
        }
    parts = []
    if calibrator.bias[0] is not None:
        parts.append(f"out-of-scope bias {calibrator.bias[1]:+.2f}")
    if calibrator.mix > 0:
        parts.append(f"mixes in {calibrator.mix:.0%} of the linear tier")
    return _TierFit(
        val_pred,
        val_conf,
        {
            "calibrator": calibrator.to_json(),
            "ece_test_before": round(before, 4),
            "ece_test_after": round(after, 4),
            "test_accuracy_all": round(accuracy, 4),
            **extra,
            "summary": (
                f"test accuracy {accuracy:.4f}; ECE {before:.4f} -> {after:.4f} "
                f"({', '.join([method, *parts])})"
                + (
                    f"; in scope: accuracy {extra['test_accuracy_in_scope']:.4f}, "
                    f"ECE {extra['ece_test_after_in_scope']:.4f}"
                    if "test_accuracy_in_scope" in extra
                    else ""
                )
            ),
        },
        val_probs,
        test_probs,
    )


def _rules_calibration_report(
    tier: RulesTier,
    declared: dict[str, float],
    test_texts: list[str],
    y_test: np.ndarray,
    out: Path,
) -> dict[str, Any]:
    from tiergate.plots import reliability_diagram

    matches = tier.rules.match_batch(test_texts)
    fired = [(i, m.rule_id) for i, m in enumerate(matches) if m.rule_id and m.label]
    if not fired:
        return {"fired_on_test": 0}
    correct = np.array([y_test[i] == tier.label_index[matches[i].label or ""] for i, _ in fired])
    before = np.array([declared[r] for _, r in fired])
    after = np.array([tier.precision.get(r, declared[r]) for _, r in fired])
    ece = {
        "declared": expected_calibration_error(before, correct),
        "measured": expected_calibration_error(after, correct),
    }
    reliability_diagram(
        out / REPORTS_DIR / "reliability_rules.png",
        "rules tier, test split (texts a rule answered)",
        {
            "declared": reliability_table(before, correct),
            "measured": reliability_table(after, correct),
        },
        ece,
    )
    return {
        "fired_on_test": len(fired),
        "precision_on_test": round(float(correct.mean()), 4),
        "ece_test_before": round(ece["declared"], 4),
        "ece_test_after": round(ece["measured"], 4),
    }


# Among floors whose cascades answer within this share of the best, the lowest wins:
# the cheaper tier keeps what it answers as well as the model would.
FLOOR_TOLERANCE = 0.001


def _fit_gates(
    stages: list[tuple[str, np.ndarray, np.ndarray, list[str]]],
    y_val: np.ndarray,
    options: TrainOptions,
) -> tuple[dict[str, DomainGate], dict[str, Any] | None]:
    """Every tier's gate, chosen so that the local answers together meet the target and
    are as many as possible.

    Gating tier by tier, each at the target on its own, spends the whole error budget on
    the first tier: the linear tier answers up to exactly the target, and the intent
    model, which would have answered many of the same texts with fewer mistakes, must
    then meet the target alone. So the threshold of the tier before the intent model is
    searched: raised step by step, each time re-gating the intent model on what is left,
    keeping the floor under which the cascade answers the most on val.
    """
    names = [name for name, *_ in stages]

    def run(searched: str, floor: float) -> tuple[dict[str, DomainGate], float]:
        cascade = _ValCascade(y_val, options)
        gates = {}
        for name, pred, conf, domains in stages:
            lifted = floor if name == searched else 0.0
            gates[name] = cascade.gate(pred, conf, domains, floor=lifted)
        return gates, float(cascade.answered.mean()) if len(y_val) else 0.0

    if "intent" not in names or names.index("intent") == 0 or options.target.precision is None:
        return run("", 0.0)[0], None
    searched = names[names.index("intent") - 1]
    tried = [(f, *run(searched, f)) for f in (0.0, *SWEEP, 1.01)]
    best = max(answered for _, _, answered in tried)
    floor, gates, answered = next(t for t in tried if t[2] >= best - FLOOR_TOLERANCE)
    plain = tried[0][2]
    return gates, {
        "tier": searched,
        "floor": floor,
        "answered_val": round(answered, 4),
        "answered_val_unraised": round(plain, 4),
    }


class _ValCascade:
    """The validation split flowing through the tiers in cascade order.

    Each tier's gate is chosen on the examples the earlier tiers left open, so
    that the local answers *together* meet the precision target.
    """

    def __init__(self, y_val: np.ndarray, options: TrainOptions):
        self.y = y_val
        self.options = options
        self.answered = np.zeros(len(y_val), dtype=bool)
        self.correct = np.zeros(len(y_val), dtype=bool)

    def gate(
        self, pred: np.ndarray, conf: np.ndarray, domains: list[str], floor: float = 0.0
    ) -> DomainGate:
        """``floor``: no threshold of this tier below it (see :func:`_fit_gates`)."""
        ok = pred == self.y
        gate = fit_domain_gate(
            conf,
            ok,
            domains,
            self.options.target,
            self.options.prices,
            earlier=(self.answered, self.correct),
        )
        for domain, t in gate.thresholds.items():
            if t < floor:
                gate.thresholds[domain] = floor
                gate.reasons[domain] += (
                    f"; raised to {floor:.2f}: the next tier answers the rest with fewer "
                    "mistakes, so the cascade answers more in total"
                )
        takes = ~self.answered & (pred >= 0) & gate.accepts(conf, domains)
        self.answered |= takes
        self.correct |= takes & ok
        return gate


def _write_sweeps(out: Path, gates: dict[str, DomainGate]) -> None:
    from tiergate.plots import threshold_sweep

    lines = [
        "| tier | domain | threshold | accepted accuracy | answered | escalation | cost / 1k |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows: list[dict[str, Any]] = []
    for tier, gate in gates.items():
        for domain, points in gate.sweeps.items():
            chosen = gate.thresholds.get(domain)
            for p in points:
                mark = (
                    " **(chosen)**"
                    if chosen is not None and abs(p.threshold - chosen) < 1e-9
                    else ""
                )
                lines.append(
                    f"| {tier} | {domain} | {p.threshold:.2f}{mark} | {p.accepted_accuracy:.4f} "
                    f"| {p.answered_share:.1%} | {p.escalation_rate:.1%} | ${p.cost_per_1k:.4f} |"
                )
                rows.append({"tier": tier, "domain": domain, **p.as_dict()})
    (out / REPORTS_DIR / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / REPORTS_DIR / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    threshold_sweep(
        out / REPORTS_DIR / "sweep.png",
        "gate sweep on the validation split (general domain)",
        {tier: g.sweeps[GENERAL] for tier, g in gates.items()},
        {tier: g.thresholds[GENERAL] for tier, g in gates.items()},
    )
