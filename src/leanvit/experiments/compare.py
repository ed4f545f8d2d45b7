"""Side-by-side comparison of token-reduction methods at equal MACs budgets (the ``leanvit compare`` job).

Every method at a budget is held to the same measured MACs: its schedule is solved for the budget and then
tightened until the patched model's counted MACs, including the method's own work (GTP's graph, ToMe's matching),
fit it. Schedules therefore differ slightly between methods at one budget (the table shows each). All variants are
evaluated on the same images in one pass over the data, have their MACs counted the same way and their throughput
measured in the same interleaved run. With ``runtime="onnxruntime"`` every variant is exported to ONNX (checked
against its PyTorch model) and evaluated and timed through ONNX Runtime's CPU provider, optionally in int8: the
same table where the model is deployed; its MACs stay the PyTorch model's (the same graph).
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

from ..errors import ConfigError, UnsupportedModelError
from ..progress import track
from ..reduce import get_reducer, patch, unpatch
from ..reduce.registry import own_schedule, resolve_method

# options whose results vary with the RNG (selection by random score): evaluated over several seeds
_RANDOM_OPTIONS = {("score", "random")}


@dataclass
class CompareRow:
    method: str
    budget: float
    schedule: list[int]  # what it counts: ``schedule_counts`` (tokens removed after, or idle in, each block)
    gmacs: float
    top1: float
    top1_std: float = 0.0
    seeds: int = 1
    images_per_s: float = float("nan")
    speedup: float = float("nan")
    macs_ratio: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schedule_counts: str = "removed"
    error: str | None = None  # why this cell did not run (its figures are NaN, null in JSON); None when it ran

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(d.pop("extra"))
        return d


def _is_random(options: dict[str, Any]) -> bool:
    return any((k, v) in _RANDOM_OPTIONS for k, v in options.items())


def _pass_generator(seed: int, device: torch.device, loader: DataLoader) -> torch.Generator:
    """The generator of one evaluation pass of a random selection with ``seed``, drawing the numbers that the pass
    drew when it seeded the global RNG (``torch.manual_seed(seed)``), so that the published figures still hold.

    Creating a data loader's iterator draws a seed for its workers from the CPU generator, before the first score:
    on CPU, where the scores are drawn from the same generator, that draw is made here too. (On CUDA the scores come
    from the CUDA generator, which the loader does not touch; a loader that shuffles without a generator of its own
    drew more, and its passes have other, equally seeded, figures.)
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cpu" and isinstance(loader, DataLoader) and loader.generator is None:
        torch.empty((), dtype=torch.int64).random_(generator=gen)
    return gen


@dataclass
class _Cell:
    """One (method, budget) of a comparison: its patched copy, or why it cannot run on this model."""

    label: str
    budget: float | None
    model: nn.Module | None
    error: str | None = None


def _build_cells(model: nn.Module, methods: Sequence[str], budgets: Sequence[float],
                 method_options: dict[str, dict[str, Any]] | None, progress: bool, keep_going: bool) -> list[_Cell]:
    resolved = {m: resolve_method(m, method_options) for m in methods if m != "dense"}
    jobs = [(m, b) for m, (_, opts) in resolved.items() for b in ([None] if own_schedule(opts) else budgets)]
    out = []
    shipped = get_reducer(model)
    if shipped is not None:
        # a model that comes patched (a fine-tuned zoo model): its own patch is a row, "dense" is its weights
        # without any patch, and every other method replaces the patch on a copy
        dense = unpatch(copy.deepcopy(model))
        if "dense" in methods:
            out.append(_Cell("dense", 1.0, dense))
        out.append(_Cell(f"{shipped.name}-shipped", None, model))
    elif "dense" in methods:
        out.append(_Cell("dense", 1.0, model))
    for m, b in track(jobs, desc="solving schedules", enabled=progress):
        method, opts = resolved[m]
        variant = copy.deepcopy(model)
        try:
            patch(variant, method, **({} if b is None else {"budget": b}), **opts)
        except (ConfigError, UnsupportedModelError) as e:
            why = str(e)
            if not keep_going:
                raise type(e)(f"{m}: {why}") from None
            out.append(_Cell(m, b, None, why))
            continue
        out.append(_Cell(m, b, variant))
    return out


def build_variants(model: nn.Module, methods: Sequence[str], budgets: Sequence[float],
                   method_options: dict[str, dict[str, Any]] | None = None,
                   progress: bool = False) -> list[tuple[str, float | None, nn.Module]]:
    """Deep copies of ``model``, one per (method, budget), patched; ``dense`` appears once at budget 1.0. A model
    that comes patched (e.g. ``leanvit_vit_fm_teacher_idle70``) adds its own patch as a row ``METHOD-shipped``;
    ``dense`` is then its weights unpatched.

    A name in ``methods`` may be a label whose options carry ``method`` (see :func:`resolve_method`); a label with
    its own schedule (``keep`` or ``r``) gives one variant with budget None.

    Raises:
        ConfigError, UnsupportedModelError: a (method, budget) that cannot be built, named with the budget as given
            (:func:`run_comparison` reports such a cell as a row with ``error`` instead and runs the rest).
    """
    cells = _build_cells(model, methods, budgets, method_options, progress, keep_going=False)
    return [(c.label, c.budget, c.model) for c in cells]


