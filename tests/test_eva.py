"""timm's Eva family (EVA-02 and other RoPE ViTs): every method on tiny Eva models with random weights.

Zero reduction is the unpatched model; unpatch is exact and patched models pickle and compile; a reduced forward
rotates every token by its own grid position (truncation against a forward written by hand on timm's modules, in
float64); ToMe's merged token keeps its destination's position, EViT's and GTP's kept tokens their own; idling's
gathered path equals its masked path; size-weighted pooling; budgets; refusals.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva, EvaBlockPostNorm

import leanvit
from leanvit.errors import ConfigError, UnsupportedModelError
from leanvit.reduce import get_reducer
from leanvit.analysis.macs import count_macs
from leanvit.reduce.adapters import find_adapter
from leanvit.reduce.adapters.eva import EvaAdapter, ReducedEva, ReducingEvaBlock, RotaryAttentionView

IMG = 32  # 4x4 patches of 8 pixels: 16 image tokens
BASE = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
EVA02 = dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(3, 3))
VARIANTS = {
    # EVA-02: cls token, RoPE ('cat', rescaled to a reference grid), SwiGLU with a norm, average pooling
    "cls_rope": dict(EVA02, global_pool="avg"),
    # no cls token, separate q/k/v projections, GluMlp (SwiGLU without norm), average pooling
    "no_cls_avg": dict(mlp_ratio=2.0, swiglu_mlp=True, use_rot_pos_emb=True, class_token=False, global_pool="avg",
                       qkv_fused=False),
    # cls + 2 registers, LayerScale, Mlp, per-block per-head frequencies ('mixed'), cls pooling
    "registers": dict(num_reg_tokens=2, init_values=0.1, use_rot_pos_emb=True, rope_type="mixed",
                      global_pool="token"),
    # DINOv3-style: timm's AttentionRope, registers, LayerScale, q/k norm, half-layout rotation
    "dinov3": dict(attn_type="rope", num_reg_tokens=1, init_values=0.1, qk_norm=True, use_rot_pos_emb=True,
                   rope_type="dinov3", rope_rotate_half=True, global_pool="token"),
    # interleaved multimodal RoPE (half-layout rotation), separate projections with biases, max pooling
    "mrope": dict(use_rot_pos_emb=True, rope_type="mrope", qkv_fused=False, global_pool="max"),
    # post-norm blocks, attention inner norm, attention-pool head (and an output gate on the attention, see make)
    "post_norm_map": dict(EVA02, use_post_norm=True, scale_attn_inner=True, global_pool="map"),
    # EVA (1): absolute position embedding only, no rotary attention
    "no_rope": dict(global_pool="avg"),
}
CLS_VARIANTS = [v for v in VARIANTS if v != "no_cls_avg"]
METHODS = {"gtp": dict(r=0), "tome": dict(r=0), "evit": dict(r=0), "idle": dict(keep=1.0), "truncate": dict(r=0)}


def make(variant: str = "cls_rope", **kw) -> Eva:
    torch.manual_seed(0)
    args = {**BASE, **VARIANTS[variant], **kw}
    model = Eva(**args).eval()
    if variant == "post_norm_map":  # Eva does not pass gated_attn to its blocks: the gate timm's attention has
        for blk in model.blocks:
            blk.attn.gate = nn.Linear(BASE["embed_dim"], BASE["embed_dim"])
    with torch.no_grad():  # the tiny head is initialised near zero; give the logits a scale
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
        model.head.weight.normal_(0, 0.2)
    return model


def image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# ------------------------------------------------------------------------------------------ zero reduction
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_reduction_is_the_unpatched_model(variant, method):
    model = make(variant)
    x = image()
    ref = run(model, x)
    if method in ("evit", "idle") and variant == "no_cls_avg":  # both select by the cls token: one clear refusal
        with pytest.raises(ConfigError, match="cls token"):
            leanvit.patch(model, method, **({"r": 2} if method == "evit" else {"keep": 0.5}))
        if method == "evit":
            return
    leanvit.patch(model, method, **METHODS[method])
    assert type(model) is ReducedEva and get_reducer(model).info.rotary == (variant != "no_rope")
    out = run(model, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_reduces(variant):
    """A reducing schedule runs on every variant and every method that applies, and changes the output."""
    x = image()
    ref = run(make(variant), x)
    for method in METHODS:
        if method in ("evit", "idle") and variant == "no_cls_avg":
            continue
        model = make(variant)
        leanvit.patch(model, method, **({"keep": 0.5} if method == "idle" else {"r": 3}))
        out = run(model, x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, ref, atol=1e-4), method


# ------------------------------------------------------------------------------------------ unpatch, pickle, compile
@pytest.mark.parametrize("variant", ["cls_rope", "post_norm_map"])
def test_unpatch_restores_exactly_and_pickles(variant):
    model = make(variant)
    x = image()
    ref = run(model, x)
    keys = list(model.state_dict())
    blocks = [type(b) for b in model.blocks]
    leanvit.patch(model, "tome", r=3)
    assert list(model.state_dict()) == keys
    out = run(model, x)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is ReducedEva and type(clone.blocks[0]).__name__.startswith("Reducing")
    assert torch.equal(run(clone, x), out)
    leanvit.unpatch(model)
    assert type(model) is Eva and [type(b) for b in model.blocks] == blocks
    assert all(not k.startswith("_leanvit") for m in [model, *model.blocks] for k in m.__dict__)
    assert torch.equal(run(model, x), ref)
    assert torch.equal(run(leanvit.unpatch(clone), x), ref)


@pytest.mark.parametrize("method", ["tome", "idle"])
def test_compiles_as_one_graph(method):
    model = make("registers")
    x = image()
    leanvit.patch(model, method, **({"keep": 0.5} if method == "idle" else {"r": 3}))
    eager = run(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(x)
    assert torch.allclose(out, eager, atol=1e-5), (out - eager).abs().max()


# ------------------------------------------------------------------------------------------ rotary positions
@torch.no_grad()
def truncated_by_hand(model: Eva, x: torch.Tensor, schedule: list[int], before_attn: bool) -> torch.Tensor:
    """Eva's forward on its own modules, dropping the last ``schedule[i]`` image tokens in block i (after the
    attention residual, or before the attention), each block's attention given the rotary rows of the positions
    still present (the first ``n``: truncation keeps the grid's head)."""
    t, rope = model._pos_embed(model.patch_embed(x))
    t = model.norm_pre(t)
    P = model.num_prefix_tokens
    for i, (blk, r) in enumerate(zip(model.blocks, schedule)):
        table = rope[i] if model.rope_mixed else rope  # (N, D) or (H, N, D) for the mixed rope
        if before_attn and r:
            t = t[:, : t.shape[1] - r]
        n = t.shape[1] - P
        rows = table[..., :n, :]  # the kept tokens' own positions
        if isinstance(blk, EvaBlockPostNorm):
            t = t + blk.norm1(blk.attn(t, rope=rows))
        else:
            a = blk.attn(blk.norm1(t), rope=rows)
            t = t + (a if blk.gamma_1 is None else blk.gamma_1 * a)
        if not before_attn and r:
            t = t[:, : t.shape[1] - r]
        if isinstance(blk, EvaBlockPostNorm):
            t = t + blk.norm2(blk.mlp(t))
        else:
            m = blk.mlp(blk.norm2(t))
            t = t + (m if blk.gamma_2 is None else blk.gamma_2 * m)
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("variant", ["cls_rope", "no_cls_avg", "registers", "dinov3", "mrope", "post_norm_map"])
@pytest.mark.parametrize("point", ["mlp", "attn"])
def test_each_token_is_rotated_by_its_own_position(variant, point):
    model = make(variant).double()
    x = image().double()
    schedule = [3, 4, 2]
    ref = truncated_by_hand(model, x, schedule, before_attn=point == "attn")
    leanvit.patch(model, "truncate", r=schedule, point=point)
    out = run(model, x)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0), (out - ref).abs().max()


