"""transformers SigLIP and DINOv2 through the adapter (:mod:`leanvit.reduce.adapters.hf_more`).

Small random models (width 32, 3 layers, 48-pixel images of 8-pixel patches: 36 image tokens). Every family and
method is exact at zero reduction (eager and SDPA), reduces tokens otherwise or is refused naming the model; the
heads that pool tokens weigh merged tokens by their size, checked against the same tokens repeated; and the same
weights in timm's ``VisionTransformer`` (LayerScale, registers; no cls token for SigLIP) give the same patched
tokens in float64.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import leanvit  # noqa: E402
import leanvit.reduce.adapters.hf_more  # noqa: E402,F401  (registers the families; leanvit.reduce.adapters does too)
from leanvit.analysis.macs import count_macs  # noqa: E402
from leanvit.errors import ConfigError, UnsupportedModelError  # noqa: E402
from leanvit.ops.schedule import tokens_macs  # noqa: E402
from leanvit.reduce import METHODS, get_reducer, is_patched  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (  # noqa: E402
    Dinov2Config, Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification, Dinov2WithRegistersModel, SiglipConfig, SiglipForImageClassification,
    SiglipModel, SiglipTextConfig, SiglipVisionConfig, SiglipVisionModel)

IMAGE, PATCH, REGS = 48, 8, 2
TOKENS = (IMAGE // PATCH) ** 2  # image tokens of the native grid
VISION = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
SIGLIP = dict(VISION, intermediate_size=64)
DINOV2 = dict(VISION, mlp_ratio=2, layerscale_value=0.5)
TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, projection_size=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)
SIGLIPS = ("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification")
DINOS = ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
         "Dinov2WithRegistersForImageClassification")
IMPLS = ("eager", "sdpa")
CLS_METHODS = {"evit": {}, "idle": {}, "gtp": {"score": "cls"}}  # what needs a cls token, with the options


def make(name: str, impl: str = "sdpa", seed: int = 0, **cfg) -> nn.Module:
    """A small random model; embeddings (cls, registers, positions) drawn large, so that tokens differ clearly."""
    torch.manual_seed(seed)
    if name.startswith("Siglip"):
        vision = SiglipVisionConfig(**{**SIGLIP, **cfg})
        if name == "SiglipVisionModel":
            cls, config = SiglipVisionModel, vision
        else:
            cls = SiglipModel if name == "SiglipModel" else SiglipForImageClassification
            config = SiglipConfig(text_config=SiglipTextConfig(**TEXT).to_dict(), vision_config=vision.to_dict(),
                                  num_labels=5)
    elif name.startswith("Dinov2WithRegisters"):
        config = Dinov2WithRegistersConfig(**{**DINOV2, "num_register_tokens": REGS, "num_labels": 5, **cfg})
        cls = Dinov2WithRegistersModel if name.endswith("Model") else Dinov2WithRegistersForImageClassification
    else:
        config = Dinov2Config(**{**DINOV2, "num_labels": 5, **cfg})
        cls = Dinov2Model if name.endswith("Model") else Dinov2ForImageClassification
    model = cls._from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "embeddings" in n and "patch" not in n:
                p.normal_(0, 0.5)
    return model


def image(batch: int = 2, seed: int = 1, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def base_of(model: nn.Module) -> nn.Module:
    for attr in ("vision_model", "dinov2", "dinov2_with_registers"):
        if hasattr(model, attr):
            return getattr(model, attr)
    return model


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's pooled output, image embedding or logits; the base model's last hidden state)."""
    with torch.no_grad():
        if isinstance(model, SiglipModel):
            head = model.get_image_features(pixel_values=x).pooler_output
        else:
            o = model(pixel_values=x)
            head = o.logits if hasattr(o, "logits") else o.pooler_output
        return head, base_of(model)(pixel_values=x).last_hidden_state


def prefix(name: str) -> int:
    return 0 if name.startswith("Siglip") else 1 + REGS if "Registers" in name else 1


def zero(method: str) -> dict:
    return {"r": 0} if "r" in METHODS[method].amounts else {"keep": 1.0}


def some(method: str) -> dict:
    return {"r": 2} if "r" in METHODS[method].amounts else {"keep": 0.7}


def refused_for_cls(model: nn.Module, method: str, **amount) -> None:
    """The method is refused, naming the model, its family and the missing cls token, and leaves it unpatched."""
    name = type(model).__name__
    with pytest.raises(ConfigError, match=rf"'{method}' to {name}: SigLIP models have no cls token, and .*cls"):
        leanvit.patch(model, method, **amount, **CLS_METHODS[method])
    assert not is_patched(model)
    assert all(type(m).__module__.startswith(("transformers.", "torch.")) for m in model.modules())


