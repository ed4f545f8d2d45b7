"""Token reduction on timm ViTs: equivalence at r=0, patch/unpatch, reduction counts, budgets, errors, GTP details.

Every model is tiny (64-96 px, depth 2-4, random weights) so the whole file runs in seconds on one CPU thread.
"""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
from conftest import VARIANTS, gtp_reference, image, make, mlp_token_counts, run
from torch import nn

import leanvit
from leanvit.errors import ConfigError, UnsupportedModelError
from leanvit.ops.graph import build_graph
from leanvit.ops.select import attention_score, split_topk
from leanvit.reduce import get_reducer, is_patched, tokens_per_block
from leanvit.reduce.adapters.timm_vit import ReducingBlock
from leanvit.reduce.evit import evit_locations

METHODS = ("gtp", "tome", "evit", "truncate")

# ================================================================================ 1. equivalence at r=0
def _pairs(variants):
    # EViT needs a cls token; its refusal of the no-cls model is tested in test_evit_needs_cls
    return [(v, m) for v in variants for m in METHODS if not (m == "evit" and v == "no_cls_avg")]


@pytest.mark.parametrize("variant, method", _pairs(VARIANTS))
def test_r0_equals_dense(variant, method):
    model = make(variant)
    x = image()
    ref = run(model, x)
    leanvit.patch(model, method, r=0)
    assert is_patched(model) and all(type(b) is ReducingBlock for b in model.blocks)
    out = run(model, x)
    assert out.shape == ref.shape == (2, 10)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_prefix_tokens + 16


def test_distilled_head_averages_in_eval():
    model = make("deit_distilled")
    x = image()
    leanvit.patch(model, "gtp", r=2)
    with torch.no_grad():
        f = model.forward_features(x)
        out = model(x)
        expected = (model.head(f[:, 0]) + model.head_dist(f[:, 1])) / 2
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["deit", "no_cls_avg"])
def test_gtp_sparsification_changes_output(variant):
    """Sanity for the equivalence test: a patch that does change the forward is seen to change it."""
    model = make(variant)
    x = image()
    ref = run(model, x)
    leanvit.patch(model, "gtp", r=0, theta=0.5)
    assert not torch.allclose(run(model, x), ref, atol=1e-3)
    leanvit.patch(model, "gtp", r=0, theta=1.0)
    assert torch.allclose(run(model, x), ref, atol=1e-5)


# ================================================================================ 2. patch / unpatch
@pytest.mark.parametrize("variant", ["deit", "deit_distilled", "no_cls_avg"])
@pytest.mark.parametrize("method", ["gtp", "tome", "truncate"])
def test_unpatch_restores_exactly(variant, method):
    model = make(variant, img_size=96, depth=3)
    x = image(96)
    ref = run(model, x)
    model_cls, block_cls = type(model), [type(b) for b in model.blocks]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dict_keys = set(model.__dict__)
    leanvit.patch(model, method, r=3)
    assert isinstance(model, model_cls)
    assert not torch.allclose(run(model, x), ref, atol=1e-4)  # reduction is active
    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    assert all(torch.equal(patched_state[k], v) for k, v in state.items())
    leanvit.unpatch(model)
    assert type(model) is model_cls
    assert [type(b) for b in model.blocks] == block_cls
    assert set(model.__dict__) == dict_keys
    assert not any(k.startswith("_leanvit") for b in model.blocks for k in b.__dict__)
    assert not is_patched(model) and get_reducer(model) is None
    assert torch.equal(run(model, x), ref)
    assert leanvit.unpatch(model) is model and type(model) is model_cls  # a second unpatch changes nothing


def test_unpatch_unpatched_model_is_a_no_op():
    """Documented: unpatching a model that carries no patch returns it unchanged (idempotent, like ``unpatch``
    twice), so cleanup code need not ask first."""
    model = make("deit")
    x = image()
    ref = run(model, x)
    assert leanvit.unpatch(model) is model and not is_patched(model)
    leanvit.patch(model, "tome", r=2)
    leanvit.unpatch(leanvit.unpatch(model))
    assert type(model).__name__ == "VisionTransformer" and torch.equal(run(model, x), ref)


