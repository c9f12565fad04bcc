"""`tiergate eval`: the whole cascade in-process over a labelled test set.

Every tier runs once over the test texts; the cascade and each tier alone are
then scored from the same outputs, so all rows of the report describe one run
on identical inputs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiergate.bundle import Bundle
from tiergate.data import OUT_OF_SCOPE, Example
from tiergate.frontier import (
    DEFAULT_CANDIDATES,
    FrontierAnswer,
    FrontierSimulator,
    OpenAIFrontier,
    shortlist,
)
from tiergate.gate import Prices
from tiergate.tiers import (
    LOCAL_TIERS,
    IntentTier,
    LinearTier,
    RulesTier,
    TierOutput,
    answer_domains,
    load_intent_backend,
)


def _log(msg: str) -> None:
    print(f"[tiergate eval] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    name: str
    predictions: list[str | None]  # None: no answer
    decided_by: list[str]
    cost: float  # total US dollars over the test set
    latency_s: list[float]  # per request
    local_accepted: np.ndarray | None = None  # mask of requests answered by a local tier
    notes: dict[str, Any] = field(default_factory=dict)


def run_tiers(
    bundle: Bundle, texts: Sequence[str]
) -> tuple[dict[str, TierOutput], list[list[str]]]:
    outputs: dict[str, TierOutput] = {}
    tags: list[list[str]] = [[] for _ in texts]
    if bundle.has("rules"):
        rules = RulesTier(bundle.rules(), bundle.labels, bundle.rule_precision())
        outputs["rules"], tags = rules.match(texts)
        outputs["rules"].domains = answer_domains(
            outputs["rules"].pred, bundle.labels, bundle.label_domains, tags
        )
        _log(f"rules tier: {np.mean(outputs['rules'].pred >= 0):.1%} of texts matched")
    if bundle.has("linear"):
        linear = LinearTier(
            bundle.linear_model(), bundle.calibrator("linear"), bundle.label_domains
        )
        outputs["linear"] = linear.predict(texts)
        _log(f"linear tier: {outputs['linear'].seconds * 1e6 / max(1, len(texts)):.1f} µs/text")
    if bundle.has("intent"):
        backend = load_intent_backend(bundle)
        try:
            intent = IntentTier(backend, bundle.calibrator("intent"), bundle.label_domains)
            linear_out = outputs.get("linear")
            outputs["intent"] = intent.predict(texts, linear_out.probs if linear_out else None)
        finally:
            backend.close()  # a zero-shot model's engine runs in processes of its own
        _log(f"intent model: {outputs['intent'].seconds * 1e3 / max(1, len(texts)):.2f} ms/text")
    # A strict risk tag raised by the rules applies to every tier's answer.
    for name in ("linear", "intent"):
        if name in outputs:
            outputs[name].domains = answer_domains(
                outputs[name].pred, bundle.labels, bundle.label_domains, tags
            )
    return outputs, tags


def cascade_route(bundle: Bundle, outputs: dict[str, TierOutput]) -> tuple[np.ndarray, list[str]]:
    """(label index or -1 for escalate, deciding tier) per request."""
    n = len(next(iter(outputs.values())))
    pred = np.full(n, -1, dtype=np.int64)
    decided = ["frontier"] * n
    open_ = np.ones(n, dtype=bool)
    for name in LOCAL_TIERS:
        if name not in outputs:
            continue
        out = outputs[name]
        accept = open_ & (out.pred >= 0) & bundle.gate(name).accepts(out.confidence, out.domains)
        pred[accept] = out.pred[accept]
        for i in np.flatnonzero(accept):
            decided[i] = name
        open_ &= ~accept
    return pred, decided


def evaluate(
    bundle: Bundle,
    examples: Sequence[Example],
    frontier: FrontierSimulator | OpenAIFrontier,
    prices: Prices,
    candidates: int = DEFAULT_CANDIDATES,
) -> dict[str, Any]:
    """Every configuration on ``examples``. The cascade's escalations offer the frontier
    the last local tier's ``candidates`` likeliest labels, as serving does (0: all)."""
    texts = [e.text for e in examples]
    gold = [e.label for e in examples]
    labels = bundle.labels
    outputs, _ = run_tiers(bundle, texts)
    per_text = {name: out.seconds / max(1, len(texts)) for name, out in outputs.items()}

    routed, decided = cascade_route(bundle, outputs)
    escalate = [i for i, d in enumerate(decided) if d == "frontier"]
    _log(f"cascade escalates {len(escalate)} of {len(texts)}; asking the frontier tier")
    # The all-frontier row asks with every label; the cascade with its shortlists.
    answers: list[FrontierAnswer] = frontier.classify(texts, gold)
    last = next((outputs[n] for n in reversed(LOCAL_TIERS) if n in outputs), None)
    offered: list[list[str]] = [
        shortlist(last.probs[i], labels, candidates)
        if last is not None and last.probs is not None
        else list(labels)
        for i in escalate
    ]
    if all(len(o) == len(labels) for o in offered):  # the same question: reuse the answers
        asked = [answers[i] for i in escalate]
    else:
        asked = frontier.classify([texts[i] for i in escalate], [gold[i] for i in escalate],
                                  offered)  # fmt: skip
    escalated = dict(zip(escalate, asked, strict=True))
    in_scope_escalated = [k for k, i in enumerate(escalate) if gold[i] != OUT_OF_SCOPE]
    shortlist_recall = (
        float(np.mean([gold[escalate[k]] in offered[k] for k in in_scope_escalated]))
        if in_scope_escalated
        else None
    )

    rows: list[Row] = []
    cascade_pred: list[str | None] = [labels[p] if p >= 0 else None for p in routed]
    latency = []
    for i, d in enumerate(decided):
        spent = 0.0
        for name in LOCAL_TIERS:
            if name in outputs:
                spent += per_text[name]
            if name == d:
                break
        if d == "frontier":
            cascade_pred[i] = escalated[i].label
            spent += escalated[i].seconds
        latency.append(spent)
    local_mask = np.array([d != "frontier" for d in decided])
    cost = sum(a.cost for a in asked) + prices.local_per_request * len(texts)
    rows.append(Row("cascade", cascade_pred, decided, cost, latency, local_mask))
    local_only = [
        p if d != "frontier" else None for p, d in zip(cascade_pred, decided, strict=True)
    ]
    rows.append(
        Row(
            "local tiers only (escalations unanswered)",
            local_only,
            decided,
            prices.local_per_request * len(texts),
            [
                t - (escalated[i].seconds if d == "frontier" else 0.0)
                for i, (t, d) in enumerate(zip(latency, decided, strict=True))
            ],
            local_mask,
        )
    )
    for name in LOCAL_TIERS:
        if name not in outputs:
            continue
        out = outputs[name]
        preds = [labels[p] if p >= 0 else None for p in out.pred]
        rows.append(
            Row(
                f"{name} only",
                preds,
                [name] * len(texts),
                prices.local_per_request * len(texts),
                [per_text[name]] * len(texts),
            )
        )
    rows.append(
        Row(
            "frontier only",
            [a.label for a in answers],
            ["frontier"] * len(texts),
            sum(a.cost for a in answers),
            [a.seconds for a in answers],
        )
    )
    return {
        "n": len(texts),
        "in_scope": sum(g != OUT_OF_SCOPE for g in gold),
        "out_of_scope": sum(g == OUT_OF_SCOPE for g in gold),
        "frontier": frontier.as_dict()
        if isinstance(frontier, FrontierSimulator)
        else {
            "simulated": False,
            "provider": frontier.provider.name,
            "model": frontier.provider.model,
        },
        "tier_latency_us_per_text": {k: round(v * 1e6, 2) for k, v in per_text.items()},
        # What the cascade's escalations offered the frontier: how many labels, and how
        # often the true one was among them (in-scope escalations; None: none or all).
        "candidates": {"offered": candidates, "of": len(labels), "recall": shortlist_recall},
        "thresholds": bundle.thresholds,
        "rows": [score(r, gold) for r in rows],
    }


