"""ONNX Runtime as a runtime of ``bench``, ``eval`` and ``compare``: an exported model run through ORT's CPU
provider behind the interface of the PyTorch model it came from, so that the same evaluation loop, timer and table
measure it.

:class:`OrtModel` is an ``nn.Module`` whose forward hands the batch to an ``InferenceSession`` (float32 in, logits
out, torch tensors on both sides; the copies are of the input batch and the logits only). :func:`as_runtime` turns a
PyTorch model into the runtime a verb was asked for: ``pytorch`` (eager, the default), ``compiled``
(``torch.compile(fullgraph=True)``) or ``onnxruntime`` (exported and checked by :func:`~leanvit.export.export_onnx`'s
steps, in memory, optionally int8).

The session's settings (threads, no spinning) are :func:`~leanvit.export.session.make_session`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .deps import require
from .exporter import build_onnx
from .session import make_session

RUNTIMES = ("pytorch", "compiled", "onnxruntime")


class OrtModel(nn.Module):
    """An exported model run by ONNX Runtime, called like the PyTorch model: ``(B, C, H, W)`` float tensor in,
    logits out. CPU only.

    Args:
        model: the ONNX model (serialised bytes or a file).
        threads: ORT intra-op threads (default: torch's thread count now).
        pretrained_cfg: the source model's timm config (input size, mean, std), so that data transforms and input
            sizes are read from it as from the PyTorch model.
        quantize: ``int8`` where the graph was quantized (for reports).
    """

    runtime = "onnxruntime"

    def __init__(self, model: bytes | str | Path, threads: int | None = None,
                 pretrained_cfg: dict[str, Any] | None = None, quantize: str | None = None):
        super().__init__()
        self.threads = int(threads or torch.get_num_threads())
        self.quantize = quantize
        self.pretrained_cfg = dict(pretrained_cfg or {})
        self._source = model
        self.session = make_session(model, self.threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        if "input_size" not in self.pretrained_cfg and all(isinstance(d, int) for d in inp.shape[1:]):
            self.pretrained_cfg["input_size"] = tuple(inp.shape[1:])  # (C, H, W) of the graph: timers read it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ConfigError(f"the onnxruntime runtime runs on the CPU; the batch is on {x.device} (use --device cpu)")
        out = self.session.run(None, {self.input_name: x.detach().to(torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def extra_repr(self) -> str:
        return f"CPUExecutionProvider, {self.threads} threads{', int8' if self.quantize else ''}"

    def __getstate__(self) -> dict[str, Any]:  # a session cannot be pickled: it is rebuilt from the model
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session = make_session(self._source, self.threads)


def runtime_label(runtime: str, quantize: str | None = None) -> str:
    """``onnxruntime int8``, ``compiled``, ``pytorch``: a runtime in the words of tables."""
    return runtime + (f" {quantize}" if quantize else "")


def check_runtime(runtime: str, quantize: str | None = None, device: torch.device | str | None = None) -> None:
    """Refuse an unknown runtime, ``quantize`` outside ONNX Runtime, and ONNX Runtime off the CPU, before any
    work; the optional packages are checked here too."""
    from .quantize import check_quantize

    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    check_quantize(quantize)
    if quantize is not None and runtime != "onnxruntime":
        raise ConfigError(f"--quantize {quantize} quantizes an ONNX Runtime graph; add --runtime onnxruntime")
    if runtime == "onnxruntime":
        if device is not None and torch.device(device).type != "cpu":
            raise ConfigError(f"the onnxruntime runtime runs on ORT's CPU provider; got --device {device} (use "
                              f"--device cpu)")
        require(what="the onnxruntime runtime")


def as_runtime(model: nn.Module, runtime: str = "pytorch", quantize: str | None = None,
               threads: int | None = None, name: str | None = None) -> nn.Module:
    """``model`` in ``runtime``: itself (``pytorch``), ``torch.compile(model, fullgraph=True)`` (``compiled``), or
    an :class:`OrtModel` of its ONNX export, checked against PyTorch before use (``onnxruntime``; ``quantize``
    ``int8`` quantizes the float32 graph after that check)."""
    check_runtime(runtime, quantize)
    if runtime == "pytorch":
        return model
    if runtime == "compiled":
        return torch.compile(model, fullgraph=True)
    data, _ = build_onnx(model, quantize=quantize, threads=threads, name=name)
    return OrtModel(data, threads=threads, pretrained_cfg=getattr(model, "pretrained_cfg", None), quantize=quantize)