@pytest.mark.parametrize("method", ["gtp", "tome", "evit"])
def test_pickle_and_deepcopy(method):
    model = make("registers_layerscale", img_size=96, depth=3)
    x = image(96)
    leanvit.patch(model, method, r=3)
    out = run(model, x)  # a forward first: per-forward state must not break pickling
    blob = pickle.dumps(model)
    clone = pickle.loads(blob)
    assert type(clone) is type(model) and is_patched(clone)
    red = get_reducer(clone)
    assert all(b._leanvit_reducer is red for b in clone.blocks)  # one reducer shared by model and blocks
    assert torch.equal(run(clone, x), out)
    dc = copy.deepcopy(model)
    assert get_reducer(dc) is not get_reducer(model)
    assert all(b._leanvit_reducer is get_reducer(dc) for b in dc.blocks)
    assert torch.equal(run(dc, x), out)
    leanvit.unpatch(dc)  # unpatching the copy leaves the original patched
    assert is_patched(model) and torch.equal(run(model, x), out)


def test_patch_twice_replaces():
    x = image(96)
    a = make("deit", img_size=96, depth=3)
    b = copy.deepcopy(a)
    dense = run(a, x)
    leanvit.patch(a, "gtp", r=4)
    leanvit.patch(a, "tome", r=2)
    leanvit.patch(b, "tome", r=2)
    assert get_reducer(a).name == "tome"
    assert all(blk._leanvit_reducer is get_reducer(a) for blk in a.blocks)
    assert torch.equal(run(a, x), run(b, x))
    assert tokens_per_block(a) == [1 + 36 - 2, 1 + 36 - 4, 1 + 36 - 6]
    leanvit.unpatch(a)  # a single unpatch restores the original
    assert not is_patched(a) and torch.equal(run(a, x), dense)


# ================================================================================ 3. reduction happens
@pytest.mark.parametrize("variant, method", _pairs(["deit", "deit_distilled", "registers_layerscale", "no_cls_avg"]))
def test_tokens_removed(variant, method):
    depth = 4
    model = make(variant, img_size=96, depth=depth)
    P = model.num_prefix_tokens
    leanvit.patch(model, method, r=2)
    x = image(96)
    f, counts = mlp_token_counts(model, x)
    assert f.shape == (2, P + 36 - 2 * depth, model.embed_dim)
    expected = [P + 36 - 2 * (i + 1) for i in range(depth)]
    assert counts == expected
    assert tokens_per_block(model) == expected
    # batch size 1 and pre-logits
    f1 = model.forward_features(image(96, batch=1))
    assert f1.shape[1] == P + 36 - 2 * depth
    with torch.no_grad():
        pre = model.forward_head(f, pre_logits=True)
    assert pre.shape == (2, model.embed_dim)
    assert run(model, image(96, batch=1)).shape == (1, 10)


def test_tome_caps_at_half_and_counts():
    model = make("deit", img_size=96, depth=4)
    leanvit.patch(model, "tome", r=[18, 9, 4, 2])  # each block at its cap (half of 36, 18, 9, 5)
    f, counts = mlp_token_counts(model, image(96))
    assert counts == [1 + 18, 1 + 9, 1 + 5, 1 + 3] == tokens_per_block(model)
    with pytest.raises(ConfigError, match="block 1"):
        leanvit.patch(model, "tome", r=[18, 10])


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_gradients(method):
    model = make("registers_layerscale", img_size=96, depth=3)
    leanvit.patch(model, method, r=3)
    model.train()
    out = model(image(96))
    loss = nn.functional.cross_entropy(out, torch.tensor([1, 2]))
    loss.backward()
    g = model.patch_embed.proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert model.cls_token.grad is not None and model.reg_token.grad.abs().sum() > 0


def test_train_mode_distilled_returns_pair_when_distilled_training():
    model = make("deit_distilled", img_size=96, depth=2)
    model.set_distilled_training(True)
    leanvit.patch(model, "tome", r=2)
    model.train()
    a, b = model(image(96))
    (a.sum() + b.sum()).backward()
    assert model.patch_embed.proj.weight.grad is not None