def score(row: Row, gold: Sequence[str]) -> dict[str, Any]:
    g = np.array(gold, dtype=object)
    p = np.array(row.predictions, dtype=object)
    ins = g != OUT_OF_SCOPE
    answered = np.array([x is not None for x in row.predictions])
    correct = p == g
    tiers = sorted(set(row.decided_by))
    share = {t: float(np.mean([d == t for d in row.decided_by])) for t in tiers}
    share_in_scope = {
        t: float(np.mean([d == t for d, i in zip(row.decided_by, ins, strict=True) if i]))
        for t in tiers
    }
    out: dict[str, Any] = {
        "name": row.name,
        "in_scope_accuracy": float(correct[ins].mean()) if ins.any() else None,
        "oos_recall": float(correct[~ins].mean()) if (~ins).any() else None,
        "answered_share": float(answered.mean()),
        "share_by_tier": share,
        "escalation_rate": share.get("frontier", 0.0),
        "cost_per_1k": 1000 * row.cost / max(1, len(gold)),
        "latency_ms_p50": float(np.percentile(row.latency_s, 50) * 1e3),
        "latency_ms_p95": float(np.percentile(row.latency_s, 95) * 1e3),
    }
    if row.local_accepted is not None:
        acc = row.local_accepted
        out["local_answered_share_in_scope"] = float(acc[ins].mean()) if ins.any() else None
        out["local_accuracy_in_scope"] = (
            float(correct[acc & ins].mean()) if (acc & ins).any() else None
        )
        out["local_accuracy_all"] = float(correct[acc].mean()) if acc.any() else None
        out["local_share_by_tier_in_scope"] = share_in_scope
    return out


