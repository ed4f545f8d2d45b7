"""Accuracy versus GMACs, one line per method (the figure of every token-reduction paper)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ._figure import new_figure, save_figure


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write a PNG/PDF/SVG of top-1 against GMACs from comparison rows (keys ``method``, ``gmacs``, ``top1``,
    optional ``top1_std``). The dense model is drawn as a star and a dashed horizontal reference line."""
    from ..reduce import METHODS

    fig = new_figure(figsize=(6, 4.2), dpi=120)
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["gmacs"])
        color, marker = METHODS[m].style if m in METHODS else (None, "o")  # labelled variants: matplotlib's cycle
        xs = [r["gmacs"] for r in pts]
        ys = [r["top1"] for r in pts]
        errs = [r.get("top1_std", 0.0) or 0.0 for r in pts]
        if m == "dense":
            ax.axhline(ys[0], color="black", lw=0.8, ls="--", alpha=0.6)
            ax.plot(xs, ys, marker="*", ms=14, color="black", ls="none", label="dense")
        else:
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker=marker, color=color, label=METHODS[m].display
                        if m in METHODS else m, capsize=3, lw=1.5)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