# ------------------------------------------------------------------------------------------ exactness, reduction
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SIGLIPS + DINOS)
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_reduction_is_the_unpatched_model(method, name, impl):
    model = make(name, impl)
    x = image()
    ref = run(model, x)
    if name.startswith("Siglip") and method in ("evit", "gtp"):
        if method == "evit":  # refused at any amount
            refused_for_cls(model, method, **zero(method))
            return
        refused_for_cls(model, method, r=2)  # GTP's cls score; its other scores run below
    if name.startswith("Siglip") and method == "idle":  # keep=1 idles nothing and is allowed; a real keep is not
        refused_for_cls(model, method, keep=0.7)
    leanvit.patch(model, method, **zero(method))
    assert is_patched(model)
    torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5)
    if name.startswith("Siglip") and method == "idle":
        return
    leanvit.patch(model, method, **some(method))  # and a reducing patch runs and changes the token count
    head, tokens = run(model, x)
    assert head.shape == ref[0].shape and torch.isfinite(head).all() and not torch.allclose(head, ref[0])
    n = prefix(name) + TOKENS
    assert tokens.shape[1] == (n if method == "idle" else n - sum(get_reducer(model).schedule))
    assert tokens.shape[1] < n or method == "idle"


def test_siglip_refuses_what_needs_a_cls_token_by_name():
    model = make("SiglipModel")
    for method in CLS_METHODS:
        refused_for_cls(model, method, **some(method))
        refused_for_cls(model, method, budget=0.8)
    refused_for_cls(make("SiglipVisionModel"), "evit", keep=0.7)
    leanvit.patch(model, "tome", r=2)  # a failed re-patch leaves the earlier patch in place
    with pytest.raises(ConfigError, match="SigLIP models have no cls token"):
        leanvit.patch(model, "evit", r=2)
    assert get_reducer(model).name == "tome"
    # the SigLIP refusal is about the cls token only: an impossible schedule is refused as such
    with pytest.raises(ConfigError) as e:
        leanvit.patch(make("SiglipVisionModel"), "tome", r=[40, 0, 0])
    assert "cls" not in str(e.value)


# ------------------------------------------------------------------------------------------ pooling with token sizes
def repeated(tokens: torch.Tensor, size: torch.Tensor) -> list[torch.Tensor]:
    """Every image's tokens ``(n, C)`` with each token repeated ``size`` times (integer sizes: ToMe's merges)."""
    reps = size.round().long()
    torch.testing.assert_close(reps.to(size.dtype), size)  # ToMe's sizes are counts of patches
    return [t.repeat_interleave(s, dim=0) for t, s in zip(tokens, reps)]


def test_siglip_pooling_head_counts_each_merged_token_for_its_patches():
    model = make("SiglipVisionModel")
    x = image()
    leanvit.patch(model, "tome", r=4)
    pooled, tokens = run(model, x)
    size = get_reducer(model).current_sizes()  # (B, N) after the last layer
    assert size is not None and size.shape == tokens.shape[:2] and (size > 1).any()
    leanvit.unpatch(model)
    with torch.no_grad():  # the original head over the tokens repeated as many times as the patches they stand for
        expected = torch.cat([model.head(t[None]) for t in repeated(tokens, size)])
        plain = model.head(tokens)  # what the head would give counting every token once
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled, plain, atol=1e-4)
    # without sizes (truncate keeps none) the head is the original one over the tokens left
    leanvit.patch(model, "truncate", r=4)
    pooled, tokens = run(model, x)
    assert get_reducer(model).current_sizes() is None
    with torch.no_grad():
        torch.testing.assert_close(pooled, model.head(tokens), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["SiglipForImageClassification", "Dinov2ForImageClassification",
                                  "Dinov2WithRegistersForImageClassification"])
def test_classifier_mean_counts_each_merged_token_for_its_patches(name):
    model = make(name)
    x = image()
    leanvit.patch(model, "tome", r=4)
    logits, tokens = run(model, x)
    size = get_reducer(model).current_sizes()
    P = prefix(name)
    mean = torch.stack([t.mean(0) for t in repeated(tokens[:, P:], size[:, P:])])  # (B, C)
    features = mean if P == 0 else torch.cat([tokens[:, 0], mean], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.classifier(features), atol=1e-5, rtol=1e-5)
        out = model(pixel_values=x, labels=torch.tensor([1, 3]))  # labels: the loss is computed as before
        assert out.loss is not None and torch.isfinite(out.loss)
        as_tuple = model(pixel_values=x, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], logits)


