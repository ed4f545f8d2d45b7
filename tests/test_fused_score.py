"""GTP's scores without the attention map (``score_path="fused"``) equal the explicit path: the same scores
(allclose in float32), the same selected tokens and the same logits, on the timm variants of the equivalence tests;
the Triton kernels are checked on CPU tensors under ``TRITON_INTERPRET=1`` (in a subprocess: the interpreter is
chosen when the kernels are defined)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import leanvit
from leanvit.ops.fused_score import FUSABLE, fused_score, torch_scores
from leanvit.ops.select import attention_score
from leanvit.reduce import get_reducer
from conftest import VARIANTS, image, make, run


def _qk(B=2, H=3, N=21, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)


@pytest.mark.parametrize("kind", FUSABLE)
@pytest.mark.parametrize("with_bias", [False, True])
def test_score_pass_equals_scoring_the_map(kind, with_bias):
    q, k = _qk()
    bias = torch.rand(2, 21).add(0.5).log() if with_bias else None
    scale = 16 ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    if with_bias:
        logits = logits + bias[:, None, None, :]
    want = attention_score(logits.softmax(-1), 1, kind)
    got = fused_score(q, k, bias, scale, 1, kind)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    # slices of the batch change nothing
    d1, c1 = torch_scores(q, k, bias, scale, chunk_bytes=1)
    d2, c2 = torch_scores(q, k, bias, scale)
    assert torch.allclose(d1, d2) and torch.allclose(c1, c2)


@pytest.mark.parametrize("variant", [v for v in VARIANTS])
@pytest.mark.parametrize("score", ["mixed", "colsum"])
def test_fused_path_selects_as_explicit(variant, score, attention_calls):
    model = make(variant, img_size=96, depth=3)
    x = torch.cat([image(96, seed=s) for s in range(2)])
    out = {}
    traces = {}
    for path in ("explicit", "fused"):
        m = copy.deepcopy(model)
        leanvit.patch(m, "gtp", r=[5, 4, 3], score=score, score_path=path, trace=True)
        before = dict(attention_calls)
        out[path] = run(m, x)
        traces[path] = get_reducer(m).trace_log
        ran = {k: attention_calls[k] - before[k] for k in attention_calls}
        # three reducing blocks: each scores through the path asked for, never both
        assert ran["fused_score"] == (3 if path == "fused" else 0) and ran["explicit"] == (0 if path == "fused" else 3)
    assert torch.allclose(out["fused"], out["explicit"], atol=1e-5), (out["fused"] - out["explicit"]).abs().max()
    for a, b in zip(traces["explicit"], traces["fused"]):
        assert torch.equal(a["kept"], b["kept"]) and torch.equal(a["removed"].sort(1).values,
                                                                 b["removed"].sort(1).values)


def test_auto_is_explicit_on_cpu_and_theta_forces_explicit(attention_calls):
    model = leanvit.patch(make("deit"), "gtp", r=2)
    run(model, image())
    assert attention_calls["fused_score"] == 0 and attention_calls["explicit"] == 2
    model = leanvit.patch(make("deit"), "gtp", r=2, score_path="fused", theta=0.8)
    run(model, image())
    assert attention_calls["fused_score"] == 0 and attention_calls["explicit"] == 4
    with pytest.raises(leanvit.errors.ConfigError, match="score_path"):
        leanvit.patch(make("deit"), "gtp", r=2, score_path="fast")


def test_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from leanvit.ops.fused_score import triton_scores
        torch.manual_seed(0)
        for B, H, N, D, bias in [(2, 3, 17, 64, False), (2, 2, 37, 48, True), (1, 1, 5, 16, False)]:
            q, k = torch.randn(B, H, N, D), torch.randn(B, H, N, D)
            b = torch.rand(B, N).add(0.5).log() if bias else None
            s = D ** -0.5
            logits = (q * s) @ k.transpose(-2, -1) + (b[:, None, None, :] if bias else 0)
            p = logits.softmax(-1)
            d, c = triton_scores(q, k, b, s)
            assert torch.allclose(d, p.diagonal(dim1=-2, dim2=-1), atol=1e-6), (B, H, N, D)
            assert torch.allclose(c, p.sum(-2), atol=1e-5), (B, H, N, D)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
