"""open_clip's ViT image tower and CLIP models through the adapter (:mod:`leanvit.reduce.adapters.open_clip`).

Tiny towers built from configs (random weights, no download). The same weights in open_clip's tower and in timm's
``VisionTransformer(pre_norm=True)`` give the same dense output and, patched with each method, the same reduced
output: one implementation of every method serves both libraries.
"""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

import leanvit  # noqa: E402
from leanvit.errors import UnsupportedModelError  # noqa: E402
from leanvit.reduce import METHODS, get_reducer, is_patched  # noqa: E402
from leanvit.reduce.adapters import open_clip as adapter  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402
from open_clip.transformer import AttentionalPooler, Transformer, VisionTransformer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

# 32x32 images in 8x8 patches: 16 image tokens and the cls token
SMALL = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)
# 4x4 patches: 64 image tokens, room for budgets
WIDE = dict(SMALL, patch_size=4, layers=3)
CUSTOM = dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True)
TOWERS = {
    "tok": dict(ls_init_value=0.5),
    "avg": dict(pool_type="avg"),
    "avg_ln_after": dict(pool_type="avg", final_ln_after_pool=True),
    "none": dict(pool_type="none"),
    "custom": dict(CUSTOM, ls_init_value=0.5),
    "attn_pool": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    # open_clip's ("untested, WIP") parallel form runs only where its output width is the tower's
    "parallel_pool": dict(attentional_pool="parallel", attn_pooler_queries=4, attn_pooler_heads=2, output_dim=64),
}
TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)