# ------------------------------------------------------------------------------------------ restore, pickle, compile
@pytest.mark.parametrize("name", ["SiglipModel", "SiglipForImageClassification",
                                  "Dinov2WithRegistersForImageClassification"])
@pytest.mark.parametrize("method", ["tome", "gtp", "truncate"])
def test_unpatch_restores_exactly_and_pickles(method, name):
    model = make(name)
    x = image()
    ref = run(model, x)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    leanvit.patch(model, method, r=2)
    assert list(model.state_dict()) == keys  # no submodule added, none renamed
    reduced = run(model, x)
    clone = pickle.loads(pickle.dumps(model))
    assert get_reducer(clone).schedule == get_reducer(model).schedule
    torch.testing.assert_close(run(clone, x), reduced, atol=0, rtol=0)
    if name == "SiglipModel":  # the text tower is untouched, and the full forward reduces the image side
        ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
        assert all(type(m).__name__ == "SiglipEncoderLayer" for m in model.text_model.encoder.layers)
        with torch.no_grad():
            assert model(input_ids=ids, pixel_values=x).logits_per_image.shape == (2, 2)
    leanvit.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_leanvit") for m in model.modules() for k in m.__dict__)
    torch.testing.assert_close(run(model, x), ref, atol=0, rtol=0)


