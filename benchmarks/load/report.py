"""Turning tallies into figures: a summary per configuration, Markdown, JSON, PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.load.loadgen import Tally

PERCENTILES = (50, 95, 99, 99.9)
# Order of the tier-mix bars: cheapest first.
DECIDERS = ("exact_cache", "rules", "linear", "intent", "semantic_cache", "frontier", "review")


def _ms(h: Any, p: float) -> float:
    return round(h.get_value_at_percentile(p) / 1000, 3) if h.get_total_count() else float("nan")


def summarize(t: Tally, baseline: Tally | None = None) -> dict[str, Any]:
    """The figures of one configuration. ``baseline``: the same workload without caches,
    to tell the errors a cache added from the ones it merely repeated."""
    h, cheap = t.histograms()
    answered = max(t.ok, 1)
    # Accuracy and cost are per request sent: a refused or failed request is not a right
    # answer, and leaving it out would flatter a configuration that fails a lot.
    sent = max(t.sent, t.ok, 1)
    added = 0
    if baseline is not None:
        for n, (label, cached) in t.answers.items():
            before = baseline.answers.get(n)
            if cached and before is not None and before[0] != label:
                added += 1
    return {
        "requests": t.sent,
        "answered": t.ok,
        "seconds": round(t.elapsed_s, 2),
        # Over the whole run, the wait for the last answers (drain) included: below the
        # offered rate when answers are slow, even if the server keeps up.
        "throughput_rps": round(t.ok / t.elapsed_s, 1) if t.elapsed_s else 0.0,
        "latency_ms": {f"p{p:g}": _ms(h, p) for p in PERCENTILES} | {"max": _ms(h, 100)},
        "cheap_tier_latency_ms": {f"p{p:g}": _ms(cheap, p) for p in PERCENTILES}
        | {"count": cheap.get_total_count()},
        "errors": {code: n for code, n in sorted(t.codes.items()) if code != "OK"},
        "decided_by": {k: round(v / answered, 4) for k, v in sorted(t.decided_by.items())},
        "kinds_sent": dict(t.kinds),
        "client_loops": dict(t.loops),  # client processes per event loop that ran them
        "accuracy": round(t.correct / sent, 4),
        "in_scope_accuracy": round(t.in_scope_correct / max(t.in_scope, 1), 4),
        "oos_recall": round(t.oos_caught / t.oos, 4) if t.oos else None,
        "cache_hit_rate": round(t.cache_hits / answered, 4),
        # A cache answer whose label is not the dataset's (the answer it repeats may
        # have been wrong already) ...
        "false_hit_rate": round(t.false_hits / t.cache_hits, 4) if t.cache_hits else None,
        "false_hits_by_cache": {  # per cache: (wrong answers, answers)
            k: [t.false_by_cache.get(k, 0), t.decided_by[k]]
            for k in ("exact_cache", "semantic_cache")
            if t.decided_by.get(k)
        },
        "false_hits_by_origin": {  # per tier whose answer the cache repeats: (wrong, answers)
            k: [t.false_by_origin.get(k, 0), n] for k, n in sorted(t.hits_by_origin.items())
        },
        "false_hits_out_of_scope": t.false_oos_hits,  # of the wrong ones: oos texts
        # ... and one that differs from what the same request got without caches:
        # the errors the cache itself introduced.
        "cache_changed_answers": (
            round(added / t.cache_hits, 4) if t.cache_hits and baseline is not None else None
        ),
        "escalation_rate": round(t.escalations / answered, 4),
        "degraded_rate": round(t.degraded / answered, 4),
        "cost_usd": round(t.cost_usd, 6),
        "cost_per_1k_usd": round(1000 * t.cost_usd / sent, 4),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict[str, dict[str, Any]], header: list[str]) -> str:
    lines = [*header, ""]
    lines += [
        "| configuration | answered req/s (incl. drain) | p50 ms | p95 ms | p99 ms | p99.9 ms "
        "| accuracy | in-scope acc "
        "| oos recall | cache hits | false hits | cache-changed | escalated | cost / 1k | errors |",
        "|---|" + "---:|" * 13 + "---|",
    ]
    for name, r in results.items():
        lat = r["latency_ms"]
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"
        lines.append(
            f"| {name} | {r['throughput_rps']:,.0f} | {lat['p50']:.2f} | {lat['p95']:.2f} "
            f"| {lat['p99']:.2f} | {lat['p99.9']:.2f} | {_pct(r['accuracy'])} "
            f"| {_pct(r['in_scope_accuracy'])} | {_pct(r['oos_recall'])} "
            f"| {_pct(r['cache_hit_rate'])} | {_pct(r['false_hit_rate'])} "
            f"| {_pct(r['cache_changed_answers'])} | {_pct(r['escalation_rate'])} "
            f"| ${r['cost_per_1k_usd']:.4f} | {errors} |"
        )
    for name, r in results.items():
        by = r.get("false_hits_by_cache") or {}
        if by:
            parts = [f"{k.replace('_', ' ')} {w} of {n} ({_pct(w / n)})" for k, (w, n) in
                     by.items()]  # fmt: skip
            origin = r.get("false_hits_by_origin") or {}
            first = ", ".join(f"{k} {w} of {n}" for k, (w, n) in origin.items())
            wrong = sum(w for w, _ in by.values())
            oos = r.get("false_hits_out_of_scope", 0)
            lines.append(
                f"\nWrong cache answers, {name}: {', '.join(parts)}; by the tier whose answer "
                f"the cache repeats: {first}; {oos} of the {wrong} wrong are out-of-scope texts."
            )
    lines += ["", "Decided by (share of answered requests):", ""]
    lines += ["| configuration | " + " | ".join(DECIDERS) + " |",
              "|---|" + "---:|" * len(DECIDERS)]  # fmt: skip
    for name, r in results.items():
        shares = [_pct(r["decided_by"].get(k, 0.0)) for k in DECIDERS]
        lines.append(f"| {name} | " + " | ".join(shares) + " |")
    return "\n".join(lines) + "\n"


def _figure() -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    return plt, fig, ax


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency_cdf(tallies: dict[str, Tally], path: Path) -> None:
    plt, fig, ax = _figure()
    for name, t in tallies.items():
        h, _ = t.histograms()
        if not h.get_total_count():
            continue
        xs, ys = [], []
        for item in h.get_percentile_iterator(5):
            xs.append(item.value_iterated_to / 1000)
            ys.append(item.percentile_level_iterated_to / 100)
        ax.plot(xs, ys, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency from intended send (ms, log scale)")
    ax.set_ylabel("share of requests answered")
    ax.set_title("Latency CDF per configuration")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (no configuration answered anything)
        ax.legend()
    _save(plt, fig, path)


def plot_tier_mix(results: dict[str, dict[str, Any]], path: Path) -> None:
    plt, fig, ax = _figure()
    names = list(results)
    bottom = [0.0] * len(names)
    for tier in DECIDERS:
        shares = [results[n]["decided_by"].get(tier, 0.0) for n in names]
        if any(shares):
            ax.bar(names, shares, bottom=bottom, label=tier)
            bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    for i, n in enumerate(names):
        ax.annotate(f"${results[n]['cost_per_1k_usd']:.3f}/1k", (i, min(bottom[i], 1.0)),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("share of requests decided")
    ax.set_title("Which tier decided (cost per 1,000 requests on top)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    _save(plt, fig, path)


def plot_sweep(points: list[dict[str, Any]], budget_ms: float, path: Path) -> None:
    plt, fig, ax = _figure()
    # Offered load on x: open loop holds it whatever the server does, while the
    # answered rate over a run includes the drain after the last send.
    xs = [p["offered_rps"] for p in points]
    for key, style in (("p50", "o-"), ("p99", "s-")):
        ax.plot(xs, [p["latency_ms"][key] for p in points], style, label=key)
    cheap = [p["cheap_tier_latency_ms"]["p99"] for p in points]
    ax.plot(xs, cheap, "^--", label="p99, cheap tiers")
    ax.axhline(budget_ms, color="red", lw=0.8, ls=":", label=f"p99 budget {budget_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson arrivals)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("Latency versus throughput (open loop, rate sweep)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (no configuration answered anything)
        ax.legend()
    _save(plt, fig, path)
