"""The token grid given back (``patch(..., restore=True)``, ``leanvit.restore_tokens``), timm's ``features_only``
wrapper, and the grid position every method keeps for rotary attention (``token_positions``).

The hand-built cases run one reduction of one reducer on a 1x4 grid whose outcome is known by hand; the model
cases check the same rules against the trace (which ``tests/test_tome_exact.py`` ties to ToMe's own rules).
"""
from __future__ import annotations

import pickle

import pytest
import timm
import torch

from timm.models._features import FeatureGetterNet

import leanvit
from leanvit import ConfigError, UnsupportedModelError, get_reducer, restore_tokens
from leanvit.ops.schedule import BlockShape
from leanvit.reduce import METHODS
from leanvit.reduce.types import AttnOut, ViTInfo

METHODS_REMOVING = ["gtp", "tome", "evit", "truncate"]


def info(rotary: bool = False) -> ViTInfo:
    """A cls-token model whose 4 image tokens lie on a 1x4 grid (one block)."""
    return ViTInfo(depth=1, dim=1, num_prefix=1, has_cls=True, grid=(1, 4), num_image=4, global_pool="token",
                   blocks=(BlockShape(1, 1, 1),), rotary=rotary)


def tokens() -> torch.Tensor:
    """(1, 5, 2): cls, then image tokens whose first feature is their number 1..4."""
    return torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 0.5], [3.0, -1.0], [4.0, 2.0]]])


def reducer(method: str, r: int, rotary: bool = False, **options):
    red = METHODS[method](info(rotary), [r], **options)
    red.restore = True
    x = tokens()
    red.begin(x)
    return red, x


def score(values: list[float]) -> torch.Tensor:
    return torch.tensor([values])


# ------------------------------------------------------------------------------------------ hand-built cases
def test_truncate_keeps_the_first_tokens_and_the_dropped_ones_keep_their_value():
    red, x = reducer("truncate", 2, rotary=True)
    out = red.reduce(0, x, AttnOut(x=x))
    assert out.shape == (1, 3, 2)
    out = out * 10  # what the blocks after the reduction do to the kept tokens
    grid = red.restore_grid(out)
    # patches 1, 2 take their (changed) tokens; 3 and 4 reached no token: their value at the reduction
    assert torch.equal(grid, torch.tensor([[[0.0, 0.0], [10.0, 10.0], [20.0, 5.0], [3.0, -1.0], [4.0, 2.0]]]))
    assert red.token_positions().tolist() == [[4, 0, 1]]  # cls has no grid position (4 = num_image)


def test_gtp_patches_go_along_their_strongest_edge_and_orphans_keep_their_value():
    # spatial graph on a 1x4 chain: 1-2-3-4. Remove the two lowest scores, patches 3 and 4: patch 3's kept
    # neighbour is 2; patch 4's only neighbour (3) is removed too, so it is an orphan (as published: lost)
    red, x = reducer("gtp", 2, rotary=True, graph="spatial", alpha=0.0)
    out = red.reduce(0, x, AttnOut(x=x, score=score([4.0, 3.0, 2.0, 1.0])))
    grid = red.restore_grid(out * 10)
    assert torch.equal(grid, torch.tensor([[[0.0, 0.0], [10.0, 10.0], [20.0, 5.0], [20.0, 5.0], [4.0, 2.0]]]))
    assert red.token_positions().tolist() == [[4, 0, 1]]


def test_gtp_orphan_merged_goes_to_its_nearest_kept_token():
    red, x = reducer("gtp", 2, graph="spatial", alpha=0.0, orphans="merge")
    out = red.reduce(0, x, AttnOut(x=x, score=score([4.0, 3.0, 2.0, 1.0])))
    grid = red.restore_grid(out)
    # the orphan, patch 4 (features (4, 2)), is more cosine-similar to patch 2 (2, 0.5): 0.976, than to patch 1
    # (1, 1): 0.949, so it is merged into patch 2's token, which patch 3 propagated into as well
    assert torch.equal(out[0, 1], x[0, 1]) and not torch.equal(out[0, 2], x[0, 2])
    assert torch.equal(grid[0, 4], out[0, 2]) and torch.equal(grid[0, 3], out[0, 2])


