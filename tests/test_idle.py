"""IdleViT (token idling): exactness at keep 1.0, the gathered path against a reference written from the paper's
rules, masked and gathered paths agreeing, re-selection, schedules, budgets, MACs and errors.

Tiny timm models with random weights (helpers from conftest.py), so the file runs in seconds on one thread.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import leanvit
from leanvit.errors import ConfigError, UnsupportedModelError
from leanvit.reduce import METHODS, get_reducer, tokens_per_block
from leanvit.reduce.types import IDLE, KEPT, REACTIVATED
from leanvit.reduce.idle import idle_keep_ratios, idle_schedule
from conftest import VARIANTS, image, make, run

CLS_VARIANTS = [v for v in VARIANTS if v != "no_cls_avg"]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_keep_one_equals_dense(variant, mode):
    """keep=1.0 is the unpatched model, in both modes (dropout and drop-path are off in these models)."""
    model = make(variant)
    x = image()
    getattr(model, mode)()
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "idle", keep=1.0)
        out = model(x)
    assert get_reducer(model).schedule == [0, 0]
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def _reference_idle(model, x: torch.Tensor, keep_tokens: list[int | None]) -> torch.Tensor:
    """IdleViT's inference written from the paper's rules, image by image, on the unpatched timm modules:
    score = cls query . every key (scaled, mean over heads); the top K image tokens and the prefix tokens are
    computed (attention among them only, then the MLP); the others pass through unchanged."""
    P = model.num_prefix_tokens
    outs = []
    for b in range(x.shape[0]):
        t = model._pos_embed(model.patch_embed(x[b:b + 1]))
        t = model.norm_pre(model.patch_drop(t))[0]  # (N, C)
        for blk, K in zip(model.blocks, keep_tokens):
            if K is None:
                t = blk(t[None])[0]
                continue
            a = blk.attn
            H = a.num_heads
            h = blk.norm1(t)
            q, k, v = a.qkv(h).view(len(t), 3, H, -1).permute(1, 2, 0, 3)  # (H, N, Dh) each
            q, k = a.q_norm(q), a.k_norm(k)
            score = ((q[:, 0:1] @ k.transpose(-1, -2)) * a.scale).mean(0)[0]  # (N,)
            top = torch.topk(score[P:], K).indices + P
            sel = torch.cat([torch.arange(P), top])
            att = ((q[:, sel] @ k[:, sel].transpose(-1, -2)) * a.scale).softmax(-1) @ v[:, sel]  # (H, M, Dh)
            o = a.proj(a.norm(att.transpose(0, 1).reshape(len(sel), -1)))
            ts = t[sel] + blk.ls1(o)
            ts = ts + blk.ls2(blk.mlp(blk.norm2(ts)))
            t = t.clone()
            t[sel] = ts
        outs.append(model.forward_head(model.norm(t[None])))
    return torch.cat(outs)


@pytest.mark.parametrize("variant", CLS_VARIANTS)
def test_gather_path_matches_reference(variant):
    model = make(variant, depth=3)
    x = image()
    ref = _reference_idle(copy.deepcopy(model), x, [None, 9, 5])
    leanvit.patch(model, "idle", keep=[1.0, 9 / 16, 5 / 16])
    assert get_reducer(model).schedule == [0, 7, 11]
    out = run(model, x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("variant", CLS_VARIANTS)
def test_masked_path_equals_gather_path(variant):
    """The training path (masking) and the inference path (gather / compute / scatter) give the same logits."""
    model = make(variant, depth=3)
    x = image(batch=3)
    gather = copy.deepcopy(model)
    leanvit.patch(gather, "idle", keep=[1.0, 0.6, 0.3], path="gather")
    leanvit.patch(model, "idle", keep=[1.0, 0.6, 0.3], path="masked")
    a, b = run(gather, x), run(model, x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # auto: masked in training mode (differentiable, records the token-cut inputs), gathered in eval mode
    auto = copy.deepcopy(gather)
    leanvit.patch(auto, "idle", keep=[1.0, 0.6, 0.3])
    auto.train()
    out = auto(x)
    red = get_reducer(auto)
    assert len(red.cut_inputs) == 2
    n = auto.num_prefix_tokens + 16
    for entry, k in zip(red.cut_inputs, (int(16 * 0.6), int(16 * 0.3))):
        assert entry["logits"].shape == (3, n, n) and entry["mask"].shape == (3, n)
        assert entry["mask"].sum(1).eq(k + auto.num_prefix_tokens).all()
        assert entry["mask"][:, :auto.num_prefix_tokens].eq(1).all()
    out.sum().backward()
    assert auto.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0
    auto.eval()
    with torch.no_grad():
        ev = auto(x)
    assert red.cut_inputs == []
    assert torch.allclose(ev, a, atol=1e-5)


def test_idle_tokens_pass_unchanged_and_are_reselected():
    model = make("deit", depth=4, img_size=96)
    x = image(96)
    leanvit.patch(model, "idle", keep=[1.0, 0.4, 0.4, 0.4], trace=True)
    with torch.no_grad():
        model.forward_features(x)
    log = get_reducer(model).trace_log
    assert [int(e["block"]) for e in log] == [1, 2, 3]
    states = torch.stack([e["state"] for e in log])  # (blocks, B, N)
    k = int(36 * 0.4)
    assert (states[0] == KEPT).sum(-1).eq(k).all() and (states[0] == IDLE).sum(-1).eq(36 - k).all()
    assert (states == REACTIVATED).any(), "no token idle in one block was selected again in the next"
    assert [int(e["tokens"]) for e in log] == [k, k, k]


def test_idle_tokens_are_not_touched():
    """A token idle in the last block leaves it exactly as it entered."""
    model = make("deit", depth=2)
    x = image()
    leanvit.patch(model, "idle", keep=[1.0, 0.25])
    captured = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: captured.update(inp=a[0].clone()))
    model.blocks[1].register_forward_hook(lambda m, a, o: captured.update(out=o.clone()))
    with torch.no_grad():
        model.forward_features(x)
    same = (captured["inp"] == captured["out"]).all(-1)  # (B, N) tokens left exactly as they were
    assert same[:, 1:].sum(1).eq(16 - 4).all() and not same[:, 0].any()


def test_default_schedule_three_stages():
    # 12 blocks: dense 1-3, r in 4-6, r^2 in 7-9, r^3 in 10-12 (1-indexed); int(196 * ratio) tokens computed
    ratios = idle_keep_ratios(0.7, 12)
    assert ratios[:3] == [1.0] * 3 and ratios[3:6] == [0.7] * 3
    assert ratios[6:9] == pytest.approx([0.49] * 3) and ratios[9:] == pytest.approx([0.343] * 3)
    assert [196 - s for s in idle_schedule(0.7, 12, 196)] == [196] * 3 + [137] * 3 + [96] * 3 + [67] * 3
    assert [196 - s for s in idle_schedule(0.5, 12, 196)] == [196] * 3 + [98] * 3 + [49] * 3 + [24] * 3
    # other depths: the same stages at 1/4, 1/2, 3/4 of the depth
    assert idle_keep_ratios(0.5, 4) == [1.0, 0.5, 0.25, 0.125]
    model = make("deit", depth=4)
    leanvit.patch(model, "idle", keep=0.5)
    assert tokens_per_block(model) == [17, 9, 5, 3]
    assert get_reducer(model).report["keep"] == 0.5


def test_budget_and_macs():
    from leanvit.analysis import count_macs

    model = make("deit", depth=4, img_size=96)
    dense = count_macs(model).macs
    leanvit.patch(model, "idle", budget=0.7)
    red = get_reducer(model)
    assert red.report["achieved"] <= 0.7 and red.report["macs"] < dense
    assert red.report["achieved"] > 0.6  # the solver finds a keep rate near the budget, not any that fits
    # the gathered path really computes less: measured MACs follow the tokens each block computes
    x = image(96)
    with torch.no_grad():
        run(model, x)
    half = copy.deepcopy(model)
    leanvit.patch(half, "idle", keep=0.5)
    assert count_macs(half).macs < count_macs(model).macs < dense


def test_intermediates_keep_the_grid():
    model = make("deit", depth=3)
    leanvit.patch(model, "idle", keep=0.5)
    x = image()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)  # NCHW works: no token is removed
    assert inter[-1].shape == (2, model.embed_dim, 4, 4)


def test_registry_and_errors():
    assert METHODS["idle"].display == "IdleViT"
    model = make("deit")
    with pytest.raises(ConfigError, match="does not take r="):
        leanvit.patch(model, "idle", r=2)
    with pytest.raises(ConfigError, match="cls token"):
        leanvit.patch(make("no_cls_avg"), "idle", keep=0.5)
    with pytest.raises(ConfigError, match="unknown idle path"):
        leanvit.patch(model, "idle", keep=0.5, path="fast")
    with pytest.raises(ConfigError, match="keep must be"):
        leanvit.patch(model, "idle", keep=1.5)
    with pytest.raises(ConfigError, match="keep must be"):
        leanvit.patch(model, "idle", keep=[0.5, 0.0])
    with pytest.raises(ConfigError, match="entries but the model has 2 blocks"):
        leanvit.patch(model, "idle", keep=[1.0, 0.5, 0.5])
    with pytest.raises(ConfigError, match="'tome' does not take keep="):
        leanvit.patch(model, "tome", keep=0.5)
    shuffle = leanvit.create_model("leanvit_shuffle_fm_e2", pretrained=False) if False else None
    assert shuffle is None


def test_refuses_channel_shuffle_blocks():
    import timm

    import leanvit.models  # noqa: F401  (registers the shuffle family)

    name = next(n for n in timm.list_models("leanvit_shuffle_fm_*"))
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(UnsupportedModelError, match="channel-shuffle"):
        leanvit.patch(model, "idle", keep=0.5)


def test_pickle_and_deepcopy_keep_patch():
    import pickle

    model = make("deit", depth=3)
    leanvit.patch(model, "idle", keep=0.5)
    x = image()
    ref = run(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.allclose(run(clone, x), ref, atol=0)
        assert get_reducer(clone).keep_ratios == get_reducer(model).keep_ratios


def test_selection_uses_cls_query_mean_over_heads():
    """Selection ranks by the head-mean of the scaled cls logits, not by softmax probabilities."""
    model = make("deit", depth=1)
    leanvit.patch(model, "idle", keep=[0.5])
    x = image(batch=1)
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        blk = model.blocks[0]
        a = blk.attn
        q, k, _ = a.qkv(blk.norm1(t)).view(1, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        want = set((((q[:, :, :1] @ k.transpose(-1, -2)) * a.scale).mean(1)[0, 0, 1:].topk(8).indices + 1).tolist())
        model(x)
    assert set(get_reducer(model)._index[0, 1:].tolist()) == want
    assert F is not None


def test_truncate_before_attention_has_idle_token_counts():
    """The ideal of idling: truncation before the attention runs each block on the tokens idling computes."""
    from leanvit.analysis import count_macs

    model = make("deit", depth=4, img_size=96)
    idle, ideal = copy.deepcopy(model), copy.deepcopy(model)
    leanvit.patch(idle, "idle", keep=0.5)
    computed = [36 - s for s in get_reducer(idle).schedule]
    drops = [a - b for a, b in zip([36] + computed[:-1], computed)]
    leanvit.patch(ideal, "truncate", r=drops, point="attn")
    assert tokens_per_block(ideal) == tokens_per_block(idle)
    # idling pays the keys of its idle tokens and the selection on top of the ideal, nothing more
    assert count_macs(ideal).macs < count_macs(idle).macs < count_macs(model).macs
