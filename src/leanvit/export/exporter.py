"""A model, dense or patched with any token-reduction method, to one ONNX file with a dynamic batch axis.

How (``torch.onnx.export(..., dynamo=True)`` on a ``torch.export`` program). Every shape but the batch is static: a
patch's schedule fixes how many tokens each block keeps, so the top-k sizes, gathers and merges of every method are
constants of the graph and only the batch is symbolic (``Dim("batch")``). The program is captured by
``torch.export`` in non-strict mode (the model's Python runs as written, on fake tensors: the reducer's per-thread
bookkeeping and its dicts need no tracing support), then translated to ONNX by torch's dynamo exporter (onnxscript).

Why the dynamo exporter and not the TorchScript one (``dynamo=False``): ``torch.export`` keeps the batch symbolic
and fails loudly where a forward makes it a constant (a Python loop over slices of the batch, a branch on its size),
so a file either serves every batch size or is not written. The TorchScript exporter records one traced run: a
Python ``range`` over the batch or a branch on it is frozen at the traced batch size and the file computes wrong
results at another, silently (the explicit attention's cache-sized slices did exactly that). The legacy exporter is
also deprecated in torch 2.9 and later.

What runs differently while exporting (the same values, checked by ``tests/test_export.py``):

* leanvit's two custom ops (the fused score pass ``leanvit::attention_diag_colsum`` of GTP's ``score_path="fused"``,
  and the cache-blocked ``leanvit::explicit_attention_stats`` of compiled CPU forwards) have no ONNX form; they are
  decomposed into plain ATen ops, their math written out on the whole batch (:data:`DECOMPOSITIONS`);
* the explicit attention map is computed for the whole batch at once instead of a cache-sized slice at a time
  (``leanvit.reduce.attention``: the slice count depends on the batch size);
* attention with a mask or a size bias (ToMe's and GTP's proportional attention) and IdleViT's attention among its
  selected tokens are written as the product, the softmax and the product with V (``attention.fused``,
  ``attention.subset``), which ONNX Runtime fuses, instead of torch's ONNX form of
  ``scaled_dot_product_attention``; sorts are top-k with a constant k (``ops.select.split_topk`` of GTP and EViT,
  ToMe's matching), and ToMe averages the heads' keys
  with one mean (``bipartite_soft_matching``, ``tome._mean_over_heads``: fewer graph nodes, the cost at batch 1);
  ToMe's size-weighted merge writes its merged rows with one scatter
  instead of three (``BipartiteMerge.weighted``): ONNX Runtime copies the whole tensor a scatter writes into;
* a transformers model builds an all-visible attention mask for a call without one and, unable to check a traced
  mask's values, passes it to every layer; the export declares that the graph's only input is the images
  (:func:`leanvit.reduce.adapters.base.images_only`), so the reducing layers run without it instead of refusing it.
  A model whose forward returns a structure (transformers' ``ModelOutput``) is exported returning its logits, else
  its image features (:func:`leanvit.models.external.output_tensor`).

Elsewhere the forward is written once for both, in ops that export to the ONNX form ONNX Runtime runs fastest (the
map's diagonal as a strided slice, GTP's edge weights by ``gather``, no in-place writes into slices of the tokens);
the comment at each says what the alternative cost. These were found with ONNX Runtime's profiler on DeiT-S at
batch 32 and 1 (``BENCHMARKS.md``, "Deploying").

Every file is checked with ``onnx.checker`` (full check, with shape inference), run by ONNX Runtime on two batch
sizes and compared with the PyTorch model before it is written, and written atomically (a temporary file renamed
over the path): a failed export leaves nothing behind.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import ConfigError, LeanvitError, UnsupportedModelError
from ..io import atomic_write
from ..models.external import output_tensor
from ..ops.select import map_diagonal
from ..reduce import get_reducer
from ..reduce.adapters.base import images_only
from .deps import require
from .quantize import check_quantize, quantize_int8
from .session import make_session

INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXAMPLE_BATCH = 2  # torch.export treats sizes 0 and 1 as special; an example batch of 2 keeps the batch symbolic
VERIFY_BATCHES = (1, 3)  # the batch sizes every export is checked at against PyTorch before it is written
ATOL = 1e-4  # float32: the largest |ORT - PyTorch| an export may show on any logit


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote (or, with ``path=None``, built).

    Attributes:
        path: the file written (None when only built in memory).
        model: the model's name.
        method: the token-reduction method of the patch exported, ``dense`` for an unpatched model.
        schedule: the patch's per-block schedule (empty for dense).
        input_size: ``(C, H, W)`` of one image; the batch axis is dynamic.
        opset: the ONNX opset of the default domain.
        quantize: ``int8`` or None (float32).
        max_abs_diff: the largest |ONNX Runtime - PyTorch| over the verification batches (None: not verified; for
            int8 the difference to the float32 export, which is not bounded).
        size_bytes: the file's size.
        seconds: how long the export took.
        nodes: ONNX nodes in the graph.
    """

    path: Path | None
    model: str
    method: str
    schedule: list[int] = field(default_factory=list)
    input_size: tuple[int, int, int] = (3, 224, 224)
    opset: int = 0
    quantize: str | None = None
    max_abs_diff: float | None = None
    size_bytes: int = 0
    seconds: float = 0.0
    nodes: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = None if self.path is None else str(self.path)
        d["input_size"] = list(self.input_size)
        return d