# ================================================================================ 4. prefix tokens
@pytest.mark.parametrize("variant, P", [("deit_distilled", 2), ("registers_layerscale", 5)])
@pytest.mark.parametrize("options", [dict(method="gtp", score="random"), dict(method="gtp"),
                                     dict(method="tome"), dict(method="evit"), dict(method="evit", fuse=None),
                                     dict(method="truncate")])
def test_prefix_tokens_never_reduced(variant, P, options):
    """Registers or dist token: every reduction step hands the prefix tokens through bit for bit and only ever
    removes image tokens; the provenance trace covers only image tokens."""
    options = dict(options)
    method = options.pop("method")
    arch_model = make(variant, img_size=96, depth=3)
    assert arch_model.num_prefix_tokens == P
    leanvit.patch(arch_model, method, r=4, trace=True, **options)
    red = get_reducer(arch_model)
    orig = red._reduce
    seen = []

    def checked(i, x, attn, r):
        y = orig(i, x, attn, r)
        assert torch.equal(y[:, :P], x[:, :P])
        assert y.shape[1] == x.shape[1] - r
        seen.append(i)
        return y

    red._reduce = checked
    for seed in range(4):
        f = arch_model.forward_features(image(96, seed=seed))
        assert f.shape[1] == P + 36 - 12
    assert seen == [0, 1, 2] * 4
    if method != "truncate":
        log = red.trace_log
        assert [int(e["block"]) for e in log] == [0, 1, 2]
        for j, e in enumerate(log):
            assert e["source"].shape == (2, 36 - 4 * (j + 1), 36)
            assert e["source"].any(-1).all()  # every token stands for at least one patch
        if method == "tome" or (method == "evit" and options.get("fuse", "mean")):
            # nothing is lost: every patch is represented by some token
            assert log[-1]["source"].any(1).all()
        if method == "tome":
            assert (log[-1]["source"].sum(1) == 1).all()  # each patch in exactly one group


# ================================================================================ 5. budgets and errors
def budget_model():
    return make("deit", img_size=96, depth=4)


@pytest.mark.parametrize("method", ["gtp", "tome", "evit", "truncate"])
@pytest.mark.parametrize("budget", [0.9, 0.6])
def test_budget_reached(method, budget):
    model = budget_model()
    leanvit.patch(model, method, budget=budget)
    rep = get_reducer(model).report
    assert rep["budget"] == budget and rep["method"] == method
    assert budget - 0.15 < rep["achieved"] <= budget + 1e-9
    from leanvit.analysis import count_macs

    assert count_macs(model).macs == rep["macs"]
    assert rep["macs"] / rep["dense_macs"] == pytest.approx(rep["achieved"])
    assert sum(rep["schedule"]) > 0 and rep["schedule"] == get_reducer(model).schedule


@pytest.mark.parametrize("budget", [0.9, 0.6])
def test_budget_same_schedule_tome_truncate(budget):
    a, b = budget_model(), budget_model()
    leanvit.patch(a, "tome", budget=budget)
    leanvit.patch(b, "truncate", budget=budget)
    assert get_reducer(a).schedule == get_reducer(b).schedule


