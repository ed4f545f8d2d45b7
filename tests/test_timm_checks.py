"""A patched timm ViT passes the checks of timm's own model tests (``tests/test_models.py``): forward, backward with a
gradient for every parameter, default cfgs, ``forward_features``/``forward_head``, ``forward_intermediates``,
torch.fx feature extraction (forward and backward), TorchScript and ``torch.export``, for every method at zero and
at a real reduction. Where a check's premise cannot hold (TorchScript of Python reducers, an NCHW grid of a reduced
token set without ``restore``), the model refuses with one clear leanvit error.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import leanvit
from leanvit import UnsupportedModelError

VARIANTS = {  # name -> (method, zero amount, real amount, options)
    "gtp": ("gtp", {"r": 0}, {"r": 3}, {}),
    "gtp-cls": ("gtp", {"r": 0}, {"r": 3}, {"score": "cls"}),
    "tome": ("tome", {"r": 0}, {"r": 3}, {}),
    "evit": ("evit", {"r": 0}, {"r": 3}, {}),
    "idle": ("idle", {"keep": 1.0}, {"keep": 0.5}, {}),
    "truncate": ("truncate", {"r": 0}, {"r": 3}, {}),
}
CASES = [(v, real) for v in VARIANTS for real in (False, True)]
IDS = [f"{v}-{'reduced' if real else 'zero'}" for v, real in CASES]


ARCHS = {  # timm model name -> its arguments for a tiny model; Eva: RoPE (EVA-02), pooled by its cls token here
    "vit": ("vit_tiny_patch16_224", {}),
    "eva": ("eva02_tiny_patch14_224", {"ref_feat_shape": (6, 6), "global_pool": "token"}),
}


def model(num_classes: int = 5, arch: str = "vit", **kw) -> torch.nn.Module:
    """A tiny ViT through timm's factory (so it has its pretrained config, as in timm's tests)."""
    torch.manual_seed(0)
    name, extra = ARCHS[arch]
    args = dict(img_size=48, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=num_classes, **extra)
    args.update(kw)
    return timm.create_model(name, **args).eval()


def patched(variant: str, real: bool, **kw):
    method, zero, amount, options = VARIANTS[variant]
    m = model(**kw)
    leanvit.patch(m, method, **(amount if real else zero), **options)
    return m


def reduces(m) -> bool:
    red = leanvit.get_reducer(m)
    return red.reducing and not red.keeps_all_tokens


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant,real", CASES, ids=IDS)
def test_forward_and_backward_reach_every_parameter(variant, real, arch):
    m = patched(variant, real, num_classes=42, arch=arch)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = m(x)
    assert out.shape == (2, 42) and not out.isnan().any()
    m.train()
    m(x).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("variant,real", CASES, ids=IDS)
def test_default_cfgs_features_and_head(variant, real):
    m = patched(variant, real)
    x = torch.randn(1, 3, 48, 48)
    sd = m.state_dict()
    for key in ("classifier", "first_conv"):
        assert m.default_cfg[key] + ".weight" in sd
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape[-1] == m.num_features
        assert torch.allclose(m.forward_head(feats), m(x), atol=1e-6)
        assert m.forward_head(feats, pre_logits=True).shape == (1, m.num_features)
        m.reset_classifier(0)
        assert m(x).shape == (1, m.num_features)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant,real", CASES, ids=IDS)
def test_forward_intermediates(variant, real, arch):
    m = patched(variant, real, arch=arch)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NLC")
        assert torch.allclose(final, m.forward_features(x), atol=1e-6)
        assert len(inter) == 4
        if reduces(m):
            with pytest.raises(UnsupportedModelError, match="restore=True"):
                m.forward_intermediates(x)
            method, _, amount, options = VARIANTS[variant]
            leanvit.patch(m, method, restore=True, **amount, **options)
        final, inter = m.forward_intermediates(x, indices=2)
    assert [t.shape for t in inter] == [(2, 32, 6, 6)] * 2


def test_fx_refuses_size_weighted_pooling_of_an_eva():
    m = model(arch="eva", global_pool="avg")
    leanvit.patch(m, "tome", r=3)
    with pytest.raises(UnsupportedModelError, match="torch.fx cannot trace"):
        create_feature_extractor(m, return_nodes=[get_graph_node_names(m)[0][-1]])


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant,real", CASES, ids=IDS)
def test_fx_feature_extraction_forward_and_backward(variant, real, arch):
    m = patched(variant, real, arch=arch)
    x = torch.randn(2, 3, 48, 48)
    last = get_graph_node_names(m)[0][-1]
    fx = create_feature_extractor(m, return_nodes=[last])
    with torch.no_grad():
        out = fx(x)[last]
        assert torch.allclose(out, m(x), atol=1e-6)
    fx.train()
    fx(x)[last].mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


def test_fx_refuses_size_weighted_pooling_it_cannot_follow():
    m = model(global_pool="avg", class_token=False)
    leanvit.patch(m, "tome", r=3)
    with pytest.raises(UnsupportedModelError, match="torch.fx cannot trace"):
        create_feature_extractor(m, return_nodes=[get_graph_node_names(m)[0][-1]])
    leanvit.patch(m, "tome", r=3, restore=True)  # averaged over the grid: no sizes needed
    last = get_graph_node_names(m)[0][-1]
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(create_feature_extractor(m, return_nodes=[last])(x)[last], m(x), atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant,real", CASES, ids=IDS)
def test_torchscript(variant, real, arch):
    m = patched(variant, real, arch=arch)
    red = leanvit.get_reducer(m)
    x = torch.randn(1, 3, 48, 48)
    if red.reducing:
        with pytest.raises(UnsupportedModelError, match="TorchScript cannot compile"):
            torch.jit.script(m)
        return
    scripted = torch.jit.script(m)  # the dense equivalent of a patch that removes nothing
    with torch.no_grad():
        assert torch.allclose(scripted(x), m(x), atol=1e-5)
    assert leanvit.get_reducer(m) is red  # the patched model itself is untouched


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant,real", CASES, ids=IDS)
def test_torch_export(variant, real, arch):
    m = patched(variant, real, arch=arch)
    x = torch.randn(2, 3, 48, 48)
    program = torch.export.export(m, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), m(x), atol=1e-5)


def test_torch_export_of_size_weighted_pooling():
    m = model(global_pool="avg", class_token=False)
    leanvit.patch(m, "tome", r=3)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(torch.export.export(m, (x,)).module()(x), m(x), atol=1e-5)


def test_attention_pool_counts_a_merged_token_as_the_patches_it_stands_for():
    m = model(global_pool="map", class_token=False)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = m(x)
        leanvit.patch(m, "tome", r=0)
        assert torch.allclose(m(x), ref, atol=1e-6)
        leanvit.patch(m, "tome", r=3)
        out, feats = m(x), m.forward_features(x)
        size = leanvit.get_reducer(m).current_sizes()
        # the pool over every token repeated as many times as the patches it stands for
        expected = torch.cat([m.forward_head(torch.repeat_interleave(f, s.round().long(), dim=0)[None])
                              for f, s in zip(feats, size)])
    assert torch.allclose(out, expected, atol=1e-5)