# ------------------------------------------------------------------------------------------------ decompositions
def _diag_colsum(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``leanvit::attention_diag_colsum`` for export: the diagonal and the column sums ``(B, H, N)`` of
    ``softmax(scale q k^T + bias)``, the values of :func:`leanvit.ops.fused_score.torch_scores` computed on the whole
    batch (that function's loop over slices of the batch would fix the batch size in the graph)."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias[:, None, None, :].float()
    p = (logits - logits.logsumexp(-1, keepdim=True)).exp()  # (B, H, N, N)
    return map_diagonal(p), p.sum(-2)


def _explicit_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``leanvit::explicit_attention_stats`` for export: ``(softmax(scale q k^T + bias) @ v, diagonal, column
    sums)`` on the whole batch (the op's slices would fix the batch size)."""
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if bias is not None:
        logits = logits + bias
    p = logits.softmax(-1)
    return p @ v, map_diagonal(p), p.sum(-2)


def _decompositions() -> dict:
    """leanvit's custom ops -> their export forms (the ops register when :mod:`leanvit.reduce` is imported)."""
    ops = torch.ops.leanvit
    return {ops.attention_diag_colsum.default: _diag_colsum, ops.explicit_attention_stats.default: _explicit_stats}


# ------------------------------------------------------------------------------------------------ checks
def model_name(model: nn.Module) -> str:
    """A model's name for messages and the file's metadata: its timm architecture, else its class."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or getattr(model, "default_cfg", {}).get("architecture")
               or type(model).__name__)


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output path that is a folder or lies in a folder that cannot be written."""
    p = Path(path)
    if str(path).strip() == "" or p.name in ("", ".", ".."):
        raise ConfigError(f"the ONNX output needs a file name, got '{path}'")
    if p.is_dir():
        raise ConfigError(f"ONNX output {p} is a folder; give a file name")
    existing = p.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"ONNX output {p}: {existing} is a file, not a folder")
    try:  # os.access is not enough: read-only mounts and /proc pass it as root
        fd, probe = tempfile.mkstemp(prefix=".leanvit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"ONNX output {p}: cannot write in {existing} ({e.strerror or e})") from None
    return p


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input image: the model adapter's size where it has one, else timm's config."""
    from ..analysis.macs import default_input_size
    from ..reduce.adapters import find_adapter

    try:
        size = find_adapter(model).input_size(model)
    except UnsupportedModelError:  # not a ViT leanvit patches (a CNN): timm's config says
        size = None
    return tuple(int(v) for v in (size or default_input_size(model)))


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # torch's exporter puts the cause after a summary header
        if ln.startswith("<class") and ">: " in ln:
            return ln.split(">: ", 1)[1][:300]
    return (lines[0][:300] if lines else type(e).__name__)


def _why(e: BaseException) -> str:
    """A torch export error in one line, in the terms of what the model does."""
    text = str(e)
    if "specialized it to be a constant" in text or "Constraints violated" in text:
        fixed = re.search(r"constant \((\d+)\)", text)
        return (f"its forward fixes the batch size{f' (to {fixed.group(1)})' if fixed else ''}, so one file "
                f"cannot serve every batch size")
    if isinstance(e, LeanvitError):
        return str(e)
    return f"{type(e).__name__}: {_first_line(e)}"


class _TensorOutput(nn.Module):
    """A model whose forward returns a structure (a transformers ``ModelOutput``), as one that returns the tensor
    it stands for (:func:`leanvit.models.external.output_tensor`: the logits, else the image features): an ONNX
    graph's output is a tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_tensor(self.model(x))


def _check_deterministic(model: nn.Module, x: torch.Tensor, name: str) -> nn.Module:
    """The model to export: ``model``, or ``model`` wrapped to return one tensor where its output is a structure;
    refused when two forwards of ``x`` differ (a random selection: an exported graph draws its own numbers, so ONNX
    Runtime could never give the PyTorch model's output) or when its output stands for no single tensor."""
    try:
        with torch.no_grad():
            a, b = model(x), model(x)
    except LeanvitError:
        raise
    except Exception as e:  # a model that does not run on a batch of its own input size
        raise UnsupportedModelError(f"cannot export {name}: it does not run on a batch of shape {tuple(x.shape)} "
                                    f"({type(e).__name__}: {_first_line(e)}); give input_size") from None
    if not isinstance(a, torch.Tensor):
        kind = type(a).__name__
        a, b = output_tensor(a), output_tensor(b)
        if a is None:
            raise UnsupportedModelError(f"cannot export {name}: its forward returns a {kind} with no logits or image "
                                        f"features; export a model whose forward returns a tensor")
        model = _TensorOutput(model)
    if not torch.equal(a, b):
        raise UnsupportedModelError(
            f"cannot export {name}: two forwards of the same images differ (random token selection?), so no exported "
            f"graph can reproduce it; export a deterministic patch")
    return model


# ------------------------------------------------------------------------------------------------ export
def export_program(model: nn.Module, input_size: tuple[int, int, int] | None = None, opset: int | None = None,
                   name: str | None = None):
    """``(onnx.ModelProto, info)`` of ``model`` with a dynamic batch axis, checked by ``onnx.checker``; ``info``
    holds the method, schedule, input size and the PyTorch copy that was exported (for verification).

    Raises:
        ConfigError: onnx / onnxscript missing, the model in training mode.
        UnsupportedModelError: the model cannot be exported (the reason in one line).
    """
    onnx, _ = require("onnx", "onnxscript")
    name = name or model_name(model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export needs a torch nn.Module, got {type(model).__name__}")
    if any(m.training for m in model.modules()):
        raise ConfigError(f"{name} is in training mode: call model.eval() before exporting (a training forward runs "
                          f"dropout and a token reducer's training path, which is not what a deployed model runs)")
    size = tuple(input_size) if input_size is not None else input_size_of(model)
    # a copy: export runs the model on fake tensors, which would stay in the reducer's per-forward state, and the
    # reducer's diagnostics (trace, lost-token counters) do not belong in a deployed graph
    net = copy.deepcopy(model).cpu().eval()  # exported on the CPU: ONNX Runtime's provider here is the CPU one
    red = get_reducer(net)
    if red is not None:
        red.trace = False
        red.set_stats(False)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        raise ConfigError(f"{name} has {dtype} weights; export a float32 model (int8 comes from --quantize int8)")
    x = torch.randn(EXAMPLE_BATCH, *size, generator=torch.Generator().manual_seed(0))
    net = _check_deterministic(net, x, name)
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            with images_only():  # no caller mask: a mask transformers builds for itself hides nothing
                program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},), strict=False)
        custom = _decompositions()
        if any(n.target in custom for n in program.graph.nodes):
            program = program.run_decompositions(custom)
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], opset_version=opset, optimize=True,
                                         verbose=False)
        proto = onnx_program.model_proto
    except ConfigError:
        raise
    except Exception as e:  # torch.export and the ONNX translation raise many kinds; all mean "cannot export"
        raise UnsupportedModelError(f"cannot export {name} to ONNX: {_why(e)}") from None
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise UnsupportedModelError(f"cannot export {name} to ONNX: the exported graph fails onnx.checker "
                                    f"({_first_line(e)})") from None
    info = {"model": name, "method": red.name if red is not None else "dense",
            "schedule": list(red.schedule) if red is not None else [], "input_size": size, "net": net,
            "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)}
    _set_metadata(onnx, proto, info, model)
    return proto, info


def _set_metadata(onnx, proto, info: dict[str, Any], model: nn.Module) -> None:
    """What a deployment needs to feed the graph and what it was made from, as the file's metadata."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    props = {"leanvit_version": __version__, "model": info["model"], "method": info["method"],
             "schedule": ",".join(map(str, info["schedule"])), "input_size": ",".join(map(str, info["input_size"])),
             "batch_axis": "dynamic"}
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if cfg.get(key) is not None:
            value = cfg[key]
            props[key] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    onnx.helper.set_model_props(proto, props)
    proto.producer_name, proto.producer_version = "leanvit", __version__


def verify(proto_bytes: bytes, net: nn.Module, input_size: tuple[int, int, int], threads: int | None = None,
           batches: tuple[int, ...] = VERIFY_BATCHES) -> float:
    """The largest |ONNX Runtime - PyTorch| over random batches of each size in ``batches`` (one session)."""
    session = make_session(proto_bytes, threads)
    worst = 0.0
    gen = torch.Generator().manual_seed(1)
    for b in batches:
        x = torch.randn(b, *input_size, generator=gen)
        with torch.no_grad():
            ref = net(x)
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        if out.shape != ref.shape:
            raise UnsupportedModelError(f"the exported graph gives outputs of shape {tuple(out.shape)} at batch {b}, "
                                        f"PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((out - ref).abs().max()) if ref.numel() else 0.0)
    return worst


def build_onnx(model: nn.Module, *, input_size: tuple[int, int, int] | None = None, quantize: str | None = None,
               check: bool = True, atol: float = ATOL, opset: int | None = None, name: str | None = None,
               threads: int | None = None) -> tuple[bytes, ExportReport]:
    """The serialised ONNX model of ``model`` and its report, in memory (see :func:`export_onnx`)."""
    check_quantize(quantize)
    require("onnxruntime", what="checking the export")
    t0 = time.perf_counter()
    proto, info = export_program(model, input_size, opset, name)
    data = proto.SerializeToString()
    worst = None
    if check:
        worst = verify(data, info["net"], info["input_size"], threads)
        if not worst <= atol:  # also catches NaN
            raise UnsupportedModelError(
                f"cannot export {info['model']} to ONNX: ONNX Runtime's output differs from PyTorch's by {worst:.3g} "
                f"(at most {atol:g} allowed in float32); the file was not written")
    if quantize == "int8":
        data = quantize_int8(data)
    report = ExportReport(path=None, model=info["model"], method=info["method"], schedule=info["schedule"],
                          input_size=info["input_size"], opset=info["opset"], quantize=quantize, max_abs_diff=worst,
                          size_bytes=len(data), seconds=time.perf_counter() - t0, nodes=_count_nodes(data))
    return data, report


def _count_nodes(data: bytes) -> int:
    onnx, = require("onnx")
    return len(onnx.load_from_string(data).graph.node)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: tuple[int, int, int] | None = None,
                quantize: str | None = None, check: bool = True, atol: float = ATOL, opset: int | None = None,
                name: str | None = None, threads: int | None = None) -> ExportReport:
    """Export ``model`` (dense, or patched with any method) to the ONNX file ``path`` with a dynamic batch axis.

    The model must be in eval mode. The file is checked with ``onnx.checker``, run by ONNX Runtime at batch 1 and 3
    and compared with the PyTorch model (``check``: refused when any logit differs by more than ``atol``), and
    written atomically: on any error nothing is left at ``path``. The model itself is not changed (a copy is
    exported). Its metadata records leanvit's version, the model, the method and schedule, the input size and the
    preprocessing (mean, std) where the model's config gives them.

    Args:
        model: the model; a patch's schedule fixes every block's token count, so only the batch is dynamic.
        path: the ``.onnx`` file to write.
        input_size: ``(C, H, W)``; default: the model's own.
        quantize: ``"int8"``: weights of the linear layers in int8, activations quantized on the fly (ONNX
            Runtime's dynamic quantization, :mod:`leanvit.export.quantize`); None: float32.
        check: compare ONNX Runtime's output with PyTorch's before writing (float32).
        opset: the ONNX opset (default: torch's exporter's).
        name: the model's name in messages and metadata (default: its timm architecture).
        threads: ONNX Runtime threads for the check (default: torch's).

    Raises:
        ConfigError: onnx, onnxscript or onnxruntime missing (names the package to install), a model in training
            mode, a path that cannot be written, an unknown ``quantize``.
        UnsupportedModelError: a model or patch that cannot be exported, or whose export does not reproduce it.
    """
    check_quantize(quantize)
    require(what="ONNX export")
    out = check_output_path(path)
    data, report = build_onnx(model, input_size=input_size, quantize=quantize, check=check, atol=atol, opset=opset,
                              name=name, threads=threads)
    atomic_write(out, lambda f: f.write(data))
    report.path = out
    return report
