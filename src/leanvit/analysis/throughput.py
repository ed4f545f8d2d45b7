"""Wall-clock speed of a model's forward pass: throughput (images/s), latency, and interleaved comparisons.

Timings are medians over several runs after discarded warm-up runs, in inference mode and eval mode. On CUDA the
device is synchronised before starting and before stopping each timer. On a shared, noisy machine, models that are
compared must be timed in the same process and interleaved (:func:`compare_throughput`), not one after the other.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .macs import _check_input_size, default_input_size, run_checked

__all__ = ["ThroughputReport", "break_even_batch", "compare_throughput", "measure_latency", "measure_throughput",
           "runtime_of", "sweep_throughput"]


@dataclass
class ThroughputReport:
    """Result of :func:`measure_throughput`.

    Attributes:
        images_per_s: ``batch_size`` divided by the median run time.
        latency_ms: median time of one batch, in milliseconds.
        times_s: every timed run, in seconds (warm-up runs excluded), in the order they ran.
        batch_size: images per forward pass.
        device: where the model ran (``"cpu"``, ``"cuda:0"``).
        threads: the model's threads during the runs (``torch.get_num_threads()``, or an ONNX Runtime session's).
        runtime: what ran the forward (:func:`runtime_of`): ``pytorch``, ``compiled`` or ``onnxruntime``.
    """

    images_per_s: float
    latency_ms: float
    times_s: list[float] = field(default_factory=list)
    batch_size: int = 1
    device: str = "cpu"
    threads: int = 1
    runtime: str = "pytorch"

    def as_dict(self) -> dict:
        return {"images_per_s": self.images_per_s, "latency_ms": self.latency_ms, "times_s": list(self.times_s),
                "batch_size": self.batch_size, "device": self.device, "threads": self.threads,
                "runtime": self.runtime}


def runtime_of(model: nn.Module) -> str:
    """What runs ``model``'s forward: ``compiled`` for a ``torch.compile`` module, a model's own ``runtime``
    attribute (an ONNX Runtime session wrapper, :class:`leanvit.export.OrtModel`, says ``onnxruntime``), else
    ``pytorch`` (eager). The timer is the same for all: a module called on a batch."""
    if getattr(model, "_orig_mod", None) is not None:  # torch.compile's OptimizedModule
        return "compiled"
    return str(getattr(model, "runtime", "pytorch"))


def _check_counts(batch_size: int, warmup: int, runs: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if warmup < 0:
        raise ConfigError(f"warm-up runs cannot be negative, got {warmup}")
    if runs < 1:
        raise ConfigError(f"timed runs must be at least 1, got {runs}")


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (``"fp16"``, ``"bf16"`` or None for full precision)."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"unknown amp '{amp}'; choose one of {', '.join(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def _median(times: list[float]) -> float:
    # the lower median is one of the measured times (an even count does not average two runs)
    return statistics.median_low(times)


class _Timer:
    """Times forward passes of one model on a fixed random batch (eval + inference mode for each call)."""

    def __init__(self, model: nn.Module, input_size, batch_size: int, device: torch.device, amp: str | None = None):
        size = _check_input_size(default_input_size(model) if input_size is None else input_size)
        self.model = model.to(device)
        self.device = device
        self.amp = amp_dtype(amp)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.x = torch.randn(batch_size, *size, device=device, dtype=dtype)
        self.times: list[float] = []
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None))

    def run(self, n: int, record: bool = True) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                                        enabled=self.amp is not None):
                for _ in range(n):
                    self._sync()
                    t0 = time.perf_counter()
                    run_checked(self.model, self.x)
                    self._sync()
                    if record:
                        self.times.append(time.perf_counter() - t0)
        finally:
            self.model.train(was_training)

    def report(self) -> ThroughputReport:
        med = _median(self.times)
        batch = self.x.shape[0]
        return ThroughputReport(images_per_s=batch / med if med > 0 else float("inf"), latency_ms=med * 1e3,
                                times_s=list(self.times), batch_size=batch, device=str(self.device),
                                threads=int(getattr(self.model, "threads", torch.get_num_threads())),
                                runtime=runtime_of(self.model))


def measure_throughput(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 32,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    amp: str | None = None,
) -> ThroughputReport:
    """Images per second of ``model``'s forward pass on random batches of ``batch_size`` images.

    The model is moved to ``device`` and run in eval mode under ``torch.inference_mode`` (its training flag is
    restored afterwards). ``warmup`` runs are discarded, then ``runs`` runs are timed one by one; the report uses
    their (lower) median, which is robust to the odd slow run on a shared machine.

    Args:
        model: any ``nn.Module`` taking a ``(B, C, H, W)`` batch.
        input_size: ``(C, H, W)``; default: the model's (:func:`leanvit.analysis.default_input_size`).
        batch_size: images per forward pass.
        warmup: untimed runs first (allocator, kernel selection, caches).
        runs: timed runs.
        device: where to run.
        amp: ``"fp16"`` or ``"bf16"``: run under ``torch.autocast`` in that dtype (None: full precision).

    Raises:
        ConfigError: bad counts, or the model cannot run on ``input_size``.
    """
    _check_counts(batch_size, warmup, runs)
    timer = _Timer(model, input_size, batch_size, torch.device(device), amp)
    timer.run(warmup, record=False)
    timer.run(runs)
    return timer.report()


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    amp: str | None = None,
) -> float:
    """Median latency of one forward pass in milliseconds (batch 1 by default); see :func:`measure_throughput`."""
    return measure_throughput(model, input_size, batch_size, warmup, runs, device, amp).latency_ms


def compare_throughput(
    models: dict[str, nn.Module],
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 32,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    rounds: int = 3,
    reports: bool = False,
    progress: bool = False,
    amp: str | None = None,
) -> dict[str, float] | dict[str, ThroughputReport]:
    """Median images/s of several models, timed interleaved so that machine noise hits them all alike.

    Every model first gets ``warmup`` untimed runs. Then, ``rounds`` times, each model runs ``runs`` timed passes in
    round-robin order; the starting model rotates from round to round so that none always follows the same one.
    Each model's result is ``batch_size`` over the (lower) median of its ``rounds * runs`` timings.

    Args:
        models: name -> model (e.g. ``{"dense": m0, "gtp r=8": m1}``); names are kept in the result.
        input_size: ``(C, H, W)`` for all models; default: each model's own.
        batch_size, warmup, runs, device: as in :func:`measure_throughput` (``runs`` is per model and round).
        rounds: how many times to go round the models.
        reports: return each model's :class:`ThroughputReport` (with every timed run, e.g. to also compare best
            runs, which on a shared machine are the least disturbed) instead of its images/s.
        progress: report progress (one step per model and round, warm-up included).
        amp: ``"fp16"`` or ``"bf16"`` autocast for every model (None: full precision).

    Returns:
        name -> median images per second (or name -> report), in the order of ``models``.
    """
    _check_counts(batch_size, warmup, runs)
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    if not models:
        return {}
    device = torch.device(device)
    from ..progress import track

    timers = {name: _Timer(m, input_size, batch_size, device, amp) for name, m in models.items()}
    names = list(timers)
    bar = track(total=len(names) * (rounds + 1), desc=f"timing {len(names)} models", enabled=progress)
    for name in names:
        timers[name].run(warmup, record=False)
        bar.update()
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            timers[name].run(runs)
            bar.update()
    bar.close()
    out = {name: timers[name].report() for name in names}
    return out if reports else {name: r.images_per_s for name, r in out.items()}


def sweep_throughput(
    models: dict[str, nn.Module],
    batch_sizes: list[int] | tuple[int, ...],
    input_size: tuple[int, int, int] | None = None,
    warmup: int = 2,
    runs: int = 3,
    device: str | torch.device = "cpu",
    rounds: int = 3,
    progress: bool = False,
    amp: str | None = None,
) -> dict[int, dict[str, ThroughputReport]]:
    """:func:`compare_throughput` at each batch size in turn: batch size -> name -> report (every model timed
    interleaved with the others at that batch size, so a ratio of two models at one batch size is fair on a noisy
    machine)."""
    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    return {int(b): compare_throughput(models, input_size, batch_size=int(b), warmup=warmup, runs=runs,
                                       device=device, rounds=rounds, reports=True, progress=progress, amp=amp)
            for b in batch_sizes}


def break_even_batch(speedups: dict[int, float]) -> int | None:
    """The smallest batch size from which a model is faster than its baseline: the smallest measured ``b`` whose
    speed-up, and the speed-up at every larger measured batch size, is above 1. None when it is not faster at the
    largest batch size measured (a model that is faster at batch 1 only, then slower, has no break-even batch)."""
    found = None
    for b in sorted(speedups, reverse=True):
        if not speedups[b] > 1.0:
            break
        found = b
    return found
