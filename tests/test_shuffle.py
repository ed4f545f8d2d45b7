"""Channel-shuffle ViTs: the shuffle, the block against a plain reference, the timm model API, MACs matched with the
vanilla partners, token-reduction patches (r=0 equivalence) and ``leanvit compare`` through the CLI.

Blocks are tested at width 16-24 and models are the Fashion-MNIST variants (28x28, 0.06 GMACs), so the file runs in
seconds on one CPU thread.
"""
from __future__ import annotations

import itertools
import pickle

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import leanvit
from leanvit.analysis import count_macs
from leanvit.io import save_weights
from leanvit.errors import ConfigError, UnsupportedModelError
from leanvit.models import SHUFFLE_ARCHS, VANILLA_ARCHS, ChannelShuffleBlock, channel_shuffle, write_channels
from leanvit.models.shuffle import shuffle_index
from leanvit.reduce import get_reducer, is_patched
from leanvit.reduce.adapters.shuffle import ReducingShuffleBlock

FM_NAMES = [n for n, a in SHUFFLE_ARCHS.items() if a.geometry == "fm"]
DEFAULT = "leanvit_shuffle_fm_student"
SHIPPED = "leanvit_shuffle_fm_mlp_grouped"  # the design the ablation chose, trained on the full recipe


def fm_image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def fm_model(name: str = DEFAULT, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


# ================================================================================ 1. the shuffle
@pytest.mark.parametrize("dim, groups", [(8, 2), (12, 3), (12, 4), (128, 2)])
def test_shuffle_is_an_invertible_permutation(dim, groups):
    idx = shuffle_index(dim, groups)
    assert torch.equal(idx.sort().values, torch.arange(dim))
    x = torch.randn(2, 3, dim)
    y = channel_shuffle(x, groups)
    assert torch.equal(y, x[..., idx])
    assert torch.equal(channel_shuffle(y, dim // groups), x)  # the transposed shuffle undoes it
    k = dim // groups
    for g in range(groups):  # the groups interleave: group g lands on channels g, g + groups, ...
        assert torch.equal(y[..., g::groups], x[..., g * k:(g + 1) * k])


def test_shuffle_mixes_attended_and_idle_channels():
    """After the default block's shuffle, the next attended half holds half attended and half idle channels."""
    labels = torch.arange(128.0)
    nxt = channel_shuffle(labels, 2)[:64]
    assert (nxt < 64).sum() == 32 and (nxt >= 64).sum() == 32


def test_shuffle_groups_must_divide_the_width():
    with pytest.raises(ConfigError, match="cannot form 5 groups"):
        shuffle_index(12, 5)
    with pytest.raises(ConfigError, match="cannot form 5 groups"):
        ChannelShuffleBlock(12, 2, attn_dim=6, shuffle_groups=5)


@pytest.mark.parametrize("groups", [None, 2, 4, 3])
def test_write_channels_equals_write_then_shuffle(groups):
    """The fused write (stack of the shuffle's groups, or its fallback when a span straddles a group) equals
    writing the spans and then shuffling the whole stream."""
    x = torch.randn(2, 5, 24)
    for spans in ([(0, 12)], [(12, 24)], [(0, 24)], [(0, 8), (8, 24)], [(6, 18)]):
        news = [torch.randn(2, 5, e - s) for s, e in spans]
        expected = x.clone()
        for (s, e), new in zip(spans, news):
            expected[..., s:e] = new
        if groups is not None:
            expected = channel_shuffle(expected, groups)
        out = write_channels(x, list(zip(spans, news)), groups)
        assert torch.equal(out, expected), spans


# ================================================================================ 2. the block
def reference_block(blk: ChannelShuffleBlock, x: torch.Tensor, start: int, a: int, shared: bool) -> torch.Tensor:
    """The block's layout written plainly: slice, add, write back into a copy, shuffle the whole stream."""
    C = x.shape[-1]
    idle = slice(0, start) if start else slice(a, C)
    att = slice(start, start + a)
    x = x.clone()
    x[..., att] = x[..., att] + blk.ls1(blk.attn(blk.norm1(x[..., att])))
    if blk.shuffle in ("attn", "both"):
        x = channel_shuffle(x, blk.groups)
    if shared:
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    else:
        xa, xi = x[..., att].clone(), x[..., idle].clone()
        x = x.clone()
        x[..., att] = xa + blk.ls2(blk.mlp(blk.norm2(xa)))
        if blk.mlp_idle is not None:
            x[..., idle] = xi + blk.ls2_idle(blk.mlp_idle(blk.norm2_idle(xi)))
    if blk.shuffle in ("mlp", "both"):
        x = channel_shuffle(x, blk.groups)
    return x


BLOCK_CASES = [
    dict(shuffle=s, mlp_mode=m, idle_mlp_ratio=r, alternate=alt, depth=d, attn_dim=a)
    for s, (m, r), alt, d, a in itertools.product(("attn", "mlp", "both", "none"),
                                                  (("shared", 0.0), ("grouped", 0.0), ("grouped", 1.5)),
                                                  (False, True), (0, 1), (8, 16))
    if not (d == 1 and not alt)
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_block_matches_plain_reference(case):
    torch.manual_seed(0)
    case = dict(case)
    depth, a = case.pop("depth"), case["attn_dim"]
    blk = ChannelShuffleBlock(24, num_heads=2, mlp_ratio=2.0, init_values=0.5, depth=depth, **case).eval()
    x = torch.randn(2, 7, 24)
    start = 24 - a if case["alternate"] and depth % 2 else 0
    with torch.no_grad():
        expected = reference_block(blk, x, start, a, case["mlp_mode"] == "shared")
        out = blk(x)
        steps = blk.mlp_residual(blk.attn_residual(x, blk.attn(blk.attn_input(x))))
    assert out.shape == x.shape
    assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()
    assert torch.allclose(steps, expected, atol=1e-6)  # the steps that token-reduction patches run


def test_block_widths_and_parameters():
    blk = ChannelShuffleBlock(128, num_heads=2, mlp_ratio=3.5, attn_dim=64)
    assert blk.attn.qkv.in_features == 64 and blk.attn.proj.out_features == 64 and blk.norm1.weight.shape == (64,)
    assert blk.mlp.fc1.in_features == 64 and blk.mlp.fc1.out_features == 224 and blk.mlp_idle is None
    assert blk.groups == 2 and blk.shuffle == "mlp"
    shared = ChannelShuffleBlock(128, num_heads=2, mlp_ratio=0.875, attn_dim=64, mlp_mode="shared")
    assert shared.mlp.fc1.in_features == 128 and shared.mlp.fc1.out_features == 112
    grouped = ChannelShuffleBlock(128, num_heads=2, mlp_ratio=4.0, attn_dim=48, idle_mlp_ratio=1.8)
    assert grouped.mlp_idle.fc1.in_features == 80 and grouped.mlp_idle.fc1.out_features == 144
    assert grouped.groups == 8  # 128 // gcd(128, 48): every group inside one span
    odd = ChannelShuffleBlock(96, num_heads=2, attn_dim=64, alternate=True, depth=3)
    assert odd.attn_span == (32, 96) and odd.idle_span == (0, 32) and odd.groups == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_dim=0), "attended width"), (dict(attn_dim=16), "attended width"),
    (dict(shuffle="middle"), "shuffle must be"), (dict(mlp_mode="mixed"), "mlp_mode must be"),
    (dict(mlp_mode="shared", idle_mlp_ratio=1.0), "idle_mlp_ratio"), (dict(idle_mlp_ratio=-1.0), "idle_mlp_ratio"),
])
def test_block_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ChannelShuffleBlock(16, num_heads=2, **kwargs)


