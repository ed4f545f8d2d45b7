"""ToMe exactly as the authors' timm patch, and ToMe's per-block cap of an int ``r`` for every method.

1. ``tome`` against a reference written here from the paper (Bolya et al., ICLR 2023) and the rules of the
   authors' timm patch (facebookresearch/ToMe, ``tome/merge.py``, ``tome/patch/timm.py``), one image at a time with
   plain loops and the model's own layers, nothing of leanvit: logits, features, sizes and merge groups in float64.
2. An int ``r`` (and ``(r, inflection)``) is capped per block at half the image tokens that reach the block, for
   every method that takes ``r``; the reported schedule is the one that runs; a per-block list stays strict.

Tiny random DeiTs (width 48) keep it fast; the ``r=16`` cases use DeiT-B's 224 px, 14 x 14 grid and 12 blocks.
"""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import mlp_token_counts
from torch import nn

import leanvit
from leanvit.errors import ConfigError
from leanvit.ops.schedule import cap_schedule
from leanvit.reduce import get_reducer, tokens_per_block
from leanvit.reduce.types import KEPT, MERGED

ARCHS = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
    "no_cls_avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
}


def make(arch: str = "deit", img_size: int = 96, depth: int = 4, dtype=torch.float64) -> nn.Module:
    name, over = ARCHS[arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=img_size, depth=depth, embed_dim=48, num_heads=3,
                              num_classes=10, **over)
    return model.to(dtype).eval()


def images(img_size: int, batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, img_size, img_size, generator=g).to(dtype)


