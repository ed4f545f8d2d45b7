"""Plots: accuracy-vs-MACs Pareto fronts, per-block token maps, reliability diagrams, CKA heatmaps."""
from .analysis import plot_cka, plot_reliability
from .pareto import plot_pareto
from .tokens import plot_token_maps

__all__ = ["plot_cka", "plot_pareto", "plot_reliability", "plot_token_maps"]