def test_block_trains():
    model = fm_model("leanvit_shuffle_fm_a48", drop_path_rate=0.1).train()
    loss = model(fm_image()).logsumexp(-1).mean()
    loss.backward()
    for name in ("blocks.1.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp_idle.fc1.weight",
                 "patch_embed.proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# ================================================================================ 3. the timm model
def test_model_is_a_timm_vision_transformer():
    model = fm_model()
    x = fm_image()
    assert isinstance(model, VisionTransformer) and all(type(b) is ChannelShuffleBlock for b in model.blocks)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        final, inter = model.forward_intermediates(x, indices=2)
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
    assert logits.shape == (2, 10) and feats.shape == (2, 197, 128) and pre.shape == (2, 128)
    assert torch.allclose(model.forward_head(feats), logits, atol=1e-6)
    assert torch.allclose(final, feats, atol=1e-6)
    assert [t.shape for t in inter] == [(2, 128, 14, 14)] * 2 and nlc[0].shape == (2, 196, 128)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10 and cfg["mean"] == (0.2860,)
    keys = model.state_dict().keys()
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.norm1.weight",
                "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias", "patch_embed.proj.weight", "head.weight"):
        assert key in keys
    assert model.patch_embed.conv1.out_channels == 32  # the student's stem width, output widened only


def test_every_variant_is_registered_and_listed():
    listed = set(leanvit.list_models())
    assert set(SHUFFLE_ARCHS) | set(VANILLA_ARCHS) <= listed
    assert all("shuffle" in n and n.startswith("leanvit_") for n in SHUFFLE_ARCHS)
    assert {"leanvit_vit_fm_teacher", "leanvit_vit_fm_student"} <= listed