def run_comparison(model: nn.Module, loader: DataLoader | None, methods: Sequence[str], budgets: Sequence[float],
                   method_options: dict[str, dict[str, Any]] | None = None, seeds: int = 3,
                   bench_batch: int = 32, bench_runs: int = 3, device: str | torch.device = "cpu",
                   progress: bool = True, compile: bool = False, amp: str | None = None, runtime: str = "pytorch",
                   quantize: str | None = None) -> list[CompareRow]:
    """Evaluate and time every (method, budget) on ``loader``; returns one row each (dense first).

    A cell that cannot run on this model (a budget the method cannot reach, a method that refuses the model) is a
    row with ``error`` (why, naming the budget as given) and NaN figures; the other cells run as usual.

    Phases, each with its progress output: solving the schedules, one evaluation pass over the data for every
    variant whose selection is deterministic (:func:`leanvit.engine.evaluate.evaluate_many`), one pass per seed for
    each variant with random selection (seeded as if evaluated alone), then the interleaved timing.

    The caller's global RNG is left as it was: a random selection is seeded through the reducer's own generator
    (:meth:`~leanvit.reduce.gtp.GTPReducer.seed`; seed ``s`` gives the figures of ``torch.manual_seed(s)``), and
    what else draws from the global RNG here (the random inputs of MACs counting and timing) runs on a saved and
    restored state, so that comparing in a notebook or a script does not change the random numbers that follow.

    Args:
        loader: evaluation data; None skips accuracy (speed and MACs only).
        seeds: repetitions for methods whose selection is random (mean and std of top-1 are reported).
        bench_batch, bench_runs: throughput batch size and timed runs per round (3 interleaved rounds).
        compile: time every variant after ``torch.compile(fullgraph=True)`` (accuracy is evaluated eagerly).
        amp: time under ``torch.autocast`` in ``"fp16"`` or ``"bf16"`` (accuracy is evaluated in full precision).
        runtime: ``pytorch``, or ``onnxruntime``: every variant evaluated and timed as its checked ONNX export on
            ONNX Runtime's CPU provider (a variant that cannot be exported is a row with ``error``).
        quantize: with ``onnxruntime``, ``"int8"`` quantizes every variant's linear layers (dense included).
    """
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    if runtime != "pytorch" and (compile or amp):
        raise ConfigError(f"compile and amp are PyTorch's; the {runtime} runtime times its own graph")
    device = torch.device(device)
    cuda = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=cuda):
        return _run_comparison(model, loader, methods, budgets, method_options, seeds, bench_batch, bench_runs,
                               device, progress, compile, amp, runtime, quantize)