def test_evit_removed_patches_take_the_fused_token():
    # cls attention ranks patches 4, 2, 3, 1; keep r=1 fewer, fuse the two lowest (1 and 3) into one token
    red, x = reducer("evit", 1, rotary=True)
    cls_probs = torch.tensor([[[0.0, 0.1, 0.3, 0.2, 0.4]]])  # (B, H, N)
    out = red.reduce(0, x, AttnOut(x=x, cls_probs=cls_probs))
    assert out.shape == (1, 4, 2)  # cls, patches 2 and 4 in order, the fused token
    grid = red.restore_grid(out)
    assert torch.equal(grid[0, 2], out[0, 1]) and torch.equal(grid[0, 4], out[0, 2])
    assert torch.equal(grid[0, 1], out[0, 3]) and torch.equal(grid[0, 3], out[0, 3])
    assert red.token_positions().tolist() == [[4, 1, 3, 4]]  # the fused token has no grid position


def test_evit_without_fusing_loses_the_removed_patches():
    red, x = reducer("evit", 2, fuse=None)
    out = red.reduce(0, x, AttnOut(x=x, cls_probs=torch.tensor([[[0.0, 0.1, 0.3, 0.2, 0.4]]])))
    grid = red.restore_grid(out * 10)
    assert torch.equal(grid[0, [1, 3]], x[0, [1, 3]])  # their values when removed
    assert torch.equal(grid[0, [2, 4]], out[0, 1:] * 10)


def test_tome_patches_take_their_merge_destination_and_the_merged_token_keeps_its_position():
    # all tokens alternate into A (positions 0 cls, 2, 4) and B (1, 3). Patch 4 (position 4) has the same
    # direction as patch 3 (position 3), so with r=1 it is merged into it
    red, x = reducer("tome", 1, rotary=True)
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 3.0]])[None, None]  # (B, H, N, Dh)
    out = red.reduce(0, x, AttnOut(x=x, keys=keys))
    # output: cls, unmerged A (patch 2), then B (patch 1, patch 3 + 4)
    assert torch.allclose(out[0, 3], (x[0, 3] + x[0, 4]) / 2)
    grid = red.restore_grid(out)
    assert torch.equal(grid[0, 1:], out[0, [2, 1, 3, 3]])
    assert red.token_positions().tolist() == [[4, 1, 0, 2]]  # the merged token is at its destination's (patch 3)


def test_two_reductions_compose():
    red = METHODS["truncate"](ViTInfo(depth=2, dim=1, num_prefix=1, has_cls=True, grid=(1, 4), num_image=4,
                                      global_pool="token", blocks=(BlockShape(1, 1, 1),) * 2), [1, 1])
    red.restore = True
    x = tokens()
    red.begin(x)
    x1 = red.reduce(0, x, AttnOut(x=x)) + 1
    x2 = red.reduce(1, x1, AttnOut(x=x1)) + 1
    grid = red.restore_grid(x2)
    assert torch.equal(grid[0, 1:], torch.stack([x[0, 1] + 2, x[0, 2] + 2, x[0, 3] + 1, x[0, 4]]))
    assert torch.equal(red.restore_grid(x1, block=0)[0, 1:], torch.stack([x1[0, 1], x1[0, 2], x1[0, 3], x[0, 4]]))


# ------------------------------------------------------------------------------------------ on models
def vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


AMOUNTS = {"gtp": {"r": 3}, "tome": {"r": 3}, "evit": {"r": 3}, "truncate": {"r": 3}, "idle": {"keep": 0.5}}


@pytest.mark.parametrize("method", list(AMOUNTS))
def test_restored_features_have_the_whole_grid_and_zero_reduction_is_exact(method):
    model, x = vit(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, ref_int = model.forward_features(x), model.forward_intermediates(x, indices=[1, 3],
                                                                            intermediates_only=True)
        zero = {"keep": 1.0} if method == "idle" else {"r": 0}
        leanvit.patch(model, method, restore=True, **zero)
        assert torch.allclose(model.forward_features(x), ref, atol=1e-6)
        leanvit.patch(model, method, restore=True, **AMOUNTS[method])
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert feats.shape == ref.shape
    assert [m.shape for m in maps] == [m.shape for m in ref_int] == [(2, 32, 4, 4)] * 2
    # the last intermediate is the last block's output, restored, before the final norm
    tokens_ = model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True, norm=True)[0]
    assert torch.allclose(tokens_, feats[:, 1:], atol=1e-6)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_restored_grid_follows_the_trace(method):
    """Every patch takes the features of the token the trace says stands for it."""
    model, x = vit(), torch.randn(2, 3, 64, 64)
    leanvit.patch(model, method, r=3, trace=True)
    with torch.no_grad():
        reduced = model.forward_features(x)
    source = get_reducer(model).trace_log[-1]["source"]  # (B, n, N0)
    leanvit.patch(model, method, r=3, trace=True, restore=True)
    with torch.no_grad():
        full = model.forward_features(x)
    owner = source.float().argmax(1)  # (B, N0) the token holding each patch
    expected = torch.gather(reduced[:, 1:], 1, owner[..., None].expand(-1, -1, reduced.shape[2]))
    assert torch.allclose(full[:, 1:], expected, atol=1e-6)
    assert torch.equal(full[:, :1], reduced[:, :1])