def test_budget_never_returns_silently_unpatched(monkeypatch):
    """If the measured MACs never fit the budget the patch must fail loudly, not return a dense model."""
    import leanvit.reduce.adapters.base as adapter_base

    model = budget_model()
    monkeypatch.setattr(adapter_base, "count_macs", lambda m, *a: type("R", (), {"macs": 1_000_000})())  # a method whose work eats every saving
    try:
        leanvit.patch(model, "gtp", budget=0.99)
    except ConfigError:
        return
    assert is_patched(model)
    assert get_reducer(model).report["achieved"] <= 0.99


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="gtp", budget=0.0), "budget"),
    (dict(method="gtp", budget=1.5), "budget"),
    (dict(method="gtp", r=[100]), "block 0"),  # an int r is capped per block; a list is strict
    (dict(method="truncate", r=[2, 2, 2, 40]), "block 3"),
    (dict(method="tome", r=[19]), "block 0"),
    (dict(method="nope", r=1), "gtp, tome, evit, idle, truncate"),
    (dict(method="gtp", r=1, foo=1), "foo"),
    (dict(method="gtp", r=1, budget=0.8), "exactly one"),
    (dict(method="gtp"), "exactly one"),
    (dict(method="gtp", keep=0.7), "keep"),
    (dict(method="gtp", r=1, graph="nope"), "graph"),
    (dict(method="gtp", r=1, score="nope"), "score"),
    (dict(method="gtp", r=1, theta=0.0), "theta"),
    (dict(method="gtp", r=1, alpha=-1.0), "alpha"),
    (dict(method="evit", r=1, fuse="max"), "fuse"),
    (dict(method="evit", keep=1.5), "keep"),
    (dict(method="gtp", r=(2, 3.0)), "inflection"),
])
def test_config_errors(kwargs, match):
    model = budget_model()
    x = image(96)
    ref = run(model, x)
    kwargs = dict(kwargs)
    with pytest.raises(ConfigError, match=match):
        leanvit.patch(model, kwargs.pop("method"), **kwargs)
    assert not is_patched(model) and torch.equal(run(model, x), ref)


def test_evit_needs_cls():
    model = make("no_cls_avg")
    with pytest.raises(ConfigError, match="cls"):
        leanvit.patch(model, "evit", r=1)
    with pytest.raises(ConfigError, match="cls"):
        leanvit.patch(model, "gtp", r=1, score="cls")
    assert not is_patched(model)


@pytest.mark.parametrize("fuse", ["mean", None])
def test_evit_keep_rate(fuse):
    depth = 4
    model = make("deit", img_size=96, depth=depth)
    leanvit.patch(model, "evit", keep=0.7, fuse=fuse)
    sched = get_reducer(model).schedule
    locs = evit_locations(depth)
    assert len(locs) == 3
    assert [i for i, r in enumerate(sched) if r] == locs
    n = 36
    for loc in locs:
        left = math.ceil(0.7 * n)
        n_new = left + (1 if fuse else 0)
        assert sched[loc] == n - n_new
        n = n_new
    f = model.forward_features(image(96))
    assert f.shape[1] == 1 + n
    assert evit_locations(12) == [3, 6, 9]


def test_tokens_per_block_dense():
    model = make("registers_layerscale", img_size=96, depth=3)
    assert tokens_per_block(model) == [5 + 36] * 3


# ================================================================================ 6. unsupported models
def _vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    return VisionTransformer(**{**args, **kw})


def _unsupported():
    from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock

    return {
        "resnet": lambda: timm.create_model("resnet18", pretrained=False, num_classes=4),
        "sequential": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()),
        "res_post_block": lambda: _vit(block_fn=ResPostBlock),
        "parallel_scaling_block": lambda: _vit(block_fn=ParallelScalingBlock),
    }


@pytest.mark.parametrize("name", ["resnet", "sequential", "res_post_block", "parallel_scaling_block"])
@pytest.mark.parametrize("amount", [dict(r=1), dict(budget=0.8)])
def test_unsupported_models(name, amount):
    model = _unsupported()[name]()
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keys = set(model.__dict__)
    with pytest.raises(UnsupportedModelError) as e:
        leanvit.patch(model, "gtp", **amount)
    msg = str(e.value)
    assert "cannot patch" in msg and type(model).__name__ in msg and "Supported" in msg
    assert [type(m) for m in model.modules()] == classes
    assert set(model.__dict__) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedModelError):
        leanvit.reduce.inspect_vit(model)


def test_unsupported_message_names_reason():
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        leanvit.patch(_unsupported()["res_post_block"](), "tome", r=1)
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        leanvit.patch(nn.Linear(2, 2), "tome", r=1)


@pytest.mark.parametrize("method", ["gtp", "tome", "evit"])
def test_dynamic_img_size_model_at_native_size(method):
    """dynamic_img_size models work at their native size and fail clearly at another size."""
    model = _vit(img_size=64, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, method, r=0)
        assert torch.allclose(model(x), ref, atol=1e-5)
        leanvit.patch(model, method, r=1)
        assert model.forward_features(x).shape[1] == model.num_prefix_tokens + 16 - 2
        with pytest.raises(UnsupportedModelError, match="native size"):
            model(torch.randn(1, 3, 96, 96))


