"""Every reducer compiles as one graph for a fixed input shape: no graph break, no host-device sync, no
data-dependent shape and no profiler label inside the compiled region (the way a new user tries it:
``torch.compile(model, fullgraph=True)`` on a 4-block DeiT-Tiny at r=8). Dynamo is checked with the ``eager``
backend (fast); one inductor compile per method family checks the generated code gives the eager output."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import leanvit

CASES = {
    "gtp": dict(method="gtp", r=8),
    "gtp-cls": dict(method="gtp", r=8, score="cls"),
    "gtp-merge": dict(method="gtp", r=8, orphans="merge"),
    "gtp-fused": dict(method="gtp", r=8, score_path="fused"),
    "tome": dict(method="tome", r=8),
    "evit": dict(method="evit", r=8),
    "evit-keep": dict(method="evit", keep=0.7),
    "truncate": dict(method="truncate", r=8),
    "idle": dict(method="idle", keep=0.7),
}


def _model(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=4, num_classes=10).eval()
    opts = dict(CASES[case])
    return leanvit.patch(model, opts.pop("method"), **opts)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_one_graph_no_break(case):
    model = _model(case)
    x = _x()
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch._dynamo.reset()
            out = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.allclose(out, eager, atol=1e-5), (out - eager).abs().max()
    profiler = [str(w.message) for w in caught if "rofiler" in str(w.message)]
    assert not profiler, profiler


def _graph_ops(model: torch.nn.Module, batch: int) -> int:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, dynamic=False, backend=backend)(torch.randn(batch, 3, 224, 224))
    return sum(n.op.startswith("call") for n in graphs[0].graph.nodes)


@pytest.mark.parametrize("case", ["gtp", "idle"])
def test_compiled_graph_does_not_grow_with_batch(case):
    # eager CPU attention with an explicit map runs a few images at a time; compiled, it must not, or every slice
    # is traced and compiled as its own kernels (GTP's compile time grew with the batch size)
    model = _model(case)
    assert _graph_ops(model, 16) == _graph_ops(model, 1)


def test_idle_training_path_compiles():
    model = _model("idle").train()
    x = _x()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="eager")(x)
    out.sum().backward()
    assert len(leanvit.get_reducer(model).cut_inputs) == 3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gtp", "tome", "evit", "idle"])
def test_inductor_matches_eager(case):
    model = _model(case)
    x = _x()
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(x)
    assert torch.allclose(out, eager, atol=1e-4), (out - eager).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("case", ["gtp", "tome", "evit", "idle"])
def test_reduce_overhead_mode_cuda(case):
    model = _model(case).cuda()
    x = _x().cuda()
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # recorded, then replayed as a CUDA graph
            out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-3), (out - eager).abs().max()
