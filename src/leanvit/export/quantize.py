"""int8 on top of token reduction: ONNX Runtime's dynamic quantization of an exported model's linear layers.

What is quantized: every MatMul and Gemm whose second input is a weight (``MatMulConstBOnly``), i.e. the linear
layers (qkv, attention projection, MLP, head). Their weights are stored in int8, symmetric, one scale per output
channel (a weight the forward computes from a parameter, such as IdleViT's rows of the fused ``qkv`` weight for
the selected tokens, is folded to a weight first, :func:`fold_constants`); their input activations are quantized
to uint8 on the fly, per tensor and per batch (``DynamicQuantizeLinear``), and the products run as integer kernels (``MatMulInteger`` / ``DynamicQuantizeMatMul``).
Not quantized: the attention's own products of two activations (``q k^T``, ``attn v``), softmax, norms, the
token-reduction ops (scores, top-k, gathers, merges) and the convolutional stem, which stay float32. Token reduction
fixes every block's token count, so it stacks with int8 unchanged: the quantized MatMuls simply see fewer rows.

Why dynamic and not static (calibrated) quantization: a ViT's activations have a few channels of large magnitude
(after LayerNorm, in the MLP), so one static per-tensor scale, fixed on calibration images, either clips them or
spends the 8 bits on them; dynamic quantization takes the scale of every batch as it comes, needs no calibration data
(the user of ``leanvit export`` may have none at hand), and keeps the exported graph's input a float batch. The
figures behind the choice (accuracy and speed of both on the reference teacher and DeiT-S) are in BENCHMARKS.md,
"Deploying: ONNX Runtime and int8" (``benchmarks/deploy.py``).
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError
from .deps import require

QUANTIZE = ("int8",)
OP_TYPES = ["MatMul", "Gemm"]


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantization '{quantize}'; choose {', '.join(QUANTIZE)} (or none for float32)")


def quantize_int8(model: bytes, per_channel: bool = True) -> bytes:
    """The serialised float32 ONNX model ``model`` with its linear layers in int8 (see the module docs)."""
    onnx, ort = require("onnx", "onnxruntime", what="int8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="leanvit-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fold_constants(model))
        try:
            with _quiet_root_logger():
                quantize_dynamic(src, dst, op_types_to_quantize=OP_TYPES, per_channel=per_channel,
                                 weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        except Exception as e:  # the quantizer's own errors: a graph it cannot read
            raise ConfigError(f"ONNX Runtime could not quantize the model to int8: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        data = dst.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def fold_constants(model: bytes) -> bytes:
    """``model`` after ONNX Runtime's basic graph optimisations (constant folding and redundant-node removal: no
    hardware-specific fusion, so the result is portable), so that every weight is an initializer.

    Why: the quantizer quantizes a MatMul only when its weight is an initializer. IdleViT projects the selected
    tokens with rows of the fused ``qkv`` weight (``attention._project``), which the exported graph slices from the
    parameter at run time; unfolded, those products stayed float32 in the int8 model and it ran slower than the
    int8 model of its ideal truncation (BENCHMARKS.md, "Deploying"). torch's exporter does not fold them (its
    optimiser leaves large constants alone)."""
    ort, = require("onnxruntime", what="int8 quantization")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="leanvit-fold-") as tmp:
        out = Path(tmp) / "folded.onnx"
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        return out.read_bytes()


@contextmanager
def _quiet_root_logger():
    """Keep the quantizer's advice to run its pre-processing (logged on the root logger, which would also gain a
    stderr handler) off the user's terminal: its shape inference fails on the exporter's graphs and is not needed
    for dynamic quantization. The root logger is left as it was."""
    root = logging.getLogger()
    quiet = logging.Filter("leanvit-quiet")  # passes only records of a logger named so: none of the quantizer's
    guard = logging.NullHandler() if not root.handlers else None  # logging.warning would add a stderr handler
    root.addFilter(quiet)
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if guard is not None:
            root.removeHandler(guard)
