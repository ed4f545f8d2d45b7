"""Where token reduction pays: every method's speed-up over the dense model at each batch size, in each runtime
(PyTorch eager, ``torch.compile``, ONNX Runtime), and the smallest batch size from which it is faster than dense.

This answers "does it help me at batch 1": at small batches a reducer's own work (scores, top-k, gathers, merges:
many small ops) is a larger share of the forward than at large ones, and each runtime pays a different price per op
(eager PyTorch its dispatch, a compiled graph or an ONNX Runtime session far less). The dense model and the methods
are timed interleaved at every batch size (:func:`leanvit.analysis.sweep_throughput`), so their ratio holds on a
noisy machine; the break-even batch is :func:`leanvit.analysis.break_even_batch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..analysis import break_even_batch, sweep_throughput
from .runtime import as_runtime, runtime_label


@dataclass
class BreakEvenRow:
    """One method in one runtime: images/s and speed-up over dense at each batch size, and its break-even batch."""

    runtime: str
    method: str
    macs_fraction: float
    images_per_s: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    break_even: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "method": self.method, "macs_fraction": self.macs_fraction,
                "images_per_s": {str(b): v for b, v in self.images_per_s.items()},
                "speedup": {str(b): v for b, v in self.speedup.items()}, "break_even": self.break_even}


def break_even_table(dense: nn.Module, variants: dict[str, nn.Module], batch_sizes: Sequence[int],
                     runtimes: Sequence[str] = ("pytorch",), macs_fraction: dict[str, float] | None = None,
                     quantize: str | None = None, warmup: int = 2, runs: int = 3, rounds: int = 3,
                     progress: bool = False, threads: int | None = None, device: str | torch.device = "cpu"
                     ) -> list[BreakEvenRow]:
    """The break-even rows of ``variants`` (label -> patched model) against ``dense`` in each runtime.

    Each runtime's models (the dense one first) are made by :func:`~leanvit.export.as_runtime` (``onnxruntime``:
    exported and checked; with ``quantize`` every model, dense included, in int8) and timed interleaved at every batch
    size. The dense model has a row too (speed-up 1 by definition; its images/s are the reference). ``compiled``
    models compile in the untimed warm-up of each batch size (a new batch size recompiles)."""
    fractions = dict(macs_fraction or {})
    rows: list[BreakEvenRow] = []
    for runtime in runtimes:
        q = quantize if runtime == "onnxruntime" else None
        label = runtime_label(runtime, q)
        models = {"dense": as_runtime(dense, runtime, q, threads)}
        models.update({k: as_runtime(v, runtime, q, threads) for k, v in variants.items()})
        sweep = sweep_throughput(models, list(batch_sizes), warmup=warmup, runs=runs, rounds=rounds,
                                 progress=progress, device="cpu" if runtime == "onnxruntime" else device)
        for name in models:
            ips = {b: sweep[b][name].images_per_s for b in sweep}
            speed = {b: ips[b] / sweep[b]["dense"].images_per_s for b in sweep}
            rows.append(BreakEvenRow(runtime=label, method=name, macs_fraction=fractions.get(name, 1.0),
                                     images_per_s=ips, speedup=speed,
                                     break_even=None if name == "dense" else break_even_batch(speed)))
    return rows


def format_break_even(rows: Sequence[BreakEvenRow]) -> str:
    """A plain-text table per runtime: speed-up over dense at each batch size, and the batch from which the method
    is faster (``never``: not faster at the largest batch measured)."""
    out: list[str] = []
    for runtime in dict.fromkeys(r.runtime for r in rows):
        mine = [r for r in rows if r.runtime == runtime]
        sizes = sorted({b for r in mine for b in r.speedup})
        w = max([8, *(len(r.method) for r in mine)])
        head = f"{'method':<{w}} {'MACs %':>7} " + " ".join(f"{'b' + str(b):>8}" for b in sizes) + "  faster from"
        out += [f"runtime {runtime}: speed-up over dense (images/s ratio) by batch size", head, "-" * len(head)]
        for r in mine:
            cells = []
            for b in sizes:
                v = r.speedup.get(b, math.nan)
                cells.append(f"{r.images_per_s[b]:.1f}/s" if r.method == "dense" else f"{v:.2f}x")
            when = "-" if r.method == "dense" else ("never" if r.break_even is None else f"batch {r.break_even}")
            out.append(f"{r.method:<{w}} {100 * r.macs_fraction:>6.1f}% " + " ".join(f"{c:>8}" for c in cells)
                       + f"  {when}")
        out.append("")
    return "\n".join(out).rstrip()
