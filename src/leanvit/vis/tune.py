"""Accuracy against measured speed-up of every configuration ``leanvit tune`` tried, the chosen one marked."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ._figure import new_figure, save_figure


def tune_figure(result: Any, title: str = ""):
    """A :class:`matplotlib.figure.Figure` (never through pyplot) of a :class:`~leanvit.experiments.tune.TuneResult`:
    held-out top-1 against speed-up, one colour and marker per method; filled markers were read on the whole
    held-out split, hollow ones on the slice the search stopped at; the dense model is a black star at 1x, the
    constraint a dashed line, the chosen configuration (or the best found) a large star. Configurations that were
    not timed (a compiled runtime times only those whose speed decides) are left out."""
    from ..reduce import METHODS

    fig = new_figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.subplots()
    n = result.dense["images"]
    by_method: dict[str, list] = {}
    for t in result.trials:
        if any(t.schedule) and not math.isnan(t.speedup) and not math.isnan(t.top1):
            by_method.setdefault(t.method, []).append(t)
    for m, trials in by_method.items():
        color, marker = METHODS[m].style if m in METHODS else (None, "o")
        full = [t for t in trials if t.images >= n]
        part = [t for t in trials if t.images < n]
        label = METHODS[m].display if m in METHODS else m
        if full:
            ax.plot([t.speedup for t in full], [t.top1 for t in full], ls="none", marker=marker, color=color,
                    label=label, alpha=0.85)
        if part:
            ax.plot([t.speedup for t in part], [t.top1 for t in part], ls="none", marker=marker, mfc="none",
                    color=color, label=None if full else label, alpha=0.6)
    if any(t.images < n for ts in by_method.values() for t in ts):  # what a hollow marker means
        ax.plot([], [], ls="none", marker="o", mfc="none", color="gray", label="read on a slice of the split")
    dense_top1 = result.dense["heldout_top1"]
    ax.plot([1.0], [dense_top1], marker="*", ms=14, color="black", ls="none", label="dense")
    settings = result.settings
    if settings.get("max_drop") is not None:
        ax.axhline(dense_top1 - settings["max_drop"], color="black", lw=0.8, ls="--", alpha=0.6,
                   label=f"dense - {settings['max_drop']:g} points")
    if settings.get("target_speedup") is not None:
        ax.axvline(settings["target_speedup"], color="black", lw=0.8, ls="--", alpha=0.6,
                   label=f"{settings['target_speedup']:g}x")
    mark = result.chosen or result.best
    if mark is not None and not math.isnan(mark.speedup):
        ax.plot([mark.speedup], [mark.top1], marker="*", ms=20, mfc="gold", mec="black", ls="none",
                label="chosen" if result.chosen is not None else "best found (constraint not met)")
    ax.set_xlabel(f"speed-up over dense ({settings.get('runtime')}, batch {settings.get('batch')})")
    ax.set_ylabel("held-out top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_tune(result: Any, path: str | Path, title: str = "") -> Path:
    """Write :func:`tune_figure` to ``path`` (PNG, PDF, SVG, ...), atomically."""
    return save_figure(tune_figure(result, title), path)
