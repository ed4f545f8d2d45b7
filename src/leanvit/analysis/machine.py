"""A description of the machine a measurement ran on (recorded next to every benchmark figure)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from ..ops.host import describe


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Processor name, architecture, CPU count, the caches (:func:`leanvit.ops.host.describe`: the per-core L1 data
    and L2 and the last-level L3 in bytes, None where the host reports none; the CPUs this process may use),
    torch version and threads, and the GPU name on CUDA."""
    device = torch.device(device)
    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    host = describe()
    info = {"processor": processor, "arch": platform.machine(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(host.cpus), "caches": {f"l{n}": host.cache_size(n) for n in (1, 2, 3)},
            "host": host.summary(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    ort = sys.modules.get("onnxruntime")  # recorded where a measurement used it (never imported here)
    if ort is not None:
        info["onnxruntime"] = ort.__version__
    return info


def threads_phrase(n: int | None = None) -> str:
    """``"1 thread"`` or ``"<n> threads"``; ``n`` defaults to torch's intra-op thread count."""
    n = torch.get_num_threads() if n is None else n
    return f"{n} thread{'' if n == 1 else 's'}"


def machine_summary(device: torch.device | str = "cpu") -> str:
    i = machine_info(device)
    gpu = f", {i['gpu']}" if "gpu" in i else ""
    ort = f", onnxruntime {i['onnxruntime']}" if "onnxruntime" in i else ""
    # the host as it reports itself: processor, usable cores and caches ("AMD EPYC (2 cores; L2 1 MiB per core,
    # L3 32 MiB)"), so that every table names the cache sizes its CPU timings depend on
    host = i["host"] if not gpu else i["host"][:-1] + gpu + ")"
    return f"{host}, torch {i['torch']}{ort}, {threads_phrase(i['threads'])}"
