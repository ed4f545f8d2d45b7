"""The host a forward runs on, and the constants whose best value depends on it.

:func:`describe` reads what the host reports about itself: the processor's name, its caches (Linux:
``/sys/devices/system/cpu/cpu<N>/cache/index*``, each cache's level, type, size and the CPUs that share it), the
CPUs this process may run on (``os.sched_getaffinity``) and torch's intra-op threads. Benchmarks print it beside
every table (:func:`leanvit.analysis.machine_summary`).

Host-aware constants (one so far):

* :func:`probs_chunk_bytes`, how many bytes of the ``(B, H, N, N)`` attention map explicit CPU attention computes
  at a time (:mod:`leanvit.reduce.attention`, and the score pass of :func:`leanvit.ops.fused_score.torch_scores`).
  A slice of the map is written, normalised, multiplied with V and scored while it is still in cache; the batched
  matmuls and the softmax split a slice's ``(image, head)`` matrices between the threads, so each thread works on
  its share of the slice. The rule: a slice is as large as the level-2 caches of the cores the threads run on
  (one L2 per thread, up to the distinct L2 caches of the CPUs this process may use), at most half the last-level
  cache and at least 256 KiB. Found by timing DeiT-S and DeiT-B shapes at batch 32 on the project's AMD EPYC host
  (2 cores, L2 1 MiB per core, L3 32 MiB; BENCHMARKS.md, "Design measurements behind code defaults"): the best
  slice was 2 MiB at 2 threads and one image (under 1 MiB) at 1 thread, which is the rule on that host. It has
  not been checked by timing on any other host; where the host reports no caches it assumes that host's 1 MiB
  per thread.

Calibration (optional): ``python -m leanvit.ops --calibrate`` times the same cache-blocked attention at DeiT
shapes for slices from 256 KiB to 32 MiB at the current thread count and stores the fastest in the user's cache
folder (``$XDG_CACHE_HOME/leanvit``, by default ``~/.cache/leanvit``), one file per host (processor, caches, CPUs
and torch version); from then on :func:`probs_chunk_bytes` uses it for that thread count. It takes a few seconds
on a quiet machine and must run on one: where other processes keep the cores busy, every parallel region waits for
a descheduled thread, so the fewest, largest slices win (on the AMD host above with both cores taken by others it
took 80 s and chose 16 MiB). That is why the library never calibrates on its own: a value measured under load would
be stored for every later run. ``LEANVIT_HOST_CALIBRATION=0`` ignores stored calibrations (the rule above applies);
``python -m leanvit.ops`` shows the host, the rule's value, the stored calibration and the value in effect;
``--clear`` deletes this host's file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .select import diag_colsum

KIB, MIB = 1 << 10, 1 << 20
# where the host reports no level-2 cache: the L2 of one core of the host the rule was found on (AMD EPYC, 1 MiB)
FALLBACK_L2 = 1 * MIB
MIN_CHUNK = 256 * KIB  # below this a slice is a fraction of one DeiT-S image's map: dispatch per slice dominates
ENV_CALIBRATION = "LEANVIT_HOST_CALIBRATION"
# the slices a calibration times (bytes of the map at a time), and the attention shapes it times them on: DeiT-S
# and DeiT-B at 224 (6 and 12 heads of 64 channels, 197 tokens), batch 32, with a key bias
CALIBRATION_CHUNKS = tuple(1 << p for p in range(18, 26))  # 256 KiB .. 32 MiB
CALIBRATION_SHAPES = ((32, 6, 197, 64), (32, 12, 197, 64))
_CPU_SYSFS = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Cache:
    """One cache as the host reports it: level (1, 2, 3), type (``Data``, ``Instruction``, ``Unified``), size in
    bytes, and the CPUs that share it."""

    level: int
    type: str
    size: int
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class Host:
    """What the host reports about itself (:func:`describe`).

    Attributes:
        processor: the CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``.
        arch: ``platform.machine()``.
        cpus: the CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where unsupported).
        caches: the data and unified caches of those CPUs, one entry per distinct cache.
        torch: torch's version.
    """

    processor: str
    arch: str
    cpus: tuple[int, ...]
    caches: tuple[Cache, ...] = field(default=())
    torch: str = torch.__version__

    def level(self, level: int) -> list[Cache]:
        """The distinct data or unified caches of one level (one entry per cache instance)."""
        return [c for c in self.caches if c.level == level and c.type != "Instruction"]

    def cache_size(self, level: int) -> int | None:
        """The size of one cache of ``level`` (the first CPU's), None where the host reports none."""
        caches = self.level(level)
        return caches[0].size if caches else None

    @property
    def key(self) -> str:
        """A short id of the host for its calibration file: processor, caches, CPUs and torch version."""
        text = json.dumps([self.processor, self.arch, len(self.cpus), [asdict(c) for c in self.caches], self.torch])
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def summary(self) -> str:
        """``"AMD EPYC (2 cores; L2 1 MiB per core, L3 32 MiB)"``: the processor, the CPUs this process may use,
        and its L2 and L3 caches as reported (an L2 that several CPUs share, SMT siblings, is said so; several
        L3 caches are counted)."""
        parts = []
        l2, l3 = self.level(2), self.level(3)
        if l2:
            shared = len(l2[0].cpus)
            parts.append(f"L2 {format_bytes(l2[0].size)} per " + ("core" if shared == 1 else f"{shared} CPUs"))
        if l3:
            parts.append(f"L3 {'' if len(l3) == 1 else f'{len(l3)} x '}{format_bytes(l3[0].size)}")
        caches = f"; {', '.join(parts)}" if parts else "; caches not reported"
        return f"{self.processor} ({len(self.cpus)} cores{caches})"


def format_bytes(n: int) -> str:
    """``"1 MiB"``, ``"512 KiB"``, ``"1.5 MiB"``."""
    if n >= MIB:
        return f"{n / MIB:g} MiB"
    return f"{n / KIB:g} KiB"


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def _allowed_cpus() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return tuple(range(os.cpu_count() or 1))


def _cpu_list(text: str) -> tuple[int, ...]:
    """``"0-3,8"`` -> (0, 1, 2, 3, 8)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return tuple(out)


def _size(text: str) -> int:
    """``"1024K"`` -> 1048576 (sysfs cache sizes: a number with an optional K, M or G)."""
    text = text.strip().upper()
    unit = {"K": KIB, "M": MIB, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * unit


def read_caches(cpus: tuple[int, ...], root: Path = _CPU_SYSFS) -> tuple[Cache, ...]:
    """The distinct data and unified caches of ``cpus`` from Linux's sysfs under ``root``; () where it has none."""
    seen: dict[tuple[int, str, tuple[int, ...]], Cache] = {}
    for cpu in cpus:
        for index in sorted((root / f"cpu{cpu}" / "cache").glob("index*")):
            try:
                level = int((index / "level").read_text())
                kind = (index / "type").read_text().strip()
                size = _size((index / "size").read_text())
                shared = _cpu_list((index / "shared_cpu_list").read_text())
            except (OSError, ValueError):
                continue
            if kind == "Instruction":
                continue
            seen.setdefault((level, kind, shared), Cache(level, kind, size, shared))
    return tuple(sorted(seen.values(), key=lambda c: (c.level, c.cpus)))


@lru_cache(maxsize=1)
def describe() -> Host:
    """The host this process runs on (read once per process)."""
    cpus = _allowed_cpus()
    return Host(_processor(), platform.machine(), cpus, read_caches(cpus))


def threads() -> int:
    """torch's intra-op threads, at most the CPUs this process may run on."""
    return max(1, min(torch.get_num_threads(), len(describe().cpus)))


# --------------------------------------------------------------------------- explicit attention's slices
def derived_chunk_bytes(host: Host, n_threads: int) -> int:
    """The rule (module docs): the L2 caches of ``n_threads`` threads (one L2 each, up to the distinct L2 caches
    of the host's CPUs), at most half the last-level cache, at least 256 KiB."""
    l2 = host.level(2)
    if l2:
        chunk = sum(c.size for c in l2[:max(1, n_threads)])
    else:
        chunk = FALLBACK_L2 * max(1, n_threads)
    last = host.level(3) or host.level(2)
    if last:
        chunk = min(chunk, max(c.size for c in last) // 2)
    return max(MIN_CHUNK, chunk)


@torch.compiler.assume_constant_result  # traced by torch.compile: evaluated at trace time, a constant in the graph
def probs_chunk_bytes(n_threads: int | None = None) -> int:
    """Bytes of the attention map explicit CPU attention computes at a time, for ``n_threads`` threads (default:
    torch's current count): this host's stored calibration for that count, else :func:`derived_chunk_bytes`."""
    n = threads() if n_threads is None else n_threads
    return _chunk_for(n, _calibration_on())


@lru_cache(maxsize=64)
def _chunk_for(n_threads: int, use_calibration: bool) -> int:
    if use_calibration:
        stored = load_calibration().get("probs_chunk_bytes", {}).get(str(n_threads))
        if stored:
            return int(stored)
    return derived_chunk_bytes(describe(), n_threads)


def _calibration_on() -> bool:
    return os.environ.get(ENV_CALIBRATION, "1").strip().lower() not in ("0", "off", "false", "no")


# --------------------------------------------------------------------------- calibration
def cache_dir() -> Path:
    """The user's cache folder for leanvit: ``$XDG_CACHE_HOME/leanvit``, by default ``~/.cache/leanvit``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leanvit"


def calibration_path(host: Host | None = None) -> Path:
    """This host's calibration file."""
    return cache_dir() / f"host-{(host or describe()).key}.json"


def load_calibration(host: Host | None = None) -> dict:
    """The stored calibration of ``host`` (default: this one); {} where there is none or it cannot be read."""
    try:
        data = json.loads(calibration_path(host).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, step: int) -> None:
    """The work explicit CPU attention does per slice of ``step`` images (:mod:`leanvit.reduce.attention`): the
    biased logits in one baddbmm, the softmax, the product with V, the diagonal and the column sums."""
    B, H, N, D = q.shape
    for s in range(0, B, step):
        b = min(step, B - s)
        logits = torch.baddbmm(bias[s:s + b].expand(b, H, 1, N).reshape(b * H, 1, N),
                               q[s:s + b].reshape(b * H, N, D), k[s:s + b].reshape(b * H, N, D).transpose(1, 2),
                               alpha=D ** -0.5)
        probs = logits.view(b, H, N, N).softmax(dim=-1)
        probs @ v[s:s + b]
        diag_colsum(probs)


def calibrate(n_threads: int | None = None, repeats: int = 3, save: bool = True) -> dict:
    """Time the sliced attention of every candidate slice (:data:`CALIBRATION_CHUNKS`) on
    :data:`CALIBRATION_SHAPES` at ``n_threads`` threads (default: the current count), interleaved, ``repeats``
    times, and keep the slice with the least total of the best times; store it in this host's file (``save``).

    Returns ``{"threads": n, "probs_chunk_bytes": best, "times_ms": {chunk: ms}}``."""
    n = threads() if n_threads is None else n_threads
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        g = torch.Generator().manual_seed(0)
        tensors = [(*(torch.randn(B, H, N, D, generator=g) for _ in range(3)), torch.rand(B, 1, 1, N, generator=g))
                   for B, H, N, D in CALIBRATION_SHAPES]
        best = {c: [float("inf")] * len(tensors) for c in CALIBRATION_CHUNKS}
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first round warms up
                for chunk in CALIBRATION_CHUNKS:
                    for i, (q, k, v, bias) in enumerate(tensors):
                        step = max(1, chunk // (q.shape[1] * q.shape[2] ** 2 * q.element_size()))
                        start = time.perf_counter()
                        _sliced_attention(q, k, v, bias.log(), step)
                        best[chunk][i] = min(best[chunk][i], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    total = {c: 1e3 * sum(t) for c, t in best.items()}
    chosen = min(total, key=total.get)
    result = {"threads": n, "probs_chunk_bytes": chosen, "times_ms": {str(c): round(t, 2) for c, t in total.items()}}
    if save:
        _store(n, chosen, result["times_ms"])
    return result


def _store(n_threads: int, chunk: int, times: dict[str, float]) -> None:
    host = describe()
    data = load_calibration(host)
    data["host"] = {"processor": host.processor, "arch": host.arch, "cpus": len(host.cpus),
                    "caches": [asdict(c) for c in host.caches], "torch": host.torch}
    data.setdefault("probs_chunk_bytes", {})[str(n_threads)] = int(chunk)
    data.setdefault("times_ms", {})[str(n_threads)] = times
    data.setdefault("date", {})[str(n_threads)] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = calibration_path(host)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    _chunk_for.cache_clear()


def clear_calibration() -> bool:
    """Delete this host's calibration file; whether there was one."""
    _chunk_for.cache_clear()
    try:
        calibration_path().unlink()
        return True
    except FileNotFoundError:
        return False


def report(n_threads: int | None = None) -> str:
    """What ``python -m leanvit.ops`` prints: the host, the rule's slice, the stored calibration, the slice
    in effect."""
    host, n = describe(), threads() if n_threads is None else n_threads
    stored = load_calibration(host).get("probs_chunk_bytes", {})
    lines = [f"host: {host.summary()}; {platform.machine()}; torch {host.torch}; {n} thread{'s' * (n != 1)}",
             "caches: " + (", ".join(f"L{c.level} {c.type.lower()} {format_bytes(c.size)} (CPUs "
                                     f"{','.join(map(str, c.cpus))})" for c in host.caches) or "not reported"),
             f"explicit attention slice, rule: {format_bytes(derived_chunk_bytes(host, n))}",
             f"calibration file: {calibration_path(host)} "
             + (", ".join(f"{t} thread(s): {format_bytes(int(b))}" for t, b in sorted(stored.items()))
                if stored else "(none)"),
             f"calibrations {'used' if _calibration_on() else f'ignored ({ENV_CALIBRATION}=0)'}; in effect: "
             f"{format_bytes(probs_chunk_bytes(n))}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m leanvit.ops",
                                description="Show this host and its host-aware constants; optionally calibrate.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current count)")
    p.add_argument("--calibrate", action="store_true",
                   help="time explicit attention's slices here and store the fastest (seconds; on a quiet machine only)")
    p.add_argument("--clear", action="store_true", help="delete this host's stored calibration")
    args = p.parse_args(argv)
    if args.clear:
        print("deleted" if clear_calibration() else "no calibration stored", calibration_path())
    if args.calibrate:
        res = calibrate(args.threads)
        print("calibrated:", ", ".join(f"{format_bytes(int(c))} {t:.1f} ms" for c, t in res["times_ms"].items()),
              "->", format_bytes(res["probs_chunk_bytes"]))
    print(report(args.threads))


if __name__ == "__main__":
    main()
