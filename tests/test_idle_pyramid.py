"""Token idling on a pyramid ViT (timm's PVT v2): exactness at keep 1.0, the masked and gathered paths agreeing,
idle tokens untouched, less compute, and clear refusals of what is not supported. Tiny random models."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import leanvit
from leanvit.errors import ConfigError, UnsupportedModelError
from leanvit.reduce import get_reducer, is_patched


def _pvt(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(pretrained=False, num_classes=10, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                depths=(1, 2, 2, 1))
    args.update(kw)
    return timm.create_model("pvt_v2_b0", **args).eval()


def _x(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_keep_one_equals_dense(mode):
    model = getattr(_pvt(), mode)()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "idle", keep=1.0)
        out = model(x)
    assert is_patched(model) and torch.allclose(out, ref, atol=1e-5, rtol=0)
    leanvit.unpatch(model)
    assert not is_patched(model) and all(type(b).__name__ == "Block" for s in model.stages for b in s.blocks)


def test_masked_path_equals_gather_path():
    model = _pvt()
    x = _x(3)
    gather, masked = copy.deepcopy(model), copy.deepcopy(model)
    leanvit.patch(gather, "idle", keep=0.5, path="gather")
    leanvit.patch(masked, "idle", keep=0.5, path="masked")
    with torch.no_grad():
        a, b, dense = gather(x), masked(x), model(x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, dense, atol=1e-3)  # it did idle tokens
    # training mode takes the masked path, with gradients
    masked.train()
    leanvit.patch(masked, "idle", keep=0.5)
    masked(x).sum().backward()
    assert masked.stages[3].blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_default_stages_and_idle_tokens_untouched():
    model = _pvt()
    leanvit.patch(model, "idle", keep=0.5)
    red = get_reducer(model)
    # 6 blocks: stages start at blocks 2, 3 (round(1.5)), 4 of 6 -> ratios 1, 1, .5, .25, .25... per idle_keep_ratios
    assert red.keep_ratios[:2] == [1.0, 1.0] and min(red.keep_ratios) == 0.125
    blk = model.stages[3].blocks[0]  # last stage: r^3
    seen = {}
    blk.register_forward_pre_hook(lambda m, a: seen.update(inp=a[0].clone()))
    blk.register_forward_hook(lambda m, a, o: seen.update(out=o.clone()))
    with torch.no_grad():
        model(_x())
    same = (seen["inp"] == seen["out"]).all(-1)  # (B, N): idle tokens pass unchanged
    n = seen["inp"].shape[1]
    assert same.sum(1).eq(n - max(1, int(n * 0.125))).all()


def test_idling_counts_fewer_macs():
    from leanvit.analysis import count_macs

    model = _pvt()
    dense = count_macs(model).macs
    leanvit.patch(model, "idle", keep=0.5)
    assert count_macs(model).macs < dense


def test_refusals():
    model = _pvt()
    for method in ("gtp", "tome", "evit"):
        with pytest.raises(UnsupportedModelError, match="pyramid"):
            leanvit.patch(model, method, r=2)
    with pytest.raises(ConfigError, match="budget= is not supported"):
        leanvit.patch(model, "idle", budget=0.7)
    with pytest.raises(ConfigError, match="trace"):
        leanvit.patch(model, "idle", keep=0.5, trace=True)
    assert not is_patched(model)
    linear = timm.create_model("pvt_v2_b2_li", pretrained=False, num_classes=10, embed_dims=(16, 32, 48, 64),
                               num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1))
    with pytest.raises(UnsupportedModelError, match="linear attention"):
        leanvit.patch(linear, "idle", keep=0.5)
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        leanvit.patch(timm.create_model("resnet18", pretrained=False, num_classes=10), "idle", keep=0.5)