def markdown(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"Test set: {result['n']} texts ({result['in_scope']} in scope, "
        f"{result['out_of_scope']} out of scope).",
        "",
        "| configuration | in-scope acc | oos recall | answered by local tiers (in-scope) "
        "| accuracy of local answers (in-scope) | escalation | cost / 1k | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {pct(r['in_scope_accuracy'])} | {pct(r['oos_recall'])} "
            f"| {pct(r.get('local_answered_share_in_scope'))} "
            f"| {pct(r.get('local_accuracy_in_scope'))} | {pct(r['escalation_rate'])} "
            f"| ${r['cost_per_1k']:.4f} | {r['latency_ms_p50']:.3f} | {r['latency_ms_p95']:.3f} |"
        )
    cascade = result["rows"][0]
    lines += [
        "",
        "Cascade share by deciding tier: "
        + ", ".join(f"{k} {pct(v)}" for k, v in cascade["share_by_tier"].items()),
        "Tier cost per text (µs, batched, in-process): "
        + ", ".join(f"{k} {v}" for k, v in result["tier_latency_us_per_text"].items()),
    ]
    c = result.get("candidates")
    if c and 0 < c["offered"] < c["of"]:
        lines.append(
            f"Escalations offer the frontier the local tiers' {c['offered']} likeliest labels "
            f"(of {c['of']}) and oos; the true label was among them for "
            f"{pct(c['recall'])} of in-scope escalations."
        )
    f = result["frontier"]
    if f.get("simulated"):
        lines.append(
            f"Frontier: **SIMULATED** (accuracy {f['accuracy']}, latency median "
            f"{f['latency_median_ms']} ms / p95 {f['latency_p95_ms']} ms, "
            f"${f['price_in_per_mtok']}/M in, ${f['price_out_per_mtok']}/M out, seed {f['seed']})."
        )
    else:
        lines.append(f"Frontier: real provider {f['provider']} ({f['model']}).")
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], out: Path) -> None:
    from tiergate.plots import _pyplot

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(result))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        if r["in_scope_accuracy"] is None:
            continue
        ax.scatter(r["cost_per_1k"], r["in_scope_accuracy"], s=70)
        ax.annotate(r["name"], (r["cost_per_1k"], r["in_scope_accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(5, 4))  # fmt: skip
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("cost per 1,000 requests (USD)")
    ax.set_ylabel("in-scope accuracy")
    label = "simulated frontier" if result["frontier"].get("simulated") else "real frontier"
    ax.set_title(f"accuracy against cost ({label})")
    fig.tight_layout()
    fig.savefig(out / "cost_vs_accuracy.png", dpi=110)
    plt.close(fig)