class _Positions:
    """A stand-in reducer whose tokens sit at given grid positions."""

    def __init__(self, info, pos):
        self.info, self.pos = info, pos

    def token_positions(self):
        return self.pos


@pytest.mark.parametrize("variant", ["cls_rope", "registers", "dinov3", "mrope"])
def test_rotation_follows_tokens_that_moved(variant):
    """Tokens shuffled in the sequence are rotated as they were at their grid positions (and a subset of them,
    idling's gathered queries, too); prefix tokens are not rotated."""
    model = make(variant).double()
    info = EvaAdapter().inspect(model)
    P, N = info.num_prefix, info.num_image
    _, rope = model._pos_embed(model.patch_embed(image().double()))
    rope = rope[1] if model.rope_mixed else rope
    attn = model.blocks[1].attn
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, attn.num_heads, P + N, attn.head_dim, generator=g, dtype=torch.float64)
    dense = RotaryAttentionView(attn, _Positions(info, None), rope).rotate(t)
    timm_rot = torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], rope, half=attn.rotate_half)], dim=2)
    assert torch.equal(dense, timm_rot)
    perm = torch.stack([torch.randperm(N, generator=g)[:11] for _ in range(2)])  # (B, 11) tokens kept, shuffled
    pos = torch.cat([torch.full((2, P), N), perm], dim=1)  # (B, P + 11)
    moved = torch.cat([t[:, :, :P], torch.stack([t[b, :, P + perm[b]] for b in range(2)])], dim=2)
    want = torch.cat([t[:, :, :P], torch.stack([timm_rot[b, :, P + perm[b]] for b in range(2)])], dim=2)
    view = RotaryAttentionView(attn, _Positions(info, pos), rope)
    assert torch.allclose(view.rotate(moved), want, atol=1e-12, rtol=0)
    index = torch.tensor([[0, P + 3, P + 7], [0, P + 10, P]])  # (B, 3): cls and two image tokens each
    sub = view.rotate(moved.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])), index)
    assert torch.allclose(sub, want.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])),
                          atol=1e-12, rtol=0)
    # rotating by the place in the sequence instead would not match: the check can fail
    in_order = torch.cat([torch.full((2, P), N), torch.arange(11).expand(2, -1)], dim=1)
    assert not torch.allclose(RotaryAttentionView(attn, _Positions(info, in_order), rope).rotate(moved), want,
                              atol=1e-6)


