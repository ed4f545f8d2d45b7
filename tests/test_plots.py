"""What each figure shows, not only that a file was written: axes, series, labels and titles, read from the
matplotlib Figure the plot function saved (captured by wrapping ``save_figure``)."""
from __future__ import annotations

import pytest
import torch

from leanvit.analysis import calibration
from leanvit.vis import analysis as vis_analysis, pareto as vis_pareto, tokens as vis_tokens
from leanvit.vis import plot_cka, plot_pareto, plot_reliability, plot_token_maps


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, in order."""
    saved = []
    for module in (vis_analysis, vis_pareto, vis_tokens):
        original = module.save_figure

        def capture(fig, path, _original=original):
            saved.append(fig)
            return _original(fig, path)

        monkeypatch.setattr(module, "save_figure", capture)
    return saved


def test_pareto_one_series_per_method_and_dense_reference(figures, tmp_path):
    rows = [dict(method="dense", gmacs=1.0, top1=80.0),
            dict(method="gtp", gmacs=0.9, top1=79.0), dict(method="gtp", gmacs=0.7, top1=77.0),
            dict(method="tome", gmacs=0.7, top1=78.0, top1_std=0.2),
            dict(method="gtp-cls", gmacs=0.7, top1=76.0)]
    plot_pareto(rows, tmp_path / "p.png", title="hand")
    (ax,) = figures[-1].axes
    assert ax.get_xlabel() == "GMACs per image" and ax.get_ylabel() == "top-1 accuracy (%)"
    assert ax.get_title() == "hand"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense", "GTP", "ToMe", "gtp-cls"]  # display names from the registry; variants by label
    gtp = next(c for c in ax.containers if c.get_label() == "GTP")  # an errorbar container per method
    assert list(gtp.lines[0].get_xdata()) == [0.7, 0.9] and list(gtp.lines[0].get_ydata()) == [77.0, 79.0]
    tome = next(c for c in ax.containers if c.get_label() == "ToMe")
    assert tome.has_yerr and not gtp.has_yerr  # the seed spread is drawn only where there is one
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [80.0, 80.0]  # the dense reference line


def test_reliability_bars_follow_the_bins(figures, tmp_path):
    logits = torch.tensor([[2.0, 0.0], [1.5, 0.0], [0.0, 1.0], [0.3, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    report = calibration(logits, labels, n_bins=5)
    plot_reliability(report, tmp_path / "r.png", title="model")
    ax, hist = figures[-1].axes
    filled = sum(c > 0 for c in report.counts)
    accuracy, gap = ax.containers  # two bar series: accuracy and the gap to confidence
    assert len(accuracy) == len(gap) == filled
    assert [b.get_height() for b in accuracy] == pytest.approx([a for a, c in zip(report.accuracy, report.counts)
                                                                if c > 0])
    assert len(hist.patches) == len(report.counts)
    assert sum(b.get_height() for b in hist.patches) == pytest.approx(1.0)
    assert ax.get_title() == "model" and f"{100 * report.ece:.2f}%" in ax.get_legend().get_title().get_text()
    assert hist.get_xlabel().startswith("confidence")


def test_cka_heatmap_cells_and_axis_labels(figures, tmp_path):
    matrix = [[0.1, 0.5, 0.9], [0.2, 0.6, 0.95]]
    plot_cka(matrix, tmp_path / "c.png", title="cka")
    ax = figures[-1].axes[0]
    assert ax.get_xlabel() == "teacher block" and ax.get_ylabel() == "student block"
    assert [t.get_text() for t in ax.texts] == ["0.10", "0.50", "0.90", "0.20", "0.60", "0.95"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]  # blocks counted from 1
    assert ax.images[0].get_array().shape == (2, 3)


def test_token_maps_one_panel_per_method_and_block(figures, tmp_path):
    import leanvit
    from conftest import image, make, run

    model = leanvit.patch(make("deit", img_size=96, depth=3), "tome", r=[4, 0, 3], trace=True)
    run(model, image(96, batch=1))
    traces = {"tome": leanvit.get_reducer(model).trace_log}
    plot_token_maps(image(96, batch=1)[0], traces, (6, 6), tmp_path / "t.png")
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) >= 1 + len(traces["tome"])  # the input image, then one map per reducing block
    row_label = " ".join(ax.get_ylabel() for ax in fig.axes)
    assert "ToMe" in row_label or "tome" in row_label  # the row is labelled with the method
