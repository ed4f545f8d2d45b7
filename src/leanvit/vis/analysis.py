"""Figures of ``leanvit analyze``: a reliability diagram and a per-block CKA heatmap."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ._figure import new_figure, save_figure


def plot_reliability(report, path: str | Path, title: str = "") -> Path:
    """Write a reliability diagram of a :class:`~leanvit.analysis.CalibrationReport`: per confidence bin, the
    accuracy (bars) against the diagonal of perfect calibration, the gap to each bin's mean confidence (hatched),
    and below, the share of predictions per bin."""
    edges = report.edges
    lefts, width = edges[:-1], edges[1] - edges[0]
    fig = new_figure(figsize=(4.6, 5.2), dpi=120)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [i for i, c in enumerate(report.counts) if c > 0]
    ax.bar([lefts[i] for i in filled], [report.accuracy[i] for i in filled], width=width, align="edge",
           color="tab:blue", edgecolor="white", label="accuracy")
    ax.bar([lefts[i] for i in filled], [report.confidence[i] - report.accuracy[i] for i in filled],
           bottom=[report.accuracy[i] for i in filled], width=width, align="edge", fill=False,
           edgecolor="tab:red", hatch="//", lw=0.6, label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(frameon=False, loc="upper left", title=f"ECE {100 * report.ece:.2f}%")
    ax.set_title(title, fontsize=10)
    hist.bar(lefts, [c / max(report.n, 1) for c in report.counts], width=width, align="edge", color="gray")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("share")
    return save_figure(fig, path)


def plot_cka(matrix: Sequence[Sequence[float]], path: str | Path, row_label: str = "student block",
             col_label: str = "teacher block", title: str = "") -> Path:
    """Write a heatmap of a CKA matrix (rows: ``row_label``, columns: ``col_label``), each cell annotated."""
    rows, cols = len(matrix), len(matrix[0])
    fig = new_figure(figsize=(1.0 + 0.55 * cols, 0.9 + 0.5 * rows), dpi=120)
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if matrix[i][j] > 0.6 else "white")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
