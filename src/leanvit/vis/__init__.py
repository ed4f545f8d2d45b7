"""Plots: accuracy-vs-MACs Pareto fronts, per-block token maps, reliability diagrams."""
from .pareto import plot_pareto
from .tokens import plot_token_maps

__all__ = ["plot_pareto", "plot_token_maps"]
