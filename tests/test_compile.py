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


def _graph(model: torch.nn.Module, batch: int, grad: bool = False) -> torch.fx.Graph:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(model, fullgraph=True, dynamic=False, backend=backend)(torch.randn(batch, 3, 224, 224))
    return graphs[0].graph


def _graph_ops(model: torch.nn.Module, batch: int, grad: bool = False) -> int:
    return sum(n.op.startswith("call") for n in _graph(model, batch, grad).nodes)


def test_gtp_compiled_cpu_attention_is_one_op():
    # compiled on CPU without gradients, GTP's explicit attention and its score statistics run as one cache-blocked
    # op per reducing block where the map takes several slices; with gradients (no backward for the op), or for a
    # batch that fits one slice, the attention is traced as usual
    model = _model("gtp")
    op = torch.ops.leanvit.explicit_attention_stats.default
    assert sum(n.target == op for n in _graph(model, 8).nodes) == 4  # every block reduces at r=8
    assert not any(n.target == op for n in _graph(model, 8, grad=True).nodes)
    assert not any(n.target == op for n in _graph(model, 1).nodes)
    assert not any(n.target == op for n in _graph(_model("gtp-cls"), 8).nodes)  # the cls score needs no map
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.allclose(compiled, eager, atol=1e-6)


@pytest.mark.parametrize("case", ["gtp", "idle"])
def test_compiled_graph_does_not_grow_with_batch(case):
    # eager CPU attention with an explicit map runs a few images at a time; compiled, it must not, or every slice
    # is traced and compiled as its own kernels (GTP's compile time grew with the batch size)
    model = _model(case)
    assert _graph_ops(model, 32) == _graph_ops(model, 16)  # GTP: the attention as one op
    assert _graph_ops(model, 16, grad=True) == _graph_ops(model, 1, grad=True)  # GTP: the attention traced whole


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