def test_restored_tome_average_pool_is_the_size_weighted_pool():
    """Each patch counted once on the restored grid is ToMe's size-weighted average of the merged tokens."""
    model, x = vit(global_pool="avg", class_token=False), torch.randn(2, 3, 64, 64)
    leanvit.patch(model, "tome", r=3)
    with torch.no_grad():
        weighted = model(x)
        leanvit.patch(model, "tome", r=3, restore=True)
        restored = model(x)
    assert torch.allclose(restored, weighted, atol=1e-5)


def test_restore_tokens_of_an_intermediate_the_caller_collected():
    model, x = vit(), torch.randn(1, 3, 64, 64)
    leanvit.patch(model, "truncate", r=3, restore=True)
    outs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i, b in
             enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert outs[1].shape[1] == 17 - 6
    grid = restore_tokens(model, outs[1], block=1)
    assert grid.shape == (1, 17, 32)
    assert torch.equal(grid[:, :11], outs[1])  # truncate keeps the first tokens in place


def test_restore_refusals():
    model = vit()
    with pytest.raises(ConfigError, match="not patched"):
        restore_tokens(model, torch.zeros(1, 17, 32))
    with pytest.raises(ConfigError, match="restore must be"):
        leanvit.patch(model, "tome", r=2, restore="yes")
    leanvit.patch(model, "tome", r=2)
    with pytest.raises(ConfigError, match="restore=True"):
        restore_tokens(model, torch.zeros(1, 9, 32))
    with pytest.raises(UnsupportedModelError, match="restore=True"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[1])


def test_restore_survives_pickling():
    model = vit()
    leanvit.patch(model, "gtp", r=2, restore=True)
    copy = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(copy.forward_features(x), model.forward_features(x))
    assert copy.forward_features(x).shape == (1, 17, 32)


# ------------------------------------------------------------------------------------------ features_only
def features(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 3), img_size=64, depth=4,
                             **kw).eval()


@pytest.mark.parametrize("method", list(AMOUNTS))
def test_features_only_model_patches_and_gives_whole_maps(method):
    model, x = features(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = [t.clone() for t in model(x)]
        leanvit.patch(model, method, **({"keep": 1.0} if method == "idle" else {"r": 0}))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model(x), ref))
        leanvit.patch(model, method, **AMOUNTS[method])
        assert get_reducer(model).restore  # spatial maps: the grid is given back by default
        maps = model(x)
        assert [m.shape for m in maps] == [r.shape for r in ref]
        if method != "idle":
            assert not torch.allclose(maps[1], ref[1], atol=1e-3)
        leanvit.unpatch(model)
        assert type(model.model) is timm.models.vision_transformer.VisionTransformer
        assert all(torch.equal(a, b) for a, b in zip(model(x), ref))


def test_features_only_budget_and_nlc():
    model = FeatureGetterNet(vit(), out_indices=(1, 3), output_fmt="NLC")
    leanvit.patch(model, "gtp", budget=0.7)
    red = get_reducer(model)
    assert not red.restore and red.report["achieved"] <= 0.7
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert maps[1].shape[1] < 16  # tokens as they are


# ------------------------------------------------------------------------------------------ positions
@pytest.mark.parametrize("method", METHODS_REMOVING)
def test_positions_are_kept_only_for_rotary_models(method):
    red, x = reducer(method, 1)
    red.restore = False
    attn = AttnOut(x=x, score=score([4.0, 3.0, 2.0, 1.0]), cls_probs=torch.tensor([[[0.0, 0.1, 0.3, 0.2, 0.4]]]),
                   keys=torch.randn(1, 1, 5, 2))
    red.reduce(0, x, attn)
    assert red.token_positions() is None


def test_restore_compiles_as_one_graph():
    model, x = vit(), torch.randn(2, 3, 64, 64)
    leanvit.patch(model, "gtp", r=2, restore=True)
    with torch.no_grad():
        ref = model.forward_features(x)
        out = torch.compile(model.forward_features, fullgraph=True)(x)
    assert out.shape == (2, 17, 32) and torch.allclose(out, ref, atol=1e-5)