_MACS: dict[str, int] = {}


def _macs(name: str) -> int:
    if name not in _MACS:
        _MACS[name] = count_macs(timm.create_model(name)).macs
    return _MACS[name]


@pytest.mark.parametrize("name", list(SHUFFLE_ARCHS))
def test_macs_within_three_percent_of_partner(name):
    arch = SHUFFLE_ARCHS[name]
    ratio = _macs(name) / _macs(arch.partner)
    assert abs(ratio - 1.0) <= 0.03, f"{name}: {ratio:.4f} of {arch.partner}"


def test_224_variants_run():
    model = timm.create_model("leanvit_shuffle_tiny_patch16_224", img_size=64).eval()  # 16 tokens, same layers
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert model.embed_dim == 384 and model.blocks[0].attn.qkv.in_features == 192
    assert timm.create_model("leanvit_shuffle_nano_patch16_224").pretrained_cfg["input_size"] == (3, 224, 224)


def test_pretrained_loads_zoo_file(tmp_path, monkeypatch):
    """A later zoo/weights/<name>.safetensors makes pretrained=True work offline, as for the reference models."""
    import leanvit.zoo as zoo
    from timm.models._registry import _model_pretrained_cfgs

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    cfg = _model_pretrained_cfgs[f"{DEFAULT}.fmnist"]
    monkeypatch.setattr(cfg, "file", zoo.weight_file(DEFAULT))
    with pytest.raises(FileNotFoundError, match="pretrained=False"):
        timm.create_model(DEFAULT, pretrained=True)
    trained = fm_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    save_weights(trained, tmp_path / f"{DEFAULT}.safetensors")
    loaded = timm.create_model(DEFAULT, pretrained=True).state_dict()
    ref = load_file(str(tmp_path / f"{DEFAULT}.safetensors"))
    assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)


# ================================================================================ 4. token reduction
PATCH_VARIANTS = [DEFAULT, "leanvit_shuffle_fm_pos_attn", "leanvit_shuffle_fm_mlp_shared", "leanvit_shuffle_fm_a48",
                  "leanvit_shuffle_fm_alt", SHIPPED]


@pytest.mark.parametrize("name", PATCH_VARIANTS)
@pytest.mark.parametrize("method", ["gtp", "tome", "evit"])
def test_patch_r0_equals_unpatched(name, method):
    model = fm_model(name)
    x = fm_image()
    with torch.no_grad():
        ref = model(x)
    leanvit.patch(model, method, r=0)
    assert is_patched(model) and all(type(b) is ReducingShuffleBlock for b in model.blocks)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    leanvit.patch(model, method, r=8)
    with torch.no_grad():
        reduced = model(x)
        feats = model.forward_features(x)
    assert reduced.shape == (2, 10) and not torch.allclose(reduced, ref, atol=1e-4)
    assert feats.shape[1] < 197 and feats.shape[2] == model.embed_dim
    leanvit.unpatch(model)
    assert all(type(b) is ChannelShuffleBlock for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_patch_by_budget_and_pickle():
    model = fm_model()
    x = fm_image()
    leanvit.patch(model, "tome", budget=0.7)
    rep = get_reducer(model).report
    assert rep["achieved"] <= 0.7 and sum(rep["schedule"]) > 0
    with torch.no_grad():
        out = model(x)
        again = pickle.loads(pickle.dumps(model))(x)
    assert torch.allclose(out, again, atol=1e-6)


class OtherShuffleBlock(ChannelShuffleBlock):
    """A subclass compat has not been taught: it may change the forward, so it must be refused."""


def test_unknown_block_is_refused():
    model = fm_model()
    model.blocks[2].__class__ = OtherShuffleBlock
    with pytest.raises(UnsupportedModelError, match="OtherShuffleBlock"):
        leanvit.patch(model, "gtp", r=0)
    assert not is_patched(model)


# ================================================================================ 5. command line
def test_compare_cli_runs_on_a_shuffle_model(run_cli, fmnist_dir):
    code, out, err = run_cli("compare", "--model", SHIPPED, "--no-pretrained", "--data", f"fmnist:{fmnist_dir}",
                             "--limit", "32", "--bench-runs", "0", "--budgets", "0.74", "--no-progress")
    assert code == 0, err
    assert f"{SHIPPED} on fmnist:" in out
    rows = [line.split()[0] for line in out.splitlines()[3:] if line.strip()]
    assert rows == ["dense", "gtp", "tome", "evit"]
