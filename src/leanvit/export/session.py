"""An ONNX Runtime session with leanvit's settings, shared by the export check and the runtime.

Settings: graph optimisations all on; ``intra_op_num_threads`` = torch's thread count (``--threads``), so that both
runtimes are timed on the same cores; one inter-op thread, sequential execution (one batch at a time, as the PyTorch
timer runs). The intra-op threads do not spin while they wait (``allow_spinning=0``): a spinning pool keeps its cores
busy after each run and would take them from the PyTorch models timed interleaved with it, and from the other
processes on a shared host.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .deps import require


def make_session(model: bytes | str | Path, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU provider with leanvit's settings (see the module docs)."""
    ort, = require("onnxruntime", what="the onnxruntime runtime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: the optimiser's notes on nodes it does not fold are not the user's
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