def test_unpickles_in_a_fresh_process(tmp_path):
    """Patched models saved whole load in a new interpreter that has imported only leanvit: importing leanvit
    registers the SigLIP and DINOv2 families (without importing transformers), before pickle meets their layers."""
    x = image()
    saved = {}
    for name in ("SiglipVisionModel", "Dinov2WithRegistersForImageClassification"):
        model = make(name)
        leanvit.patch(model, "tome", r=2)
        saved[name] = (model, run(model, x)[0])
    path = tmp_path / "m.pt"
    torch.save({"models": saved, "x": x}, path)
    code = ("import sys, torch, leanvit; from leanvit.reduce.adapters import hf_vit\n"
            "assert 'transformers' not in sys.modules\n"
            "assert {'siglip', 'dinov2', 'dinov2_with_registers'} <= set(hf_vit.FAMILIES), "
            "'leanvit.reduce.adapters must import hf_more'\n"
            f"d = torch.load({str(path)!r}, weights_only=False); x = d['x']\n"
            "for name, (m, y) in d['models'].items():\n"
            "    o = m(pixel_values=x); out = o.logits if hasattr(o, 'logits') else o.pooler_output\n"
            "    assert torch.allclose(out, y, atol=1e-6), name\n"
            "    assert type(m).__module__.startswith(('transformers.', 'leanvit.')), type(m)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["SiglipVisionModel", "Dinov2WithRegistersForImageClassification"])
def test_compiles_as_one_graph(name):
    model = make(name)
    leanvit.patch(model, "tome", r=2)  # token sizes reach the pooling head / the classifier's mean
    x = image()
    ref = run(model, x)[0]
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        o = compiled(pixel_values=x)
    torch.testing.assert_close(o.logits if hasattr(o, "logits") else o.pooler_output, ref, atol=1e-5, rtol=1e-5)


def test_train_mode_gradients_layerscale_and_drop_path():
    model = make("Dinov2WithRegistersForImageClassification", drop_path_rate=0.3)
    x = image()
    leanvit.patch(model, "tome", r=2)
    model.train()
    a, b = model(pixel_values=x).logits, model(pixel_values=x).logits
    assert not torch.equal(a, b)  # drop path follows model.train()
    a.sum().backward()
    layer = model.dinov2_with_registers.encoder.layer[0]
    assert layer.layer_scale1.lambda1.grad is not None and layer.layer_scale2.lambda1.grad is not None
    model.eval()
    torch.testing.assert_close(run(model, x), run(model, x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("name", ["SiglipModel", "SiglipForImageClassification", "Dinov2Model",
                                  "Dinov2WithRegistersForImageClassification"])
def test_budget_is_measured_at_the_models_own_image_size(name):
    model = make(name)
    leanvit.patch(model, "tome", budget=0.8)
    red = get_reducer(model)
    assert any(red.schedule) and red.report["achieved"] <= 0.8
    dense = make(name)
    tower = dense.vision_model if name == "SiglipModel" else dense  # SiglipModel(x) would take x as text
    assert red.report["dense_macs"] == count_macs(tower, (3, IMAGE, IMAGE)).macs
    run(model, image())


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_blocks_are_costed_as_measured(swiglu):
    """With nothing of the method's own to count (truncate), the measured MACs are the analytic ones: the MLP (or
    SwiGLU FFN) and the attention of every layer are costed right."""
    model = make("Dinov2WithRegistersModel", use_swiglu_ffn=swiglu)
    leanvit.patch(model, "truncate", budget=0.8)
    red = get_reducer(model)
    dense_blocks = tokens_macs(red.info.blocks, type(red).schedule_tokens([0] * red.info.depth, red.info))
    other = red.report["dense_macs"] - dense_blocks  # patch embedding (the only other matmul)
    assert other == count_macs(make("Dinov2WithRegistersModel").embeddings, (3, IMAGE, IMAGE)).macs
    assert red.report["macs"] == tokens_macs(red.info.blocks, red.block_tokens()) + other


# ------------------------------------------------------------------------------------------ refusals
def test_refuses_what_would_be_wrong():
    x = image()
    for name in ("SiglipVisionModel", "Dinov2WithRegistersModel"):
        model = make(name, "eager")
        leanvit.patch(model, "tome", r=2)
        with pytest.raises(UnsupportedModelError, match="output_attentions"):
            model(pixel_values=x, output_attentions=True)
        with pytest.raises(UnsupportedModelError, match="output_hidden_states"):
            model(pixel_values=x, output_hidden_states=True)
        layer = (model.encoder.layers if name.startswith("Siglip") else model.encoder.layer)[0]
        h = torch.randn(2, prefix(name) + TOKENS, 32)
        with pytest.raises(UnsupportedModelError, match="attention mask"):
            layer(h, torch.zeros(2, 1, h.shape[1], h.shape[1]))
        other = image(1, size=IMAGE + PATCH)  # DINOv2 interpolates its position embeddings, SigLIP when asked
        with pytest.raises(UnsupportedModelError, match="native size"):
            model(pixel_values=other, **({"interpolate_pos_encoding": True} if name.startswith("Siglip") else {}))
        # a schedule that removes nothing keeps every token: the unpatched model's hidden states, any input size
        leanvit.patch(model, "tome", r=0)
        ref = make(name, "eager")
        with torch.no_grad():
            a = model(pixel_values=x, output_hidden_states=True).hidden_states
            b = ref(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(a) == len(b) == 4
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-5)
    with pytest.raises(UnsupportedModelError, match="SiglipTextModel"):
        leanvit.patch(make("SiglipModel").text_model, "tome", r=2)
    whole = make("SiglipModel")
    leanvit.patch(whole, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="already patched"):
        leanvit.patch(whole.vision_model, "tome", r=2)
    backbone = transformers.Dinov2Backbone(Dinov2Config(**DINOV2, out_features=["stage3"])).eval()
    with pytest.raises(UnsupportedModelError, match="Dinov2Backbone"):
        leanvit.patch(backbone, "tome", r=2)


# ------------------------------------------------------------------------------------------ the same as timm
def dinov2_to_timm(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict (``Dinov2[WithRegisters]Model``'s transformers 5 names) in the names of timm's
    ``VisionTransformer`` with ``no_embed_class=True`` (the position embedding covers the patches; DINOv2's cls
    position goes into the cls token), ``init_values`` (LayerScale) and ``reg_tokens``."""
    sd = state
    pos = sd["embeddings.position_embeddings"]  # (1, 1 + n, C): cls position first
    t = {"cls_token": sd["embeddings.cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if "embeddings.register_tokens" in sd:
        t["reg_token"] = sd["embeddings.register_tokens"]
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for w in ("weight", "bias"):
            for ours, theirs in names.items():
                t[f"blocks.{i}.{ours}.{w}"] = sd[f"{p}{theirs}.{w}"]
            t[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([sd[f"{p}attention.{n}_proj.{w}"] for n in "qkv"])
        t[f"blocks.{i}.ls1.gamma"] = sd[f"{p}layer_scale1.lambda1"]
        t[f"blocks.{i}.ls2.gamma"] = sd[f"{p}layer_scale2.lambda1"]
    return t


def siglip_to_timm(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A ``SiglipVisionModel`` state dict without its pooling head in the names of timm's ``VisionTransformer`` with
    ``class_token=False`` (``norm`` = ``post_layernorm``)."""
    sd = state
    t = {"pos_embed": sd["embeddings.position_embedding.weight"][None],
         "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
         "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for w in ("weight", "bias"):
            for ours, theirs in names.items():
                t[f"blocks.{i}.{ours}.{w}"] = sd[f"{p}{theirs}.{w}"]
            t[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([sd[f"{p}self_attn.{n}_proj.{w}"] for n in "qkv"])
    return t


def timm_twin(name: str, hf: nn.Module) -> nn.Module:
    """timm's ViT with the HF model's weights (float64): DINOv2 as timm's ``vit_*_dinov2``/``_reg4_dinov2``
    arguments (LayerScale, registers, no_embed_class), SigLIP as a ViT without a cls token."""
    common = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, fc_norm=False)
    if name.startswith("Siglip"):
        tm = VisionTransformer(**common, mlp_ratio=2, class_token=False, global_pool="avg",
                               act_layer=partial(nn.GELU, approximate="tanh"))
        sd = siglip_to_timm(hf.state_dict(), 3)
    else:
        tm = VisionTransformer(**common, mlp_ratio=2, class_token=True, global_pool="token", init_values=1.0,
                               reg_tokens=REGS if "Registers" in name else 0, no_embed_class=True, act_layer=nn.GELU)
        sd = dinov2_to_timm(hf.state_dict(), 3)
    tm = tm.double().eval()
    tm.load_state_dict(sd)  # strict: every key mapped; in float64, as cls + position sums in float64 in HF's
    return tm


def tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            return model.forward_features(x)
        return model(pixel_values=x).last_hidden_state


DINO_AMOUNTS = [("gtp", {"r": 2}), ("tome", {"r": 2}), ("evit", {"r": 2}), ("idle", {"keep": 0.7}),
                ("truncate", {"r": 2}), ("gtp", {"budget": 0.8}), ("tome", {"budget": 0.8})]
SIGLIP_AMOUNTS = [("gtp", {"r": 2}), ("tome", {"r": 2}), ("truncate", {"r": 2}), ("gtp", {"score": "colsum", "r": 2})]


@pytest.mark.parametrize("name", ["Dinov2Model", "Dinov2WithRegistersModel"])
@pytest.mark.parametrize("method,amount", DINO_AMOUNTS, ids=[f"{m}-{list(a)[0]}" for m, a in DINO_AMOUNTS])
def test_dinov2_same_weights_same_output_as_timm(method, amount, name):
    hf = make(name).double()
    tm = timm_twin(name, hf)
    x = image().double()
    torch.testing.assert_close(tokens(hf, x), tokens(tm, x), atol=1e-10, rtol=1e-10)  # dense
    leanvit.patch(hf, method, **amount)
    leanvit.patch(tm, method, **amount)
    assert get_reducer(hf).schedule == get_reducer(tm).schedule and any(get_reducer(hf).schedule)
    a, b = tokens(hf, x), tokens(tm, x)
    assert a.shape == b.shape and (a.shape[1] < prefix(name) + TOKENS or method == "idle")
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if "budget" in amount:
        assert get_reducer(hf).report["macs"] == get_reducer(tm).report["macs"]
    # the classifier's size-weighted mean of the patch tokens is timm's size-weighted average pooling
    cls_name = name.replace("Model", "ForImageClassification")
    clf = make(cls_name).double()
    base_of(clf).load_state_dict(make(name).double().state_dict())  # the same weights as hf
    leanvit.patch(clf, method, **({"r": get_reducer(hf).schedule} if "budget" in amount else amount))
    with torch.no_grad():
        expected = clf.classifier(torch.cat([b[:, 0], tm.pool(b, "avg")], dim=1))
        torch.testing.assert_close(clf(pixel_values=x).logits, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method,amount", SIGLIP_AMOUNTS, ids=["gtp", "tome", "truncate", "gtp-colsum"])
def test_siglip_same_weights_same_tokens_as_timm(method, amount):
    hf = make("SiglipVisionModel").double()
    tm = timm_twin("SiglipVisionModel", hf)
    x = image().double()
    torch.testing.assert_close(tokens(hf, x), tokens(tm, x), atol=1e-10, rtol=1e-10)
    leanvit.patch(hf, method, **amount)
    leanvit.patch(tm, method, **amount)
    a, b = tokens(hf, x), tokens(tm, x)
    assert a.shape == b.shape and a.shape[1] < TOKENS
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
