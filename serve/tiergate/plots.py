"""PNG figures for training and evaluation reports (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tiergate.gate import SweepPoint


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(
    path: Path,
    title: str,
    curves: dict[str, list[dict[str, float]]],
    ece: dict[str, float],
) -> Path:
    """Accuracy against confidence per bin, one curve per calibration state."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for name, rows in curves.items():
        xs = [r["confidence"] for r in rows]
        ys = [r["accuracy"] for r in rows]
        sizes = [max(8.0, 200.0 * r["count"] / max(1, sum(q["count"] for q in rows))) for r in rows]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece[name]:.3f})")
        ax.scatter(xs, ys, s=sizes, alpha=0.3)
    ax.set_xlabel("confidence (mean per bin)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def threshold_sweep(
    path: Path,
    title: str,
    sweeps: dict[str, Sequence[SweepPoint]],
    chosen: dict[str, float],
) -> Path:
    """Cost per 1,000 requests against accuracy of accepted answers, chosen points marked."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, points in sweeps.items():
        cost = [p.cost_per_1k for p in points]
        acc = [p.accepted_accuracy for p in points]
        line = left.plot(cost, acc, marker=".", label=name)[0]
        right.plot([p.threshold for p in points], [p.answered_share for p in points],
                   color=line.get_color(), label=f"{name}: answered")  # fmt: skip
        pick = min(points, key=lambda p: abs(p.threshold - chosen.get(name, 2.0)))
        if name in chosen and chosen[name] <= 1.0:
            left.scatter([pick.cost_per_1k], [pick.accepted_accuracy], s=120, marker="*",
                         color=line.get_color(), zorder=5, edgecolor="black")  # fmt: skip
            left.annotate(f"t={chosen[name]:.2f}", (pick.cost_per_1k, pick.accepted_accuracy),
                          textcoords="offset points", xytext=(6, -12), fontsize=8)  # fmt: skip
            right.axvline(chosen[name], color=line.get_color(), linestyle=":")
    left.set_xlabel("cost per 1,000 requests (USD, escalations priced)")
    left.set_ylabel("accuracy of accepted answers")
    left.set_title(title)
    left.legend(fontsize=8)
    right.set_xlabel("threshold")
    right.set_ylabel("share answered by the tier")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
