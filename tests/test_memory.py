"""No method holds memory above the dense model, and the rewrites that removed it change no output.

1. Peak bytes of live tensors in an inference forward (the CPU allocator's own allocation and free reports, read
   through ``torch.profiler``, as ``benchmarks/memory.py`` measures): every method at most the dense model's.
2. ToMe's size-weighted merge, which rewrites only the merged rows, against ToMe's own formula
   (``merge(x * size, "sum") / merge(size, "sum")``) in float64, gradients included.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import timm
import torch

import leanvit
from leanvit.ops.merge import BipartiteMerge, bipartite_soft_matching, merge_weighted

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from memory import tensor_peak  # noqa: E402  (the benchmark's own measure)


def test_the_measure_counts_live_tensors():
    x = torch.randn(1000, 1000)  # 4 MB, alive before: not counted
    cpu = torch.device("cpu")

    def work():
        y = x * 2  # +4 MB
        z = y + 1  # +4 MB: 8 MB alive
        del y  # 4 MB
        w = z @ z  # +4 MB: 8 MB again
        del z, w

    assert 8_000_000 <= tensor_peak(work, cpu) < 8_100_000
    assert tensor_peak(lambda: torch.randn(1000, 1000), cpu) >= 4_000_000  # a result dropped at once still counts


# ================================================================================ 1. peak memory against dense
METHODS = {"gtp": dict(method="gtp"), "gtp-cls": dict(method="gtp", score="cls"), "tome": dict(method="tome"),
           "evit": dict(method="evit"), "idle": dict(method="idle")}


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    # DeiT-S's proportions (64 channels per head, MLP ratio 4) at a small size: 6 blocks, 64 image tokens
    return timm.create_model("deit_small_patch16_224", pretrained=False, img_size=128, depth=6, embed_dim=192,
                             num_heads=3, num_classes=10).eval()


def _peak(model, x) -> int:
    with torch.inference_mode():
        model(x[:2])  # lazily built state (graphs, sizes) before measuring
        return tensor_peak(lambda: model(x), torch.device("cpu"))


@pytest.mark.parametrize("case", list(METHODS))
def test_inference_peak_at_most_dense(dense, case):
    x = torch.randn(16, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    opts = dict(METHODS[case])
    model = leanvit.patch(copy.deepcopy(dense), opts.pop("method"), budget=0.74, **opts)
    base, peak = _peak(dense, x), _peak(model, x)
    assert peak <= base, f"{case}: {peak / base:.3f} of the dense model's peak"


# ================================================================================ 2. ToMe's weighted merge
def tome_formula(merge, x, size):
    """ToMe's ``merge_wavg``: scale by size, merge by sum, divide by the merged sizes."""
    return merge(x * size, "sum") / merge(size, "sum"), merge(size, "sum")


@pytest.mark.parametrize("protected, keep_order", [(0, False), (1, True), (2, True), (5, True), (1, False)])
@pytest.mark.parametrize("r, dim", [(3, 8), (20, 2)])  # dim 2: many A tokens share one destination
def test_weighted_merge_is_tomes_formula(protected, keep_order, r, dim):
    g = torch.Generator().manual_seed(protected * 10 + r)
    B, T, C = 3, 45, 7
    metric = torch.randn(B, T, dim, generator=g, dtype=torch.float64)
    merge = bipartite_soft_matching(metric, r, protected=protected, keep_order=keep_order)
    assert isinstance(merge, BipartiteMerge)
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 6, (B, T, 1), generator=g).double()
    ref_x, ref_s = tome_formula(merge, x, size)
    out_x, out_s = merge_weighted(merge, x, size)
    assert out_x.shape == ref_x.shape == (B, T - min(r, (T - protected) // 2), C)
    assert torch.equal(out_s, ref_s)
    assert torch.allclose(out_x, ref_x, rtol=0, atol=1e-12)
    w = torch.randn(ref_x.shape, generator=g, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((ref_x * w).sum(), x)
    (g_out,) = torch.autograd.grad((out_x * w).sum(), x)
    assert torch.allclose(g_out, g_ref, rtol=0, atol=1e-12)


def test_weighted_merge_of_nothing_is_the_input():
    x, size = torch.randn(2, 5, 3), torch.ones(2, 5, 1)
    out, s = merge_weighted(bipartite_soft_matching(torch.randn(2, 5, 4), 0), x, size)
    assert torch.equal(out, x) and torch.equal(s, size)


def test_weighted_merge_of_an_empty_batch():
    merge = bipartite_soft_matching(torch.randn(0, 9, 4), 2, protected=1, keep_order=True)
    out, s = merge_weighted(merge, torch.randn(0, 9, 3), torch.ones(0, 9, 1))
    assert out.shape == (0, 7, 3) and s.shape == (0, 7, 1)
