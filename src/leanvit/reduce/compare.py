"""Side-by-side comparison of token-reduction methods at equal MACs budgets (the ``leanvit compare`` job).

Every method at a budget runs the same per-block schedule (solved once from the dense model's MACs), is evaluated
on the same images, has its MACs counted the same way and its throughput measured in the same interleaved run.
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from . import METHODS, get_reducer, patch

# options whose results vary with the RNG (selection by random score): evaluated over several seeds
_RANDOM_OPTIONS = {("score", "random")}


@dataclass
class CompareRow:
    method: str
    budget: float
    schedule: list[int]
    gmacs: float
    top1: float
    top1_std: float = 0.0
    seeds: int = 1
    images_per_s: float = float("nan")
    speedup: float = float("nan")
    macs_ratio: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(d.pop("extra"))
        return d


def _is_random(options: dict[str, Any]) -> bool:
    return any((k, v) in _RANDOM_OPTIONS for k, v in options.items())


def resolve_method(name: str, method_options: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict]:
    """``(method, options)`` of a row name: a method, or a label whose options name its method, e.g.
    ``{"gtp-cls": {"method": "gtp", "score": "cls"}}`` (several variants of one method side by side)."""
    opts = dict((method_options or {}).get(name, {}))
    method = opts.pop("method", name)
    if method not in METHODS:
        hint = f" (label '{name}' names method '{method}')" if method != name else ""
        raise ConfigError(f"unknown method '{method}'{hint}; choose from dense, {', '.join(METHODS)}, or a label "
                          f"with a 'method' option (e.g. -O gtp-cls.method=gtp -O gtp-cls.score=cls)")
    return method, opts


def build_variants(model: nn.Module, methods: Sequence[str], budgets: Sequence[float],
                   method_options: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, float, nn.Module]]:
    """Deep copies of ``model``, one per (method, budget), patched; ``dense`` appears once at budget 1.0.

    A name in ``methods`` may be a label whose options carry ``method`` (see :func:`resolve_method`)."""
    resolved = {m: resolve_method(m, method_options) for m in methods if m != "dense"}
    out = []
    if "dense" in methods:
        out.append(("dense", 1.0, model))
    for m, (method, opts) in resolved.items():
        for b in budgets:
            variant = copy.deepcopy(model)
            patch(variant, method, budget=b, **opts)
            out.append((m, b, variant))
    return out


def run_comparison(model: nn.Module, loader: DataLoader | None, methods: Sequence[str], budgets: Sequence[float],
                   method_options: dict[str, dict[str, Any]] | None = None, seeds: int = 3,
                   bench_batch: int = 32, bench_runs: int = 5, device: str | torch.device = "cpu",
                   progress: bool = True) -> list[CompareRow]:
    """Evaluate and time every (method, budget) on ``loader``; returns one row each (dense first).

    Args:
        loader: evaluation data; None skips accuracy (speed and MACs only).
        seeds: repetitions for methods whose selection is random (mean and std of top-1 are reported).
        bench_batch, bench_runs: throughput batch size and timed runs per round (3 interleaved rounds).
    """
    from ..analysis import compare_throughput, count_macs
    from ..engine import evaluate

    device = torch.device(device)
    method_options = method_options or {}
    model = model.to(device).eval()
    variants = build_variants(model, methods, budgets, method_options)
    dense_macs = count_macs(model, device=device).macs
    rows: list[CompareRow] = []
    for method, budget, variant in variants:
        red = get_reducer(variant)
        opts = red.options() if red is not None else {}
        macs = red.report.get("macs", dense_macs) if red is not None else dense_macs
        row = CompareRow(method=method, budget=budget, schedule=list(red.schedule) if red else [],
                         gmacs=macs / 1e9, top1=float("nan"), macs_ratio=macs / dense_macs, options=opts)
        if loader is not None:
            n_seeds = seeds if _is_random(opts) else 1
            accs = []
            if red is not None and hasattr(red, "stats"):
                red.stats = True
                red.report.update(lost_tokens=0, removed_tokens=0)
            for s in range(n_seeds):
                torch.manual_seed(s)
                res = evaluate(variant, loader, device, progress=progress, desc=f"{method}@{budget}")
                accs.append(res.top1)
            row.top1 = statistics.fmean(accs)
            row.top1_std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row.seeds = n_seeds
        if red is not None and getattr(red, "stats", False):
            row.extra["lost_token_fraction"] = float(red.report["lost_tokens"]) / max(red.report["removed_tokens"], 1)
        if red is not None and hasattr(red, "stats"):
            red.stats = False  # timed without the bookkeeping
        rows.append(row)
    if bench_runs > 0:
        named = {f"{m}@{b}": v for m, b, v in variants}
        speed = compare_throughput(named, batch_size=bench_batch, runs=bench_runs, device=device)
        base = speed.get("dense@1.0")
        for row, key in zip(rows, named):
            row.images_per_s = speed[key]
            if base:
                row.speedup = speed[key] / base
    return rows


def format_table(rows: Sequence[CompareRow]) -> str:
    """A plain-text table of the comparison (the CLI prints it; README and BENCHMARKS.md quote it)."""
    w = max([9, *(len(r.method) for r in rows)])
    head = (f"{'method':<{w}} {'budget':>6} {'GMACs':>8} {'MACs %':>7} {'top-1 %':>13} {'img/s':>8} {'speed-up':>8}"
            "  schedule")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{r.top1:.2f}" + (f" ± {r.top1_std:.2f}" if r.seeds > 1 else "")
        ips = "-" if math.isnan(r.images_per_s) else f"{r.images_per_s:.1f}"
        gain = "-" if math.isnan(r.speedup) else f"{r.speedup:.2f}x"
        lines.append(f"{r.method:<{w}} {r.budget:>6.2f} {r.gmacs:>8.4f} {100 * r.macs_ratio:>6.1f}% {acc:>13} "
                     f"{ips:>8} {gain:>8}  {r.schedule}")
    return "\n".join(lines)