def _holders(red, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The current tokens' grid positions ``(B, n)`` and the patches each holds ``(B, n, N)`` after a forward."""
    pos = red.token_positions()
    return pos[:, P:], red.trace_log[-1]["source"]


def test_tome_merged_token_keeps_its_destinations_position():
    model = make("registers")
    P = model.num_prefix_tokens  # 3: cls, 2 registers
    leanvit.patch(model, "tome", r=[6, 0, 0], trace=True)
    run(model, image())
    red = get_reducer(model)
    pos, source = _holders(red, P)
    assert pos.shape == source.shape[:2] == (2, 16 - 6)
    merged = 0
    for b in range(2):
        for j in range(pos.shape[1]):
            members = source[b, j].nonzero().flatten().tolist()
            # the token continues its bipartite destination: the one of its patches in set B (odd sequence index)
            dest = [m for m in members if (P + m) % 2 == 1]
            assert pos[b, j].item() == (members[0] if len(members) == 1 else dest[0])
            assert len(members) == 1 or len(dest) == 1
            merged += len(members) > 1
    assert merged > 0
    assert (red.token_positions()[:, :P] == 16).all()  # prefix tokens: no position


@pytest.mark.parametrize("method", ["evit", "gtp"])
def test_kept_tokens_keep_their_own_position(method):
    model = make("cls_rope")
    leanvit.patch(model, method, r=[5, 0, 0], trace=True)
    run(model, image())
    red = get_reducer(model)
    pos = red.token_positions()[:, 1:]
    state = red.trace_log[-1]["state"]  # (B, N): what happened to every patch
    kept_patches = [sorted((state[b] == 0).nonzero().flatten().tolist()) for b in range(2)]
    for b in range(2):
        own = [p for p in pos[b].tolist() if p != 16]
        assert sorted(own) == kept_patches[b]
    if method == "evit":  # the fused token, last: no grid position
        assert (pos[:, -1] == 16).all() and pos.shape[1] == 16 - 5


def test_idle_gather_path_equals_masked_path():
    model = make("cls_rope", depth=4)
    x = image()
    gather = copy.deepcopy(model)
    leanvit.patch(gather, "idle", keep=[1.0, 0.6, 0.4, 0.3], path="gather")
    leanvit.patch(model, "idle", keep=[1.0, 0.6, 0.4, 0.3], path="masked")
    a, b = run(gather, x), run(model, x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, run(leanvit.unpatch(model), x), atol=1e-4)


# ------------------------------------------------------------------------------------------ pooling, budgets
@pytest.mark.parametrize("variant", ["cls_rope", "post_norm_map"])
def test_pooling_weights_a_token_by_its_size(variant):
    """Average and attention pooling see a token of size 2 as two copies of it."""
    model = make(variant)
    leanvit.patch(model, "tome", r=2)
    red = get_reducer(model)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 1 + 4, 32, generator=g)  # cls + 4 image tokens
    dup = torch.cat([t, t[:, 2:3]], dim=1)  # image token 1 twice
    red._size = torch.tensor([[1.0, 1, 2, 1, 1]] * 2)
    weighted = model.pool(t)
    red._size = None
    with torch.no_grad():
        assert torch.allclose(weighted, model.pool(dup), atol=1e-6)
        assert not torch.allclose(weighted, model.pool(t), atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_budget_is_met_at_the_models_own_input_size(method):
    model = make("cls_rope")
    leanvit.patch(model, method, budget=0.75)
    report = get_reducer(model).report
    dense = count_macs(make("cls_rope"), (3, IMG, IMG)).macs
    assert report["dense_macs"] == dense
    assert 0.6 < report["achieved"] <= 0.75
    assert run(model, image()).shape == (2, 5)


# ------------------------------------------------------------------------------------------ refusals
def test_claims_eva_only_and_refuses_what_would_be_wrong():
    model = make("cls_rope")
    assert isinstance(find_adapter(model), EvaAdapter)
    x = image()
    leanvit.patch(model, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="attention masks"):
        with torch.no_grad():
            model.forward_features(x, attn_mask=torch.zeros(1, 1, 17, 17))
    leanvit.unpatch(model)

    class MyEva(Eva):
        pass

    sub = make("cls_rope")
    sub.__class__ = MyEva
    with pytest.raises(UnsupportedModelError, match="subclass of timm's Eva"):
        leanvit.patch(sub, "tome", r=2)
    gqa = make("cls_rope", attn_type="rope", qkv_fused=False, num_kv_heads=1)
    with pytest.raises(UnsupportedModelError, match="grouped-query"):
        leanvit.patch(gqa, "tome", r=2)
    model = make("post_norm_map")
    model.attn_pool.pos_embed = nn.Parameter(torch.zeros(17, 32))
    with pytest.raises(UnsupportedModelError, match="position embedding"):
        leanvit.patch(model, "tome", r=2)


def test_refuses_training_forwards_that_would_run_differently():
    model = make("cls_rope", patch_drop_rate=0.25)
    leanvit.patch(model, "tome", r=2)
    run(model, image())  # eval: patch dropout is off
    model.train()
    with pytest.raises(UnsupportedModelError, match="patch dropout"):
        model(image())
    model = make("cls_rope").train()
    leanvit.patch(model, "gtp", r=2)
    model.set_grad_checkpointing(True)
    with pytest.raises(UnsupportedModelError, match="gradient checkpointing"):
        model(image())
    model.set_grad_checkpointing(False)
    model(image()).sum().backward()  # training through a patched Eva works
    assert model.blocks[0].attn.proj.weight.grad is not None
    assert type(model.blocks[0]) is ReducingEvaBlock


def test_forward_intermediates():
    model = make("cls_rope")
    leanvit.patch(model, "tome", r=2)
    with torch.no_grad():
        with pytest.raises(UnsupportedModelError, match="NCHW"):
            model.forward_intermediates(image())
        _, feats = model.forward_intermediates(image(), output_fmt="NLC")
    assert [f.shape[1] for f in feats] == [14, 12, 10]
    leanvit.patch(model, "tome", r=2, restore=True)
    with torch.no_grad():
        _, feats = model.forward_intermediates(image())
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 4)] * 3


def test_features_only_wrapper_gives_the_grid_back():
    """timm's features_only wrapper of an Eva (``FeatureGetterNet``) is patched through this adapter, its maps at
    full size (the grid restored), and unpatches exactly."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, features_only=True, img_size=IMG,
                              patch_size=8, embed_dim=32, depth=3, num_heads=2, out_indices=(1, 2)).eval()
    x = image()
    ref = run(model, x)
    leanvit.patch(model, "tome", r=0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(run(model, x), ref))
    leanvit.patch(model, "tome", r=3)
    out = run(model, x)
    assert [o.shape for o in out] == [r.shape for r in ref] and get_reducer(model).info.rotary
    leanvit.unpatch(model)
    assert all(torch.equal(a, b) for a, b in zip(run(model, x), ref))
