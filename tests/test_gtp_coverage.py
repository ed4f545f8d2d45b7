"""GTP's ``orphans`` option: removed tokens with no kept neighbour are dropped (the paper), given a fallback edge
(``nearest``) or merged (``merge``). Exactness at r=0, the no-orphan property on a graph checked by hand, token
sizes, batch consistency, the published default unchanged, and the trace that ``leanvit vis`` draws.

Tiny models with random weights (helpers from conftest.py), so the file runs in seconds on one CPU thread.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import VARIANTS, gtp_reference, image, make, run

import leanvit
from leanvit.errors import ConfigError
from leanvit.reduce import get_reducer, gtp
from leanvit.reduce.types import AttnOut, ViTInfo
from leanvit.vis import tokens as vis_tokens

VARIANT_ORPHANS = ("nearest", "merge")


@pytest.mark.parametrize("orphans", VARIANT_ORPHANS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_equals_dense(variant, orphans):
    model = make(variant)
    x = image()
    ref = run(model, x)
    leanvit.patch(model, "gtp", r=0, orphans=orphans)
    assert torch.allclose(run(model, x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["deit", "no_cls_avg", "registers_layerscale"])
def test_default_is_the_published_rule(variant):
    model = make(variant, img_size=96, depth=3)
    x = image(96)
    sched = [4, 3, 5]
    ref = gtp_reference(copy.deepcopy(model), x, sched, 0.3, True)
    outs = {}
    for opts in ({}, {"orphans": "drop"}):
        leanvit.patch(model, "gtp", r=sched, alpha=0.3, **opts)
        outs[len(opts)] = run(model, x)
        assert get_reducer(model).options()["orphans"] == "drop"
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], ref, atol=1e-5), (outs[0] - ref).abs().max()


# ================================================================================ a graph checked by hand
# Six image tokens (a 2x3 grid) and a cls token. Edges, all of weight 1/2: 0-1, 1-2, 2-3 and 4-5. The score removes
# tokens 3, 4 and 5: token 3 keeps its neighbour 2, but 4 and 5 only had each other, so as published both are lost.
# Their most cosine-similar kept tokens are 0 (for 4: by dot product it would be 1) and 1 (for 5).
HAND_X = torch.tensor([[[1.0, 1.0, 1.0],  # cls
                        [1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0],  # kept: 0, 1, 2
                        [1.0, 1.0, 1.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])  # removed: 3, 4, 5
HAND_SCORE = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
ALPHA = 2.0  # alpha x (edge weight 1/2) = 1: propagation along one edge moves a token's whole size


def _hand_graph() -> torch.Tensor:
    g = torch.zeros(6, 6)
    for i, j in ((0, 1), (1, 2), (2, 3), (4, 5)):
        g[i, j] = g[j, i] = 0.5
    return g[None]  # (1, 6, 6)


def _hand_reduce(monkeypatch, orphans: str, prop_attn: bool = True):
    monkeypatch.setattr(gtp, "build_graph", lambda *args, **kw: _hand_graph())
    info = ViTInfo(depth=1, dim=3, num_prefix=1, has_cls=True, grid=(2, 3), num_image=6, global_pool="token",
                   blocks=())
    red = gtp.GTPReducer(info, [3], alpha=ALPHA, prop_attn=prop_attn, orphans=orphans, stats=True, trace=True)
    red.begin(HAND_X)
    out = red.reduce(0, HAND_X, AttnOut(x=HAND_X, score=HAND_SCORE))
    return red, out


@pytest.mark.parametrize("orphans", ("drop",) + VARIANT_ORPHANS)
def test_orphans_on_a_graph_checked_by_hand(monkeypatch, orphans):
    red, out = _hand_reduce(monkeypatch, orphans)
    t = HAND_X[0, 1:]  # image tokens 0..5
    entry = red.trace_log[0]
    assert entry["kept"].tolist() == [[0, 1, 2]] and entry["removed"].tolist() == [[3, 4, 5]]
    # rows: kept tokens 0, 1, 2; columns: removed tokens 3, 4, 5
    graph_edges = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]  # token 3 -> token 2 only
    if orphans == "drop":
        weights = graph_edges
        tokens = [t[0], t[1], t[2] + t[3]]  # x_k + alpha * 0.5 * x_j
        sizes = [1.0, 1.0, 2.0]
    elif orphans == "nearest":
        weights = [[0.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.5, 0.0, 0.0]]  # fallback edges 4 -> 0 and 5 -> 1, weight 1/2
        tokens = [t[0] + t[4], t[1] + t[5], t[2] + t[3]]
        sizes = [2.0, 2.0, 2.0]
    else:  # merge: size-weighted averages with the orphans, after propagation
        weights = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.0]]
        tokens = [(t[0] + t[4]) / 2, (t[1] + t[5]) / 2, t[2] + t[3]]
        sizes = [2.0, 2.0, 2.0]
    assert torch.allclose(entry["weights"], torch.tensor([weights]))
    assert torch.allclose(out[0, 0], HAND_X[0, 0])  # the cls token is never touched
    assert torch.allclose(out[0, 1:], torch.stack(tokens))
    assert torch.allclose(red.current_sizes(), torch.tensor([[1.0, *sizes]]))
    # here GTP's propagation moves whole sizes (alpha x column sum = 1), so the sizes sum to the 6 patches exactly
    # when no removed token is lost; as published, the two orphans' sizes vanish with their features
    assert red.current_sizes()[0, 1:].sum() == (4.0 if orphans == "drop" else 6.0)
    assert int(red.report["lost_tokens"]) == (2 if orphans == "drop" else 0)
    assert int(red.report["removed_tokens"]) == 3
    if orphans == "drop":
        assert "fallback" not in entry
    else:
        assert entry["fallback"].tolist() == [[False, True, True]]


def test_merge_without_token_sizes_averages(monkeypatch):
    red, out = _hand_reduce(monkeypatch, "merge", prop_attn=False)
    t = HAND_X[0, 1:]
    assert torch.allclose(out[0, 1:], torch.stack([(t[0] + t[4]) / 2, (t[1] + t[5]) / 2, t[2] + t[3]]))
    assert red.current_sizes() is None  # no sizes are tracked (and none pool) without prop_attn
    assert int(red.report["lost_tokens"]) == 0


# ================================================================================ real models
def _heavy(model, orphans: str, **kw):
    # heavy removal on a spatial graph orphans many tokens as published
    return leanvit.patch(copy.deepcopy(model), "gtp", r=[17, 9, 5], graph="spatial", alpha=1.0, orphans=orphans,
                         stats=True, trace=True, **kw)


def test_no_token_lost_and_fallback_edges_only_for_orphans():
    model = make("deit", img_size=96, depth=3)
    x = image(96, batch=3)
    reds = {}
    for orphans in ("drop",) + VARIANT_ORPHANS:
        m = _heavy(model, orphans)
        run(m, x)
        reds[orphans] = get_reducer(m)
    assert int(reds["drop"].report["lost_tokens"]) > 0
    published = reds["drop"].trace_log[0]["weights"]  # (B, K, r); block 0 selects alike in every variant
    orphan = published.sum(1) == 0  # (B, r)
    for orphans in VARIANT_ORPHANS:
        red = reds[orphans]
        assert int(red.report["lost_tokens"]) == 0 and int(red.report["removed_tokens"]) == 3 * 31
        for entry in red.trace_log:
            assert (entry["weights"].sum(1) > 0).all()  # every removed token reaches a kept token
        first = red.trace_log[0]
        assert torch.equal(first["fallback"], orphan)
        assert torch.equal(first["weights"] * ~orphan[:, None], published)  # graph edges unchanged
        assert ((first["weights"] > 0).sum(1)[orphan] == 1).all()  # one fallback edge per orphan


@pytest.mark.parametrize("orphans", VARIANT_ORPHANS)
@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("graph", ["semantic", "mixed"])
def test_batch_gives_the_images_alone(orphans, prop_attn, graph):
    model = make("registers_layerscale", img_size=96, depth=3)
    leanvit.patch(model, "gtp", r=[10, 8, 6], alpha=1.5, graph=graph, orphans=orphans, prop_attn=prop_attn)
    x = torch.cat([image(96, batch=1, seed=s) for s in range(3)])
    whole = run(model, x)
    alone = torch.cat([run(model, x[i:i + 1]) for i in range(3)])
    assert torch.isfinite(whole).all()
    assert torch.allclose(whole, alone, atol=1e-5), (whole - alone).abs().max()


@pytest.mark.parametrize("orphans", VARIANT_ORPHANS)
def test_variant_changes_output_and_sizes_grow(orphans):
    model = make("no_cls_avg", img_size=96, depth=3)
    x = image(96)
    published, variant = _heavy(model, "drop"), _heavy(model, orphans)
    assert not torch.allclose(run(published, x), run(variant, x), atol=1e-4)
    sizes = get_reducer(variant).current_sizes()
    assert sizes.shape == (2, 36 - 31) and (sizes >= 1).all()


def test_orphans_option_is_checked():
    model = make("deit")
    with pytest.raises(ConfigError, match="orphans"):
        leanvit.patch(model, "gtp", r=2, orphans="keep")
    with pytest.raises(ConfigError, match="'orphans' of 'gtp' must be a string"):
        leanvit.patch(model, "gtp", r=2, orphans=1)


# ================================================================================ the trace, as drawn
def _drawn(monkeypatch, tmp_path, traces):
    figs = []
    monkeypatch.setattr(vis_tokens, "save_figure", lambda fig, path: figs.append(fig) or path)
    vis_tokens.plot_token_maps(torch.rand(3, 96, 96), traces, (6, 6), tmp_path / "maps.png")
    return figs[0]


def test_vis_draws_variants_from_the_trace_not_the_label(monkeypatch, tmp_path):
    model = make("deit", img_size=96, depth=3)
    x = image(96, batch=1)
    traces = {}
    for label, orphans in (("published", "drop"), ("gtp-nolost", "nearest")):
        m = _heavy(model, orphans)
        run(m, x)
        traces[label] = get_reducer(m).trace_log
    fig = _drawn(monkeypatch, tmp_path, traces)
    axes = fig.axes[:4], fig.axes[4:]  # one row per label: the input, then the three blocks
    for (label, log), row in zip(traces.items(), axes):
        for entry, ax in zip(log, row[1:]):
            marks = [ln for ln in ax.lines if ln.get_marker() in ("o", "x")]
            crosses = sum(ln.get_marker() == "x" for ln in marks)
            cyan = sum(ln.get_color() == "cyan" for ln in ax.lines)
            assert len(marks) == entry["removed"].shape[1]  # every removed token is drawn
            assert crosses == int((entry["weights"][0].sum(0) == 0).sum())  # lost ones as crosses
            assert cyan == int(entry.get("fallback", torch.zeros(1, dtype=torch.bool)).sum())
    assert sum(ln.get_marker() == "x" for ax in axes[0] for ln in ax.lines) > 0
    assert sum(ln.get_marker() == "x" for ax in axes[1] for ln in ax.lines) == 0
    assert sum(ln.get_color() == "cyan" for ax in axes[1] for ln in ax.lines) > 0


@pytest.mark.parametrize("orphans", VARIANT_ORPHANS)
def test_variant_traces_as_one_graph(orphans):
    """Fixed shapes and no host sync: dynamo captures the whole forward (no graph break); the eager backend keeps
    this fast, and the inductor compile of patched models is the slow test in test_reduce.py."""
    model = make("deit", img_size=64, depth=2)
    x = image(64)
    leanvit.patch(model, "gtp", r=[4, 3], orphans=orphans)
    eager = run(model, x)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
