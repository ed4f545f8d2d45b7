"""A description of the machine a measurement ran on (recorded next to every benchmark figure)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Processor name, architecture, CPU count, torch version and threads, and the GPU name on CUDA."""
    device = torch.device(device)
    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"processor": processor, "arch": platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def threads_phrase(n: int | None = None) -> str:
    """``"1 thread"`` or ``"<n> threads"``; ``n`` defaults to torch's intra-op thread count."""
    n = torch.get_num_threads() if n is None else n
    return f"{n} thread{'' if n == 1 else 's'}"


def machine_summary(device: torch.device | str = "cpu") -> str:
    i = machine_info(device)
    gpu = f", {i['gpu']}" if "gpu" in i else ""
    return f"{i['processor']} ({i['cpu_count']} cores{gpu}), torch {i['torch']}, {threads_phrase(i['threads'])}"
