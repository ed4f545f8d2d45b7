"""Deploying a model outside PyTorch: ONNX export with a dynamic batch axis (:func:`export_onnx`), ONNX Runtime as a
runtime of ``bench``, ``eval`` and ``compare`` (:class:`OrtModel`, :func:`as_runtime`), and int8 on top of token
reduction (:func:`quantize_int8`).

onnx, onnxscript and onnxruntime (extra ``leanvit[onnx]``) are imported inside the functions that use them, never
when this package is imported; a missing one is named with the command that installs it (:mod:`.deps`).
"""
from .deps import INSTALL, require
from .exporter import ATOL, ExportReport, build_onnx, export_onnx, export_program, input_size_of, verify
from .quantize import QUANTIZE, check_quantize, quantize_int8
from .runtime import RUNTIMES, OrtModel, as_runtime, check_runtime, runtime_label
from .session import make_session

__all__ = ["ATOL", "INSTALL", "QUANTIZE", "RUNTIMES", "ExportReport", "OrtModel", "as_runtime", "build_onnx",
           "check_quantize", "check_runtime", "export_onnx", "export_program", "input_size_of", "make_session",
           "quantize_int8", "require", "runtime_label", "verify"]
