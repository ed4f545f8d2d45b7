"""Per-block token maps: what happened to every patch in every reducing block (kept, merged, propagated with the
neighbours that received it, removed, idle, re-activated), for one image, as one PNG grid. Drawn from the trace
records alone (:data:`leanvit.reduce.TOKEN_STATES`), whatever the method or label."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._figure import new_figure, save_figure


def _grid_image(image: torch.Tensor) -> np.ndarray:
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min() + 1e-12)
    img = img.permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[2] == 1 else img


def token_map(source: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Group id per original patch ``(h, w)`` from a ``(N_cur, N_orig)`` bool provenance matrix; -1 = removed."""
    h, w = grid
    groups = np.full(h * w, -1, dtype=np.int64)
    src = source.cpu().numpy()
    for g, row in enumerate(src):
        groups[row] = g
    return groups.reshape(h, w)


def _legend_handles(tints: dict[int, tuple[float, float, float]], merged: tuple[float, ...]) -> list:
    """One entry per colour or mark the maps use (the same in every figure, so that figures compare)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from ..reduce.types import IDLE, REACTIVATED, REMOVED

    return [
        Patch(facecolor=tints[REMOVED], label="removed"),
        Patch(facecolor=merged, label="merged (a colour per token)"),
        Patch(facecolor=tints[IDLE], label="idle"),
        Patch(facecolor=tints[REACTIVATED], label="re-activated"),
        Line2D([], [], color="red", marker="o", ms=4, ls="", label="propagated here"),
        Line2D([], [], color="yellow", lw=1.5, label="graph edge"),
        Line2D([], [], color="cyan", lw=1.5, label="fallback edge"),
        Line2D([], [], color="black", marker="x", ms=5, mew=1.2, ls="", label="lost"),
    ]


def plot_token_maps(image: torch.Tensor, traces: dict[str, list[dict]], grid: tuple[int, int],
                    path: str | Path, title: str = "", max_arrows: int = 64) -> Path:
    """One row per method, one column per reducing block; blocks are numbered from 1, as in ``leanvit analyze``
    and the README, and a legend under the maps names every colour and mark.

    Args:
        image: the input ``(C, H, W)`` (normalised is fine; it is rescaled for display).
        traces: row label (a method or a labelled variant) -> the reducer's ``trace_log`` (batch element 0 is drawn).
        grid: the token grid ``(h, w)``.

    Drawn from each record's data, whatever the method or its label: kept patches show the image; patches removed
    so far (``propagated`` or ``removed``) are tinted blue; patches merged into one token (ToMe's merges, EViT's
    fused token) share a colour; ``idle`` patches (IdleViT) are greyed out and ``reactivated`` ones tinted orange.
    Records with propagation edges (GTP, any label): red dots mark the patches propagated in that block and lines
    join each to the kept tokens that received its features, yellow along graph edges, cyan along the fallback
    edges of ``orphans="nearest"`` / ``"merge"``; every dot keeps its strongest line, then the strongest others
    are drawn up to ``max_arrows``; a black cross marks a removed token whose features reached no kept token.
    """
    from matplotlib import colormaps

    from ..reduce import METHODS
    from ..reduce.types import IDLE, MERGED, PROPAGATED, REACTIVATED, REMOVED

    base = _grid_image(image)
    H, W = base.shape[:2]
    h, w = grid
    ph, pw = H / h, W / w
    cols = max((len(t) for t in traces.values()), default=0) + 1
    rows = max(len(traces), 1)
    cmap = colormaps["tab20"]
    tints = {PROPAGATED: (0.15, 0.3, 0.75), REMOVED: (0.15, 0.3, 0.75), IDLE: (0.5, 0.5, 0.5),
             REACTIVATED: (1.0, 0.55, 0.0)}
    handles = _legend_handles(tints, cmap(4)[:3])  # a merge colour unlike the tints
    per_row = min(len(handles), max(1, int(2.1 * cols / 1.3)))  # about 1.3 inches per legend entry at font size 7
    legend_rows = -(-len(handles) // per_row)
    fig = new_figure(figsize=(2.1 * cols, 2.2 * rows + 0.3 * legend_rows + 0.1), dpi=110)
    # the maps, and under them a strip of the figure's width for the legend: an axes of its own, so that the
    # tight layout applied when saving makes room for it
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[2.2] * rows + [0.3 * legend_rows])
    axes = np.array([[fig.add_subplot(gs[r, c]) for c in range(cols)] for r in range(rows)])
    legend_ax = fig.add_subplot(gs[rows, :])
    for ri, (label, log) in enumerate(traces.items()):
        ax = axes[ri][0]
        ax.imshow(base, cmap="gray" if base.ndim == 2 else None)
        ax.set_title("input", fontsize=8)
        ax.set_ylabel(METHODS[label].display if label in METHODS else label, fontsize=10)
        for ci, entry in enumerate(log, start=1):
            ax = axes[ri][ci]
            groups = token_map(entry["source"][0], grid)
            state = entry["state"][0].reshape(h, w).cpu().numpy()
            shown = np.dstack([base] * 3) if base.ndim == 2 else base.copy()
            shown = shown.copy()
            cell = np.ones((int(round(ph)), int(round(pw))))
            for code, colour in tints.items():
                mask = np.kron(state == code, cell)[:H, :W].astype(bool)
                shown[mask] = 0.35 * shown[mask] + 0.65 * np.array(colour)
            ax.imshow(shown)
            if (state == MERGED).any():
                overlay = np.zeros((h, w, 4))
                for (yy, xx), g in np.ndenumerate(groups):
                    if state[yy, xx] == MERGED:
                        overlay[yy, xx] = (*cmap(g % 20)[:3], 0.55)
                ax.imshow(overlay, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
            if "weights" in entry:
                wts = entry["weights"][0]  # (K, r)
                kept_src = entry["source"][0]  # (K, N_orig)
                rm_src = entry["removed_source"][0]  # (r, N_orig)
                fallback = entry["fallback"][0] if "fallback" in entry else torch.zeros(wts.shape[1], dtype=torch.bool)
                edges = sorted(((float(wts[k, j]), j, k) for j, k in torch.nonzero(wts.T > 0).tolist()), reverse=True)
                strongest = {}  # removed token -> its strongest edge, drawn first so that no propagated dot is bare
                for e in edges:
                    strongest.setdefault(e[1], e)
                edges = [*strongest.values(), *(e for e in edges if strongest[e[1]] is not e)]
                def centre(row):
                    idx = torch.nonzero(row).flatten()
                    ys, xs = (idx // w).float().mean().item(), (idx % w).float().mean().item()
                    return (xs + 0.5) * pw - 0.5, (ys + 0.5) * ph - 0.5
                for _, j, k in edges[:max(max_arrows, len(strongest))]:
                    (x0, y0), (x1, y1) = centre(rm_src[j]), centre(kept_src[k])
                    ax.plot([x0, x1], [y0, y1], color="cyan" if fallback[j] else "yellow", lw=0.6, alpha=0.8)
                for j in range(rm_src.shape[0]):
                    x0, y0 = centre(rm_src[j])
                    if j in strongest:
                        ax.plot(x0, y0, "o", color="red", ms=2.5)
                    else:
                        ax.plot(x0, y0, "x", color="black", ms=3.5, mew=1.0)
            # trace records number blocks from 0 (Python's index); people count them from 1
            ax.set_title(f"block {int(entry['block']) + 1}: {int(entry['tokens'])} tok", fontsize=8)
        for ci in range(len(log) + 1, cols):
            axes[ri][ci].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, loc="center", ncol=per_row, fontsize=7, frameon=False, handlelength=1.5,
                     columnspacing=1.0)
    return save_figure(fig, path)