def _run_comparison(model: nn.Module, loader: DataLoader | None, methods: Sequence[str], budgets: Sequence[float],
                    method_options: dict[str, dict[str, Any]] | None, seeds: int, bench_batch: int, bench_runs: int,
                    device: torch.device, progress: bool, compile: bool, amp: str | None, runtime: str = "pytorch",
                    quantize: str | None = None) -> list[CompareRow]:
    from ..analysis import compare_throughput, count_macs
    from ..engine import evaluate
    from ..engine.evaluate import evaluate_many

    method_options = method_options or {}
    model = model.to(device).eval()
    cells = _build_cells(model, methods, budgets, method_options, progress, keep_going=True)
    dense_macs = count_macs(unpatch(copy.deepcopy(model)) if get_reducer(model) else model, device=device).macs
    rows: list[CompareRow] = []
    for cell in cells:
        if cell.model is None:  # a cell the method cannot run: a row that says why, no figures
            nan = float("nan")
            rows.append(CompareRow(method=cell.label, budget=nan if cell.budget is None else cell.budget,
                                   schedule=[], gmacs=nan, top1=nan, seeds=0, macs_ratio=nan, error=cell.error))
            continue
        red = get_reducer(cell.model)
        opts = red.options() if red is not None else {}
        macs = dense_macs if red is None else red.report.get("macs") or count_macs(cell.model, device=device).macs
        rows.append(CompareRow(method=cell.label, budget=macs / dense_macs if cell.budget is None else cell.budget,
                               schedule=list(red.schedule) if red else [], gmacs=macs / 1e9, top1=float("nan"),
                               macs_ratio=macs / dense_macs, options=opts,
                               schedule_counts=red.schedule_counts if red else "removed"))
    # the cells that run, by their row's index
    variants = {i: (cell.label, cell.budget, cell.model) for i, cell in enumerate(cells) if cell.model is not None}
    if runtime != "pytorch":
        variants = _in_runtime(variants, rows, runtime, quantize, progress)
    if loader is not None and variants:
        reducers = {i: get_reducer(v) if runtime == "pytorch" else None for i, (_, _, v) in variants.items()}
        for red in reducers.values():
            if red is not None:
                red.set_stats(True)
        fixed = {i: v for i, (_, _, v) in variants.items() if not _is_random(rows[i].options)}
        results = evaluate_many({str(i): v for i, v in fixed.items()}, loader, device, progress=progress,
                                desc=f"evaluating {len(fixed)} variants") if fixed else {}
        for i, (method, budget, variant) in variants.items():
            row = rows[i]
            if i in fixed:
                accs = [results[str(i)].top1]
            else:
                accs = []
                red = reducers[i]
                seeded = callable(getattr(red, "seed", None))
                try:
                    for s in range(seeds):
                        if seeded:
                            red.seed(_pass_generator(s, device, loader))
                        else:  # a method without its own generator: the global RNG, restored by the caller
                            torch.manual_seed(s)
                        accs.append(evaluate(variant, loader, device, progress=progress,
                                             desc=f"evaluating {method}@{row.budget:.2f} seed {s}").top1)
                finally:
                    if seeded:
                        red.seed(None)  # a shipped model is the caller's own: give it back as it came
            row.top1 = statistics.fmean(accs)
            row.top1_std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row.seeds = len(accs)
            if reducers[i] is not None:
                summary = reducers[i].stats_summary()
                if "lost_token_fraction" in summary:
                    row.extra["lost_token_fraction"] = summary["lost_token_fraction"]
        for red in reducers.values():
            if red is not None:
                red.set_stats(False)  # timed without the bookkeeping
    if bench_runs > 0 and variants:
        named = {i: (f"{m}@{b}", torch.compile(v, fullgraph=True) if compile else v)
                 for i, (m, b, v) in variants.items()}
        speed = compare_throughput(dict(named.values()), batch_size=bench_batch, runs=bench_runs, device=device,
                                   progress=progress, amp=amp)
        base = speed.get("dense@1.0")
        for i, (key, _) in named.items():
            rows[i].images_per_s = speed[key]
            if base:
                rows[i].speedup = speed[key] / base
    return rows


def _in_runtime(variants: dict[int, tuple[str, float | None, nn.Module]], rows: list[CompareRow], runtime: str,
                quantize: str | None, progress: bool) -> dict[int, tuple[str, float | None, nn.Module]]:
    """The variants as ``runtime`` runs them (ONNX Runtime: each exported and checked); a variant that cannot be
    exported becomes a row with ``error`` and no figures, the others run."""
    from ..export import as_runtime

    out = {}
    for i, (label, budget, model) in track(list(variants.items()), desc=f"preparing {runtime}", enabled=progress):
        try:
            out[i] = (label, budget, as_runtime(model, runtime, quantize))
        except (ConfigError, UnsupportedModelError) as e:
            row = rows[i]
            row.error, row.gmacs, row.top1, row.macs_ratio, row.seeds = str(e), math.nan, math.nan, math.nan, 0
    return out


def format_table(rows: Sequence[CompareRow]) -> str:
    """A plain-text table of the comparison (the CLI prints it; README and BENCHMARKS.md quote it). The schedule
    column gives the image tokens removed per block; an idling method's (tokens idle per block) is marked ``idle``.
    A cell that did not run (``error``) has ``-`` for its figures and ``not run: WHY`` in the schedule column."""
    w = max([9, *(len(r.method) for r in rows)])
    head = (f"{'method':<{w}} {'budget':>6} {'GMACs':>8} {'MACs %':>7} {'top-1 %':>13} {'img/s':>8} {'speed-up':>8}"
            "  schedule")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error is not None:  # a cell that did not run: no figures, and why
            budget = "-" if math.isnan(r.budget) else f"{r.budget:.2f}"
            lines.append(f"{r.method:<{w}} {budget:>6} {'-':>8} {'-':>7} {'-':>13} {'-':>8} {'-':>8}  "
                         f"not run: {r.error}")
            continue
        acc = f"{r.top1:.2f}" + (f" ± {r.top1_std:.2f}" if r.seeds > 1 else "")
        ips = "-" if math.isnan(r.images_per_s) else f"{r.images_per_s:.1f}"
        gain = "-" if math.isnan(r.speedup) else f"{r.speedup:.2f}x"
        lines.append(f"{r.method:<{w}} {r.budget:>6.2f} {r.gmacs:>8.4f} {100 * r.macs_ratio:>6.1f}% {acc:>13} "
                     f"{ips:>8} {gain:>8}  {'' if r.schedule_counts == 'removed' else r.schedule_counts + ' '}"
                     f"{r.schedule}")
    return "\n".join(lines)