def perturb(model: nn.Module) -> nn.Module:
    """Give norms, LayerScale and head scales values other than their initial ones, so that each one matters."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 or "gamma" in n or "head_scale" in n:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def make_tower(seed: int = 0, base: dict = SMALL, **cfg) -> VisionTransformer:
    torch.manual_seed(seed)
    return perturb(VisionTransformer(**{**base, **cfg}))


def make_clip(cls: type = CLIP, seed: int = 0, **vision) -> nn.Module:
    torch.manual_seed(seed)
    v = dict(layers=SMALL["layers"], width=SMALL["width"], head_width=16, mlp_ratio=SMALL["mlp_ratio"],
             patch_size=SMALL["patch_size"], image_size=SMALL["image_size"])
    v.update(vision)
    return perturb(cls(SMALL["output_dim"], CLIPVisionCfg(**v), CLIPTextCfg(**TEXT)))


def image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def text(batch: int = 2) -> torch.Tensor:
    return torch.randint(1, TEXT["vocab_size"], (batch, TEXT["context_length"]),
                         generator=torch.Generator().manual_seed(2))


def run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def zero(method: str) -> dict:
    return {"r": 0} if "r" in METHODS[method].amounts else {"keep": 1.0}


def some(method: str) -> dict:
    return {"r": 2} if "r" in METHODS[method].amounts else {"keep": 0.7}


# ------------------------------------------------------------------------------------------ exactness, restore
@pytest.mark.parametrize("kind", list(TOWERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_reduction_is_the_unpatched_tower(method, kind):
    tower = make_tower(**TOWERS[kind], output_tokens=True)
    x = image()
    ref = run(tower, x)
    leanvit.patch(tower, method, **zero(method))
    assert is_patched(tower)
    torch.testing.assert_close(run(tower, x), ref, atol=1e-5, rtol=1e-5)
    leanvit.patch(tower, method, **some(method))  # and a reducing patch runs, on fewer tokens unless idling
    pooled, tokens = run(tower, x)
    assert torch.isfinite(pooled).all()
    if not kind.endswith("pool"):  # the poolers' outputs are their queries
        n = 17 if kind == "none" else 16  # 'none' returns the cls token too
        assert tokens.shape[1] == n if method == "idle" else tokens.shape[1] < n
    if kind == "none":  # every token that is left, projected
        assert pooled.shape[:2] == tokens.shape[:2]
        return
    assert pooled.shape == ref[0].shape and not torch.allclose(pooled, ref[0], atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_unpatch_restores_exactly_and_pickles(method):
    model = make_clip(ls_init_value=0.5)
    x = image()
    ref = model.encode_image(x).detach()
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    leanvit.patch(model, method, **some(method))
    assert list(model.state_dict()) == keys  # the attention view is not a submodule
    reduced = model.encode_image(x).detach()
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert get_reducer(clone).schedule == get_reducer(model).schedule
        torch.testing.assert_close(clone.encode_image(x).detach(), reduced, atol=0, rtol=0)
    leanvit.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_leanvit") for m in model.modules() for k in m.__dict__)
    torch.testing.assert_close(model.encode_image(x).detach(), ref, atol=0, rtol=0)


def test_unpickles_in_a_fresh_process_and_claims_without_importing_open_clip(tmp_path):
    """A new interpreter patches a timm ViT without importing open_clip (the adapter recognises open_clip models by
    their classes' module), then loads a patched CLIP model saved whole, whose classes it makes on demand."""
    model = make_clip()
    leanvit.patch(model, "tome", r=2)
    x = image()
    path = tmp_path / "m.pt"
    torch.save({"model": model, "x": x, "y": model.encode_image(x).detach()}, path)
    code = ("import sys, timm, torch, leanvit; m = timm.create_model('vit_tiny_patch16_224', pretrained=False, "
            "img_size=32, patch_size=8, depth=1); leanvit.patch(m, 'tome', r=2); assert 'open_clip' not in "
            f"sys.modules; d = torch.load({str(path)!r}, weights_only=False); c = d['model'];"
            "assert torch.allclose(c.encode_image(d['x']), d['y'], atol=1e-6);"
            "assert type(c.visual.transformer.resblocks[0]).__name__ == 'ReducingResidualAttentionBlock';"
            "leanvit.unpatch(c); assert type(c.visual).__name__ == 'VisionTransformer'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ CLIP models
@pytest.mark.parametrize("cls", [CLIP, CustomTextCLIP])
def test_patch_the_model_or_its_tower(cls):
    x, t = image(), text()
    whole, tower = make_clip(cls), make_clip(cls)
    with torch.no_grad():
        text_ref = whole.encode_text(t)
    text_classes = [type(m) for n, m in whole.named_modules() if not n.startswith("visual")]
    leanvit.patch(whole, "gtp", r=2)
    leanvit.patch(tower.visual, "gtp", r=2)
    assert is_patched(whole) and not is_patched(whole.visual) and not is_patched(tower)
    with torch.no_grad():  # encode_image reduces, the same through either object; the text tower is untouched
        torch.testing.assert_close(whole.encode_image(x), tower.encode_image(x), atol=0, rtol=0)
        torch.testing.assert_close(whole.encode_text(t), text_ref, atol=0, rtol=0)
        feats = whole(x, t)
    assert [type(m) for n, m in whole.named_modules() if not n.startswith("visual")] == text_classes
    assert feats[0].shape == (2, SMALL["output_dim"]) and torch.isfinite(feats[0]).all()
    # one or the other: a tower patched through one object cannot be patched through the other
    with pytest.raises(UnsupportedModelError, match="already patched"):
        leanvit.patch(whole.visual, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="already patched"):
        leanvit.patch(tower, "tome", r=2)
    leanvit.unpatch(tower.visual)
    leanvit.patch(tower, "tome", r=2)  # now it can
    leanvit.unpatch(whole)
    assert not any(k.startswith("_leanvit") for m in whole.modules() for k in m.__dict__)


def test_budget_is_a_fraction_of_the_towers_macs_at_its_image_size():
    whole = make_clip(patch_size=4, layers=3)
    tower = make_tower(base=WIDE)
    leanvit.patch(whole, "gtp", budget=0.7)
    leanvit.patch(tower, "gtp", budget=0.7)
    a, b = get_reducer(whole).report, get_reducer(tower).report
    assert a["schedule"] == b["schedule"] and any(a["schedule"])
    assert a["macs"] == b["macs"] and a["dense_macs"] == b["dense_macs"] and a["achieved"] <= 0.7
    assert not is_patched(whole.visual)
    with torch.no_grad():
        assert whole.encode_image(image()).shape == (2, SMALL["output_dim"])


def test_refuses_what_would_be_wrong():
    x = image()
    tower = make_tower()
    leanvit.patch(tower, "tome", r=2)
    blk = tower.transformer.resblocks[0]
    h = torch.randn(2, 17, SMALL["width"])
    with pytest.raises(UnsupportedModelError, match="attention mask"):
        blk(h, attn_mask=torch.zeros(17, 17))
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        blk(h, h, h)
    with pytest.raises(UnsupportedModelError, match="NCHW"):
        tower.forward_intermediates(x)
    assert len(tower.forward_intermediates(x, output_fmt="NLC")["image_intermediates"]) == SMALL["layers"]
    tower.set_grad_checkpointing(True)
    with pytest.raises(UnsupportedModelError, match="gradient checkpointing"):
        tower(x)
    tower.set_grad_checkpointing(False)
    dropping = make_tower(patch_dropout=0.5).train()
    leanvit.patch(dropping, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="patch_dropout"):
        dropping(x)
    leanvit.patch(dropping, "tome", r=0)  # nothing removed: any token count runs
    dropping(x)
    with pytest.raises(UnsupportedModelError, match="scaled cosine"):
        leanvit.patch(make_tower(scaled_cosine_attn=True), "tome", r=2)
    clip = make_clip()
    with pytest.raises(UnsupportedModelError, match="not an image tower"):
        leanvit.patch(clip.transformer, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        leanvit.patch(make_clip(layers=(1, 1, 1, 1), width=32, head_width=16), "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="trunk"):
        leanvit.patch(make_clip(timm_model_name="vit_tiny_patch16_224", layers=1), "tome", r=2)
    assert not adapter.OpenCLIPAdapter().claims(nn.Linear(2, 2))


@pytest.mark.parametrize("method", list(METHODS))
def test_train_mode_gradients(method):
    tower = make_tower().train()
    x = image()
    ref = tower(x)
    leanvit.patch(tower, method, **zero(method))
    torch.testing.assert_close(tower(x), ref, atol=1e-5, rtol=1e-5)
    leanvit.patch(tower, method, **some(method))
    tower(x).sum().backward()
    assert tower.class_embedding.grad is not None
    assert tower.transformer.resblocks[0].attn.in_proj_weight.grad is not None


def test_idle_training_path_is_its_inference_path_with_custom_blocks():
    """Idling's masked (training) path gates the block outputs; ``ln_attn`` (not zero at zero) must come before the
    gate for it to equal the gathered (inference) path."""
    tower = make_tower(base=WIDE, **TOWERS["custom"], output_tokens=True)  # idle tokens are outputs too
    leanvit.patch(tower, "idle", keep=0.7)
    assert any(get_reducer(tower).schedule)
    x = image()
    eval_out = run(tower, x)
    tower.train()
    torch.testing.assert_close(run(tower, x), eval_out, atol=1e-5, rtol=1e-5)


def test_compiles_as_one_graph():
    tower = make_tower(pool_type="avg")
    leanvit.patch(tower, "tome", r=2)
    x = image()
    ref = run(tower, x)
    compiled = torch.compile(tower, fullgraph=True, backend="eager")
    torch.testing.assert_close(run(compiled, x), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ pooling by size
class _Sizes:
    """Stands for a reducer whose forward left tokens of the given sizes."""

    def __init__(self, size: torch.Tensor):
        self.size = size

    def for_thread(self) -> "_Sizes":
        return self

    def current_sizes(self) -> torch.Tensor:
        return self.size


def test_pooling_counts_a_token_as_the_patches_it_stands_for():
    """Average pooling and the attentional pooler see a token of size s as s copies of it."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    size = torch.tensor([[1.0, 3, 1, 2, 1, 4], [1.0, 1, 5, 1, 2, 1]])  # the cls token first, size 1
    repeated = [x[b].repeat_interleave(size[b].long(), 0) for b in range(2)]  # each (sum(size), C)
    pooler = AttentionalPooler(16, 64, n_head=2, n_queries=3).eval()
    ref = torch.cat([pooler(r[None]) for r in repeated])
    pooler.__class__ = adapter.reducing_class(AttentionalPooler)
    pooler.__dict__[adapter.SIZES_ATTR] = _Sizes(size)
    torch.testing.assert_close(pooler(x), ref, atol=1e-5, rtol=1e-5)
    tower = make_tower(pool_type="avg")
    tower.__class__ = adapter.reducing_class(VisionTransformer)
    tower.__dict__[adapter.SIZES_ATTR] = _Sizes(size)
    pooled, _ = tower._global_pool(x)
    torch.testing.assert_close(pooled, torch.stack([r[1:].mean(0) for r in repeated]), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ the same as timm
def to_timm(state: dict[str, torch.Tensor], depth: int, output_dim: int) -> dict[str, torch.Tensor]:
    """An open_clip tower's state dict in the names of timm's ``VisionTransformer(pre_norm=True)``; the projection
    ``proj`` ``(C, D)`` is the head ``Linear`` (weight ``proj.T``, zero bias)."""
    t = {"patch_embed.proj.weight": state["conv1.weight"], "cls_token": state["class_embedding"].reshape(1, 1, -1),
         "pos_embed": state["positional_embedding"].unsqueeze(0), "head.weight": state["proj"].T.contiguous(),
         "head.bias": torch.zeros(output_dim, dtype=state["proj"].dtype)}
    for ours, theirs in (("norm_pre", "ln_pre"), ("norm", "ln_post")):
        for w in ("weight", "bias"):
            t[f"{ours}.{w}"] = state[f"{theirs}.{w}"]
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "attn.q_norm": "attn.ln_q", "attn.k_norm": "attn.ln_k",
             "attn.norm": "attn.ln_inner", "mlp.norm": "mlp.ln", "ls1": "ls_1", "ls2": "ls_2"}
    for i in range(depth):
        p = f"transformer.resblocks.{i}."
        for ours, theirs in names.items():
            for w in ("weight", "bias", "gamma"):
                key = p + (theirs + "_" + w if theirs == "attn.in_proj" else f"{theirs}.{w}")
                if key in state:
                    t[f"blocks.{i}.{ours}.{w}"] = state[key]
    return t


def timm_twin(tower: VisionTransformer, cfg: dict, pool: str) -> TimmViT:
    """timm's ViT with ``tower``'s weights (strict: every key mapped); CLIP's pre-norm and bias-free patch embedding,
    open_clip's LayerNorm eps, the custom blocks' q/k norm, attention norm and MLP norm."""
    custom = cfg.get("qk_norm", False)
    tm = TimmViT(img_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["width"],
                 depth=cfg["layers"], num_heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=True,
                 pre_norm=True, init_values=cfg.get("ls_init_value"), class_token=True,
                 global_pool="token" if pool == "tok" else "avg", fc_norm=False, num_classes=cfg["output_dim"],
                 norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer=nn.GELU, qk_norm=custom,
                 scale_attn_norm=custom, scale_mlp_norm=custom)
    tm.load_state_dict(to_timm(tower.state_dict(), cfg["layers"], cfg["output_dim"]))
    return tm.eval()


def both(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image tokens after the final norm, the projected pooled output) in either library."""
    with torch.no_grad():
        if isinstance(model, TimmViT):
            f = model.forward_features(x)
            return f[:, 1:], model.forward_head(f)
        pooled, tokens = model(x)
        return tokens, pooled


AMOUNTS = [("gtp", {"r": 2}), ("tome", {"r": 2}), ("evit", {"r": 2}), ("idle", {"keep": 0.7}),
           ("truncate", {"r": 2})]
BUDGETS = [("gtp", {"budget": 0.7}), ("idle", {"budget": 0.7})]
VARIANTS = {"tok": dict(ls_init_value=0.5), "avg": dict(pool_type="avg", ls_init_value=0.5),
            "custom": dict(qk_norm=True, scale_attn_inner=True, scale_fc=True), "seq_first": {}}
CASES = ([(m, a, v) for v in VARIANTS for m, a in AMOUNTS]
         + [(m, a, v) for v in ("tok", "avg") for m, a in BUDGETS])  # budgets on the plain blocks


@pytest.mark.parametrize("method,amount,variant", CASES, ids=[f"{m}-{list(a)[0]}-{v}" for m, a, v in CASES])
def test_same_weights_same_output_as_timm(method, amount, variant):
    cfg = {**WIDE, **VARIANTS[variant]}
    tower = make_tower(base=WIDE, **VARIANTS[variant], output_tokens=True).double()
    tm = timm_twin(tower, cfg, cfg.get("pool_type", "tok")).double()
    if variant == "seq_first":  # open_clip's sequence-first blocks (before batch_first): the same weights
        seq = Transformer(cfg["width"], cfg["layers"], cfg["heads"], cfg["mlp_ratio"], batch_first=False)
        seq.load_state_dict(tower.transformer.state_dict())
        tower.transformer = seq.double().eval()
        assert not tower.transformer.resblocks[0].attn.batch_first
    x = image().double()
    torch.testing.assert_close(both(tower, x), both(tm, x), atol=1e-8, rtol=1e-8)  # dense
    leanvit.patch(tower, method, **amount)
    leanvit.patch(tm, method, **amount)
    assert get_reducer(tower).schedule == get_reducer(tm).schedule and any(get_reducer(tower).schedule)
    a, b = both(tower, x), both(tm, x)
    assert a[0].shape == b[0].shape and (a[0].shape[1] < 64 or method == "idle")
    torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
    if "budget" in amount:  # open_clip's dense MACs count its nn.MultiheadAttention, as timm's its Attention
        for key in ("dense_macs", "macs"):
            assert get_reducer(tower).report[key] == get_reducer(tm).report[key]


@pytest.mark.parametrize("method", ["gtp", "tome", "evit", "truncate"])
def test_restore_gives_whole_grids_of_intermediates_and_tokens(method):
    tower = make_tower(pool_type="none")
    x = image()
    with torch.no_grad():
        ref = tower.forward_intermediates(x, indices=[0, 1], normalize_intermediates=True)
        leanvit.patch(tower, method, r=0, restore=True)
        zero_ = tower.forward_intermediates(x, indices=[0, 1], normalize_intermediates=True)
        leanvit.patch(tower, method, r=3, restore=True)
        out = tower.forward_intermediates(x, indices=[0, 1], normalize_intermediates=True)
        tokens = tower(x)  # pool_type none: the projected tokens
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(zero_["image_intermediates"],
                                                                ref["image_intermediates"]))
    assert [t.shape for t in out["image_intermediates"]] == [(2, 64, 4, 4)] * 2
    assert not torch.allclose(out["image_intermediates"][1], ref["image_intermediates"][1], atol=1e-3)
    assert tokens.shape == (2, 17, 16)  # cls and every grid position are back