# ================================================================================ 7. GTP specifics


@pytest.mark.parametrize("variant", ["deit", "no_cls_avg", "registers_layerscale"])
@pytest.mark.parametrize("alpha, prop_attn, graph", [(0.0, False, "mixed"), (0.3, False, "mixed"),
                                                    (0.3, True, "mixed"), (0.3, True, "spatial")])
def test_gtp_matches_reference(variant, alpha, prop_attn, graph):
    model = make(variant, img_size=96, depth=3)
    x = image(96)
    sched = [4, 3, 5]
    ref = gtp_reference(copy.deepcopy(model), x, sched, alpha, prop_attn, graph=graph)
    leanvit.patch(model, "gtp", r=sched, alpha=alpha, prop_attn=prop_attn, graph=graph)
    out = run(model, x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("variant", ["deit", "registers_layerscale"])
@pytest.mark.parametrize("graph", ["semantic", "mixed"])
def test_gtp_cls_score_on_fused_attention_matches_reference(variant, graph, attention_calls):
    """The cls score is computed beside fused attention (no explicit map); it must select as the map would."""
    model = make(variant, img_size=96, depth=3)
    x = torch.cat([image(96, seed=s) for s in range(2)])
    sched = [4, 3, 5]
    ref = gtp_reference(copy.deepcopy(model), x, sched, 0.3, True, graph=graph, score="cls")
    leanvit.patch(model, "gtp", r=sched, alpha=0.3, graph=graph, score="cls")
    out = run(model, x)
    assert attention_calls["explicit"] == 0 and attention_calls["fused"] == 3 and attention_calls["cls_row"] == 3
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("theta", [1.0, 0.8])
def test_gtp_scored_attention_in_slices_matches_whole_batch(monkeypatch, theta):
    """On CPU the attention map is computed and scored a slice of the batch at a time; slices must not change
    anything (one image per slice here, against the whole batch at once)."""
    from leanvit.reduce import attention as compat

    model = make("registers_layerscale", img_size=96, depth=3)
    x = torch.cat([image(96, seed=s) for s in range(3)])
    leanvit.patch(model, "gtp", r=[4, 3, 5], alpha=0.3, theta=theta)
    whole = run(model, x)
    monkeypatch.setattr(compat, "CPU_PROBS_CHUNK_BYTES", 1)
    sliced = run(model, x)
    assert torch.allclose(whole, sliced, atol=1e-5), (whole - sliced).abs().max()
    assert torch.allclose(sliced[:2], run(model, x[:2]), atol=1e-5)


def test_gtp_alpha_matters_and_lost_tokens():
    model = make("deit", img_size=96, depth=3)
    x = image(96)
    outs = {}
    for alpha in (0.0, 0.4):
        leanvit.patch(model, "gtp", r=6, alpha=alpha, stats=True)
        outs[alpha] = run(model, x)
        rep = get_reducer(model).report
        lost = int(rep["lost_tokens"])
        assert 0 <= lost <= int(rep["removed_tokens"]) == 2 * 18
    assert not torch.allclose(outs[0.0], outs[0.4], atol=1e-4)
    # a spatial graph with heavy removal loses tokens whose neighbours were all removed before
    leanvit.patch(model, "gtp", r=[17, 9, 5], graph="spatial", score="random", stats=True)
    for seed in range(3):
        torch.manual_seed(seed)
        model(image(96, seed=seed))
    rep = get_reducer(model).report
    assert int(rep["removed_tokens"]) == 3 * 2 * 31 and 0 <= int(rep["lost_tokens"]) <= 3 * 2 * 31
    # without stats nothing is counted and the report has no counters
    leanvit.patch(model, "gtp", r=6)
    model(x)
    assert "removed_tokens" not in get_reducer(model).report and get_reducer(model).stats_summary() == {}
    # with budget=, the MACs-counting forward is not counted: the counters start at zero
    leanvit.patch(model, "gtp", budget=0.7, stats=True)
    assert int(get_reducer(model).report["removed_tokens"]) == 0
    model(x)
    summary = get_reducer(model).stats_summary()
    assert summary["removed_tokens"] == 2 * sum(get_reducer(model).schedule)
    assert 0.0 <= summary["lost_token_fraction"] <= 1.0


@pytest.mark.parametrize("graph", ["spatial", "semantic", "mixed"])
@pytest.mark.parametrize("score", ["mixed", "mixed_mean", "cls", "colsum", "diag", "random"])
def test_gtp_graphs_and_scores_run(graph, score):
    model = make("deit", img_size=96, depth=2)
    leanvit.patch(model, "gtp", r=5, graph=graph, score=score, k=4, theta=0.9)
    out = run(model, image(96))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert model.forward_features(image(96)).shape[1] == 1 + 36 - 10


def test_gtp_random_score_varies_and_prefix_count_stable():
    model = make("registers_layerscale", img_size=96, depth=2)
    leanvit.patch(model, "gtp", r=5, score="random")
    x = image(96)
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        f = model.forward_features(x)
        assert f.shape[1] == 5 + 36 - 10
        outs.append(f)
    assert not torch.allclose(outs[0], outs[1])


# ================================================================================ 8. CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_r0_equals_dense_cuda(method):
    model = make("registers_layerscale").cuda()
    x = image().cuda()
    ref = run(model, x)
    leanvit.patch(model, method, r=0)
    assert torch.allclose(run(model, x), ref, atol=1e-5)
    leanvit.patch(model, method, r=2)
    out = run(model, x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gtp", "tome", "evit"])
def test_patched_model_compiles(method):
    """torch.compile of a patched model (the way to remove per-op overhead at batch 1) gives the eager output."""
    model = make("deit", img_size=64, depth=2)
    x = image(64)
    leanvit.patch(model, method, r=[4, 3])
    eager = run(model, x)
    with torch.no_grad():
        compiled = torch.compile(model)(x)
    assert torch.allclose(compiled, eager, atol=1e-4), (compiled - eager).abs().max()


# ================================================================================ heads and input sizes
@pytest.mark.parametrize("method", ["gtp", "tome", "evit"])
def test_attention_pool_head_patches_by_budget(method):
    """SigLIP-style attention pooling (global_pool="map"): MACs are counted and the budget is solved."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10,
                              global_pool="map").eval()
    x = image(64)
    dense = run(model, x)
    leanvit.patch(model, method, r=0)
    assert torch.allclose(run(model, x), dense, atol=1e-5)
    leanvit.patch(model, method, budget=0.7)
    rep = get_reducer(model).report
    assert rep["achieved"] <= 0.7 and sum(rep["schedule"]) > 0
    assert run(model, x).shape == (2, 10)


@pytest.mark.parametrize("method", list(METHODS))
def test_r0_on_dynamic_img_size_takes_other_sizes(method):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10,
                              dynamic_img_size=True).eval()
    x = image(96)  # not the 64x64 the model was built for
    dense = run(model, x)
    leanvit.patch(model, method, r=0)
    assert torch.allclose(run(model, x), dense, atol=1e-5)
    leanvit.patch(model, method, r=2)  # a reducing schedule was solved for the native grid: refused clearly
    with pytest.raises(UnsupportedModelError, match="native size"):
        run(model, x)


def test_patch_checks_option_types():
    model = make("deit")
    for kwargs, msg in ((dict(budget="0.7"), "budget must be a number"), (dict(r=2, alpha="abc"), "'alpha'"),
                        (dict(r=2, k=2.5), "'k' of 'gtp' must be an integer"),
                        (dict(r=2, prop_attn="maybe"), "true or false"), (dict(keep=1.5), "keep must be")):
        with pytest.raises(ConfigError, match=msg):
            leanvit.patch(model, "gtp", **kwargs)
    assert not is_patched(model)
    leanvit.patch(model, "gtp", r=2, alpha=1)  # an int where a float is declared is fine
    assert get_reducer(model).alpha == 1.0