# ================================================================================ 1. the reference
def tome_merge(x, keys, size, groups, r, protected, sort_kept):
    """One ToMe step on one image's tokens ``x`` (T, C), as the paper and the authors' ``bipartite_soft_matching``.

    The tokens alternate into A (even positions) and B (odd positions), prefix tokens included; the first
    ``protected`` tokens (cls at A[0], dist at B[0]; here also registers) are never matched. Each other A token
    picks its most cosine-similar unprotected B token (on the keys averaged over heads); the ``r`` A tokens with the
    most similar partners are merged into them by size-weighted average, sizes summed. The result is the protected
    tokens, the A tokens that stay (back in their original order when ``sort_kept``, ToMe's rule with a cls token;
    else most similar first), then the B tokens.
    """
    T = x.shape[0]
    r = min(r, (T - protected) // 2)  # ToMe's cap
    a_tokens = [t for t in range(0, T, 2) if t >= protected]
    b_tokens = [t for t in range(1, T, 2) if t >= protected]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    best = {}
    for a in a_tokens:
        sims = [float(unit[a] @ unit[b]) for b in b_tokens]
        j = max(range(len(sims)), key=lambda i: sims[i])
        best[a] = (sims[j], b_tokens[j])
    ranked = sorted(a_tokens, key=lambda a: best[a][0], reverse=True)
    merged, kept = ranked[:r], ranked[r:]
    if sort_kept:
        kept = sorted(kept)
    total = {b: x[b] * size[b] for b in b_tokens}
    weight = {b: size[b] for b in b_tokens}
    group = {b: set(groups[b]) for b in b_tokens}
    for a in merged:
        b = best[a][1]
        total[b] = total[b] + x[a] * size[a]
        weight[b] = weight[b] + size[a]
        group[b] |= groups[a]
    order = list(range(protected)) + kept
    new_x = [x[t] for t in order] + [total[b] / weight[b] for b in b_tokens]
    new_size = [size[t] for t in order] + [weight[b] for b in b_tokens]
    new_groups = [groups[t] for t in order] + [group[b] for b in b_tokens]
    return torch.stack(new_x), new_size, new_groups


@torch.no_grad()
def tome_reference(model: nn.Module, img: torch.Tensor, r: int, prop_attn: bool = True):
    """ToMe on one image (C, H, W) through ``model``'s own layers; returns the logits, the final features, the
    token sizes and, for every block that merged, the groups of original patches of its image tokens."""
    P = model.num_prefix_tokens
    has_cls = model.cls_token is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]  # (T, C)
    size = [1.0] * x.shape[0]
    groups = [set() for _ in range(P)] + [{j} for j in range(x.shape[0] - P)]
    log = []
    for blk in model.blocks:
        att = blk.attn
        T, C = x.shape
        H = att.num_heads
        q, k, v = att.qkv(blk.norm1(x)).reshape(T, 3, H, C // H).permute(1, 2, 0, 3)  # each (H, T, Dh)
        logits = (q @ k.transpose(-1, -2)) * att.scale  # (H, T, T)
        if prop_attn:  # proportional attention: key j counts size_j times
            logits = logits + torch.tensor(size, dtype=x.dtype).log()
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(T, C)
        x = x + blk.ls1(att.proj(out))
        block_r = min(r, (T - P) // 2)
        if block_r > 0:
            x, size, groups = tome_merge(x, k.mean(0), size, groups, block_r, P, has_cls)
            log.append([sorted(g) for g in groups[P:]])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if getattr(model, "dist_token", None) is not None:  # distilled DeiT in eval: mean of its two heads
        logits = (model.head(x[0]) + model.head_dist(x[1])) / 2
    elif has_cls:
        logits = model.head(model.fc_norm(x[0]))
    else:  # average pooling weighted by size (leanvit's documented extension; ToMe's patch takes a plain mean)
        s = torch.tensor(size[P:], dtype=x.dtype)[:, None]
        logits = model.head(model.fc_norm((x[P:] * s).sum(0) / s.sum()))
    return logits, x, size, log


def groups_of(source: torch.Tensor) -> list[list[int]]:
    """The original patches of every token from one image's trace ``source`` (N_cur, N_orig)."""
    return [torch.nonzero(row).flatten().tolist() for row in source]


def check_against_reference(model, x, r, prop_attn=True):
    leanvit.patch(model, "tome", r=r, prop_attn=prop_attn, trace=True)
    red = get_reducer(model)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    sched = red.schedule
    for b in range(x.shape[0]):
        ref_logits, ref_feats, ref_size, ref_log = tome_reference(model, x[b], r, prop_attn)
        assert torch.allclose(out[b], ref_logits, rtol=0, atol=1e-10), (out[b] - ref_logits).abs().max()
        assert torch.allclose(feats[b], ref_feats, rtol=0, atol=1e-10), (feats[b] - ref_feats).abs().max()
        assert torch.equal(red.current_sizes()[b], torch.tensor(ref_size, dtype=x.dtype))
        assert len(red.trace_log) == len(ref_log) == sum(1 for v in sched if v)
        for rec, groups in zip(red.trace_log, ref_log):
            assert groups_of(rec["source"][b]) == groups  # the same groups, in the same token order
            merged = {j for g in groups if len(g) > 1 for j in g}
            state = rec["state"][b].tolist()
            assert all(state[j] == (MERGED if j in merged else KEPT) for j in range(len(state)))
    return sched


@pytest.mark.parametrize("arch", ["deit", "deit_distilled"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_matches_authors_rules(arch, prop_attn):
    model = make(arch, img_size=96, depth=4)  # 36 image tokens: r=8 is capped at block 3 (12 reach it)
    sched = check_against_reference(model, images(96), 8, prop_attn)
    assert sched == [8, 8, 8, 6]


@pytest.mark.parametrize("arch", ["deit", "deit_distilled"])
def test_tome_r16_deit_base_grid_matches_authors_rules(arch):
    """ToMe's headline setting, r=16 on DeiT-B's 196 tokens and 12 blocks: block 11 merges the 10 it can."""
    model = make(arch, img_size=224, depth=12)
    sched = check_against_reference(model, images(224), 16)
    assert sched == [16] * 11 + [10]
    feats = model.forward_features(images(224))
    assert feats.shape[1] == model.num_prefix_tokens + 196 - sum(sched) == model.num_prefix_tokens + 10


@pytest.mark.parametrize("arch", ["registers", "no_cls_avg"])
def test_tome_documented_extension(arch):
    """Registers are protected like ToMe's dist token; without a cls token the kept A tokens stay in order of
    similarity (ToMe's class_token=False path) and average pooling is weighted by size."""
    model = make(arch, img_size=96, depth=4)
    check_against_reference(model, images(96), 8)


def test_matching_protects_prefix_and_keeps_order():
    """The ops alone: protected tokens pass through first and unmerged; with keep_order the A tokens that stay
    are in their original order."""
    from leanvit.ops.merge import bipartite_soft_matching

    torch.manual_seed(3)
    T, P = 11, 2
    metric = torch.randn(1, T, 8, dtype=torch.float64)
    x = torch.arange(T, dtype=torch.float64).reshape(1, T, 1)  # each token's position
    assert bipartite_soft_matching(metric, 100, protected=P)(x).shape[1] == T - 4  # capped at (11 - 2) // 2
    out = bipartite_soft_matching(metric, 2, protected=P, keep_order=True)(x, "amax")[0, :, 0].tolist()
    assert len(out) == T - 2 and out[:P] == [0, 1]
    kept_a, b = out[P:5], out[5:]  # 3 of the A tokens 2, 4, .., 10 stay; then the B tokens 3, 5, 7, 9
    assert kept_a == sorted(kept_a) and all(t % 2 == 0 for t in kept_a)
    assert all(v >= t for v, t in zip(b, (3, 5, 7, 9)))  # amax: a B token holds the largest position merged in


def test_tome_r0_is_dense():
    model = make("deit_distilled")
    x = images(96)
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "tome", r=0)
        assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)


# ================================================================================ 2. ToMe's cap of r for every method
def toms_cap(r_per_block: list[int], n: int, min_left: int = 1) -> list[int]:
    """ToMe's rule written out: each block removes at most half of the image tokens that reach it."""
    out = []
    for r in r_per_block:
        r = min(r, n // 2, n - min_left)
        out.append(r)
        n -= r
    return out


def test_cap_schedule():
    assert cap_schedule([16] * 12, 196) == [16] * 11 + [10] == toms_cap([16] * 12, 196)
    assert cap_schedule([100, 100, 100], 36) == [18, 9, 4]
    assert cap_schedule([2, 2, 2], 4) == [2, 1, 0]
    assert cap_schedule([2, 2, 2], 4, min_left=2) == [2, 0, 0]
    assert cap_schedule([0, 3], 10) == [0, 3]


@pytest.mark.parametrize("method", ["gtp", "tome", "evit", "truncate"])
@pytest.mark.parametrize("r", [16, (16, 1.0)])
def test_int_r_capped_per_block_for_every_method(method, r):
    """``leanvit.patch(deit_base, method, r=16)`` runs: the schedule is capped where too few tokens are left,
    reported as it runs, and matches the tokens every block's MLP really computes."""
    model = make("deit", img_size=224, depth=12, dtype=torch.float32)
    leanvit.patch(model, method, r=r)
    red = get_reducer(model)
    asked = [16] * 12 if r == 16 else [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]  # ToMe's parse_r
    expected = toms_cap(asked, 196)
    assert expected[-1] < asked[-1]  # the cap binds in the last block
    assert red.schedule == red.report["schedule"] == expected
    f, counts = mlp_token_counts(model, images(224, dtype=torch.float32))
    left = [196 - sum(expected[: i + 1]) for i in range(12)]
    assert counts == tokens_per_block(model) == [1 + n for n in left]
    assert f.shape == (2, 1 + left[-1], 48)


@pytest.mark.parametrize("method, options, expected", [
    ("tome", {}, [2, 1, 0]), ("gtp", {}, [2, 1, 0]), ("truncate", {}, [2, 1, 0]),
    ("evit", dict(fuse=None), [2, 1, 0]), ("evit", {}, [2, 0, 0]),  # EViT's fused token needs a token of room
])
def test_cap_leaves_room(method, options, expected):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, embed_dim=48,
                              num_heads=3, num_classes=10).eval()  # 2 x 2 grid: 4 image tokens
    leanvit.patch(model, method, r=2, **options)
    assert get_reducer(model).schedule == expected
    f, counts = mlp_token_counts(model, torch.randn(2, 3, 32, 32))
    assert counts == tokens_per_block(model)
    assert f.shape[1] == 1 + 4 - sum(expected)


@pytest.mark.parametrize("method", ["gtp", "tome", "evit", "truncate"])
def test_per_block_list_still_strict(method):
    model = make("deit", img_size=224, depth=12, dtype=torch.float32)
    with pytest.raises(ConfigError, match="block 11"):
        leanvit.patch(model, method, r=[16] * 11 + [20])  # 20 tokens reach block 11
    assert get_reducer(model) is None
