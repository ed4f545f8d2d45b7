"""Hugging Face transformers ViT/DeiT through the adapter (:mod:`leanvit.reduce.adapters.hf_vit`).

The same weights in transformers' model and in timm's ``VisionTransformer`` give the same dense output and, patched
with each method, the same reduced output: one implementation of every method serves both libraries.
"""
from __future__ import annotations

import inspect
import pickle
import re
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import leanvit  # noqa: E402
from leanvit.errors import UnsupportedModelError  # noqa: E402
from leanvit.reduce import METHODS, get_reducer, is_patched  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import (  # noqa: E402
    DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTModel, ViTConfig,
    ViTForImageClassification, ViTModel)

SIZE = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=128, num_labels=10)
MODELS = {
    "ViTModel": (ViTModel, ViTConfig), "ViTForImageClassification": (ViTForImageClassification, ViTConfig),
    "DeiTModel": (DeiTModel, DeiTConfig), "DeiTForImageClassification": (DeiTForImageClassification, DeiTConfig),
    "DeiTForImageClassificationWithTeacher": (DeiTForImageClassificationWithTeacher, DeiTConfig),
}
IMPLS = ("eager", "sdpa")



def make_hf(name: str, impl: str = "sdpa", seed: int = 0, **cfg) -> nn.Module:
    cls, config_cls = MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**{**SIZE, **cfg})
    model = cls._from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():  # DeiT's embeddings start at zero: give every parameter something to carry
        for n, p in model.named_parameters():
            if "embeddings" in n:
                p.normal_(0, 0.5)
    return model


def image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(pixel_values=x)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def zero(method: str) -> dict:
    return {"r": 0} if "r" in METHODS[method].amounts else {"keep": 1.0}


def some(method: str) -> dict:
    return {"r": 2} if "r" in METHODS[method].amounts else {"keep": 0.7}


def layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "vit", None) or getattr(model, "deit", None) or model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


# ------------------------------------------------------------------------------------------ exactness, restore
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_reduction_is_the_unpatched_model(method, name, impl):
    model = make_hf(name, impl)
    x = image()
    ref = out(model, x)
    leanvit.patch(model, method, **zero(method))
    assert is_patched(model)
    torch.testing.assert_close(out(model, x), ref, atol=1e-5, rtol=1e-5)
    leanvit.patch(model, method, **some(method))  # and a reducing patch runs
    y = out(model, x)
    assert y.shape[0] == 2 and torch.isfinite(y).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_unpatch_restores_exactly_and_pickles(method):
    model = make_hf("DeiTForImageClassificationWithTeacher")
    x = image()
    ref = out(model, x)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    leanvit.patch(model, method, **some(method))
    assert list(model.state_dict()) == keys  # the attention view is not a submodule
    reduced = out(model, x)
    clone = pickle.loads(pickle.dumps(model))
    assert get_reducer(clone).schedule == get_reducer(model).schedule
    torch.testing.assert_close(out(clone, x), reduced)
    leanvit.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_leanvit") for layer in layers(model) for k in layer.__dict__)
    torch.testing.assert_close(out(model, x), ref, atol=0, rtol=0)


def unpickles_in_a_fresh_process(tmp_path, model, x, y, output: str, layer: str, layer_class: str) -> None:
    """A patched model saved whole loads in a new interpreter (which has imported only leanvit) and gives ``y``."""
    path = tmp_path / "m.pt"
    torch.save({"model": model, "x": x, "y": y}, path)
    code = (f"import torch, leanvit; d = torch.load({str(path)!r}, weights_only=False); m = d['model'];"
            f"y = m(pixel_values=d['x']).{output}; assert torch.allclose(y, d['y'], atol=1e-6);"
            f"assert type({layer}).__name__ == {layer_class!r}")
    subprocess.run([sys.executable, "-c", code], check=True)


def hidden_states_at_zero_reduction(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """A schedule that removes nothing keeps every token: ``output_hidden_states`` gives the unpatched model's."""
    leanvit.patch(model, "evit", r=0)
    with torch.no_grad():
        a = model(pixel_values=x, output_hidden_states=True).hidden_states
        b = ref(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(a) == len(b)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-5)


def test_unpickles_in_a_fresh_process(tmp_path):
    model = make_hf("ViTForImageClassification")
    leanvit.patch(model, "tome", r=2)
    x = image()
    unpickles_in_a_fresh_process(tmp_path, model, x, out(model, x), "logits",
                                 "(m.vit.layers if hasattr(m.vit, 'layers') else m.vit.encoder.layer)[0]",
                                 "ReducingViTLayer")


def test_claims_only_transformers_models_and_refuses_unknown_ones():
    from leanvit.reduce.adapters.hf_vit import HFViTAdapter

    assert not HFViTAdapter().claims(nn.Linear(2, 2))
    torch.manual_seed(0)
    mim = transformers.ViTForMaskedImageModeling(ViTConfig(**SIZE)).eval()
    with pytest.raises(UnsupportedModelError, match="ViTForMaskedImageModeling"):
        leanvit.patch(mim, "tome", r=2)


def test_claims_does_not_import_transformers():
    code = ("import sys, timm, leanvit; m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32,"
            " patch_size=8, depth=1); leanvit.patch(m, 'tome', r=2); assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_refuses_what_would_be_wrong():
    # a new model for each refusal: transformers 4.56-4.57 leave their output-recording wrappers in place after a
    # forward that raised (hf_vit._recording)
    model = make_hf("ViTForImageClassification", "eager")
    x = image()
    leanvit.patch(model, "evit", r=2)
    with pytest.raises(UnsupportedModelError, match="output_attentions"):
        model(pixel_values=x, output_attentions=True)
    model = make_hf("ViTForImageClassification", "eager")
    leanvit.patch(model, "evit", r=2)
    from transformers.models.vit.modeling_vit import ViTLayer

    old = "output_attentions" in inspect.signature(ViTLayer.forward).parameters
    if not old:  # transformers < 4.56 collects hidden states outside the layers, where leanvit cannot check
        with pytest.raises(UnsupportedModelError, match="output_hidden_states"):
            model(pixel_values=x, output_hidden_states=True)
    if hasattr(model.vit, "layers"):  # transformers 5: attention masks; 4: head_mask
        with pytest.raises(UnsupportedModelError, match="attention mask"):
            mask = torch.ones(2, 65, dtype=torch.bool)
            mask[:, -5:] = False  # (an all-ones mask is dropped by transformers before the layers)
            model(pixel_values=x, attention_mask=mask)
    else:
        with pytest.raises(UnsupportedModelError, match="head_mask"):
            model(pixel_values=x, head_mask=torch.ones(3, 4))
    model = make_hf("ViTForImageClassification", "eager")
    leanvit.patch(model, "evit", r=2)
    with pytest.raises(UnsupportedModelError, match="native size"):
        model(pixel_values=torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)
    hidden_states_at_zero_reduction(model, make_hf("ViTForImageClassification", "eager"), x)


def test_budget_is_measured_on_the_models_own_input_size():
    model = make_hf("ViTForImageClassification")
    leanvit.patch(model, "tome", budget=0.7)
    report = get_reducer(model).report
    assert report["achieved"] <= 0.7 and any(get_reducer(model).schedule)


# ------------------------------------------------------------------------------------------ the same as timm
def hf_to_timm(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """An HF ViT/DeiT state dict (transformers 4 or 5 names; with or without the ``vit.``/``deit.`` prefix) in timm
    ``VisionTransformer`` names."""
    sd = {re.sub(r"^(vit|deit)\.", "", k): v for k, v in state.items()}
    sd = {k.replace("encoder.layer.", "layers."): v for k, v in sd.items()}
    names = {  # timm name in block -> HF names (5, 4)
        "norm1": ("layernorm_before",), "norm2": ("layernorm_after",),
        "attn.proj": ("attention.o_proj", "attention.output.dense"),
        "mlp.fc1": ("mlp.fc1", "intermediate.dense"), "mlp.fc2": ("mlp.fc2", "output.dense"),
    }
    qkv = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
           ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
    t = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    if "embeddings.distillation_token" in sd:
        t["dist_token"] = sd["embeddings.distillation_token"]
    for theirs, ours in (("classifier", "head"), ("cls_classifier", "head"), ("distillation_classifier", "head_dist")):
        for w in ("weight", "bias"):
            if f"{theirs}.{w}" in sd:
                t[f"{ours}.{w}"] = sd[f"{theirs}.{w}"]
    for i in range(depth):
        p = f"layers.{i}."
        for ours, theirs in names.items():
            src = next(n for n in theirs if p + n + ".weight" in sd)
            for w in ("weight", "bias"):
                t[f"blocks.{i}.{ours}.{w}"] = sd[f"{p}{src}.{w}"]
        trio = next(tr for tr in qkv if p + tr[0] + ".weight" in sd)
        for w in ("weight", "bias"):
            t[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([sd[f"{p}{n}.{w}"] for n in trio])
    return t


def make_timm(distilled: bool) -> nn.Module:
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(img_size=SIZE["image_size"], patch_size=SIZE["patch_size"], embed_dim=SIZE["hidden_size"],
               depth=SIZE["num_hidden_layers"], num_heads=SIZE["num_attention_heads"],
               mlp_ratio=SIZE["intermediate_size"] / SIZE["hidden_size"], qkv_bias=True,
               norm_layer=partial(nn.LayerNorm, eps=1e-12), act_layer=nn.GELU, num_classes=SIZE["num_labels"]).eval()


def pair(name: str, impl: str) -> tuple[nn.Module, nn.Module]:
    hf = make_hf(name, impl).double()
    tm = make_timm(distilled=name.startswith("DeiT"))
    tm.load_state_dict(hf_to_timm(hf.state_dict(), SIZE["num_hidden_layers"]))  # strict: every key mapped
    return hf, tm.double()


def features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens after the final norm and the logits (DeiT: the mean of its two heads in both libraries)."""
    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            f = model.forward_features(x)
            return f, model.forward_head(f)
        o = model(pixel_values=x, output_hidden_states=False)
        base = getattr(model, "vit", None) or getattr(model, "deit", None)
        return base(pixel_values=x).last_hidden_state, o.logits


AMOUNTS = [("gtp", {"r": 2}), ("tome", {"r": 2}), ("evit", {"r": 2}), ("idle", {"keep": 0.7}),
           ("truncate", {"r": 2}), ("gtp", {"budget": 0.7}), ("tome", {"budget": 0.7}), ("evit", {"budget": 0.7}),
           ("idle", {"budget": 0.7})]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
@pytest.mark.parametrize("method,amount", AMOUNTS, ids=[f"{m}-{list(a)[0]}" for m, a in AMOUNTS])
def test_same_weights_same_output_as_timm(method, amount, name, impl):
    hf, tm = pair(name, impl)
    x = image().double()
    torch.testing.assert_close(features(hf, x), features(tm, x), atol=1e-5, rtol=1e-5)  # dense
    leanvit.patch(hf, method, **amount)
    leanvit.patch(tm, method, **amount)
    assert get_reducer(hf).schedule == get_reducer(tm).schedule
    assert any(get_reducer(hf).schedule)
    a, b = features(hf, x), features(tm, x)
    assert a[0].shape == b[0].shape and (a[0].shape[1] < 64 + 2 or method == "idle")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if "budget" in amount:
        assert get_reducer(hf).report["macs"] == get_reducer(tm).report["macs"]


# ------------------------------------------------------------------------------------------ compile
def test_compiles_as_one_graph():
    model = make_hf("ViTForImageClassification")
    leanvit.patch(model, "tome", r=2)
    x = image()
    ref = out(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        y = compiled(pixel_values=x).logits
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_train_mode_dropout_and_gradients(method):
    model = make_hf("ViTForImageClassification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    x = image()
    model.train()
    ref = model(pixel_values=x).logits
    leanvit.patch(model, method, **zero(method))
    torch.testing.assert_close(model(pixel_values=x).logits, ref, atol=1e-5, rtol=1e-5)
    leanvit.patch(model, method, **some(method))
    model(pixel_values=x).logits.sum().backward()
    assert model.vit.embeddings.cls_token.grad is not None
    # the layers' dropouts follow model.train()/eval(): two training forwards differ, two eval forwards do not
    drop = make_hf("ViTForImageClassification", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    leanvit.patch(drop, method, **some(method))
    drop.train()
    assert not torch.equal(drop(pixel_values=x).logits, drop(pixel_values=x).logits)
    drop.eval()
    torch.testing.assert_close(out(drop, x), out(drop, x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ CLIP's vision tower
from timm.layers import QuickGELU  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection)

CLIP_SIZE = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=128)
CLIP_TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIPS = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")


def make_clip(name: str, impl: str = "sdpa", seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**{**CLIP_SIZE, **cfg})
    if name == "CLIPModel":
        cls, config = CLIPModel, CLIPConfig(text_config=CLIPTextConfig(**CLIP_TEXT).to_dict(),
                                            vision_config=vision.to_dict(), projection_dim=16)
    else:
        cls, config = {"CLIPVisionModel": CLIPVisionModel,
                       "CLIPVisionModelWithProjection": CLIPVisionModelWithProjection}[name], vision
        if name == "CLIPVisionModelWithProjection":
            config.projection_dim = 16
    model = cls._from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():  # larger embeddings, so that the tokens differ clearly
        for n, p in model.named_parameters():
            if "vision_model.embeddings" in n or n.startswith("embeddings"):
                p.normal_(0, 0.5)
    return model


def clip_out(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image embedding or pooled output, the vision tower's last hidden state)."""
    with torch.no_grad():
        if isinstance(model, CLIPModel):
            o = model.get_image_features(pixel_values=x)
            return (o.pooler_output if hasattr(o, "pooler_output") else o), model.vision_model(
                pixel_values=x).last_hidden_state
        o = model(pixel_values=x)
        return (o.image_embeds if hasattr(o, "image_embeds") else o.pooler_output), o.last_hidden_state


def clip_layers(model: nn.Module) -> nn.ModuleList:
    return getattr(model, "vision_model", model).encoder.layers


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CLIPS)
@pytest.mark.parametrize("method", list(METHODS))
def test_clip_zero_reduction_is_the_unpatched_model(method, name, impl):
    model = make_clip(name, impl)
    x = image()
    ref = clip_out(model, x)
    leanvit.patch(model, method, **zero(method))
    assert is_patched(model)
    assert type(clip_layers(model)[0]).__name__ == "ReducingCLIPEncoderLayer"
    torch.testing.assert_close(clip_out(model, x), ref, atol=1e-5, rtol=1e-5)
    leanvit.patch(model, method, **some(method))  # and a reducing patch runs
    y, h = clip_out(model, x)
    assert y.shape == ref[0].shape and torch.isfinite(y).all()
    assert h.shape[1] < 65 or method == "idle"


@pytest.mark.parametrize("method", list(METHODS))
def test_clip_unpatch_restores_exactly_and_pickles(method):
    model = make_clip("CLIPModel")
    x = image()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = clip_out(model, x)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids).pooler_output
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    leanvit.patch(model, method, **some(method))
    assert list(model.state_dict()) == keys
    assert all(type(m).__name__ == "CLIPEncoderLayer" for m in model.text_model.encoder.layers)  # text untouched
    reduced = clip_out(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(input_ids=ids).pooler_output, text, atol=0, rtol=0)
        logits = model(input_ids=ids, pixel_values=x).logits_per_image  # the full forward, image side reduced
    assert logits.shape == (2, 2)
    clone = pickle.loads(pickle.dumps(model))
    assert get_reducer(clone).schedule == get_reducer(model).schedule
    torch.testing.assert_close(clip_out(clone, x), reduced)
    leanvit.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(k.startswith("_leanvit") for m in model.modules() for k in m.__dict__)
    torch.testing.assert_close(clip_out(model, x), ref, atol=0, rtol=0)


def test_clip_unpickles_in_a_fresh_process(tmp_path):
    model = make_clip("CLIPVisionModelWithProjection")
    leanvit.patch(model, "tome", r=2)
    x = image()
    unpickles_in_a_fresh_process(tmp_path, model, x, clip_out(model, x)[0], "image_embeds",
                                 "m.vision_model.encoder.layers[0]", "ReducingCLIPEncoderLayer")


def test_clip_patch_the_model_or_its_vision_tower():
    x = image()
    whole, tower = make_clip("CLIPModel"), make_clip("CLIPModel")
    leanvit.patch(whole, "gtp", r=2)
    leanvit.patch(tower.vision_model, "gtp", r=2)
    assert is_patched(whole) and not is_patched(whole.vision_model) and not is_patched(tower)
    torch.testing.assert_close(clip_out(whole, x), clip_out(tower, x), atol=0, rtol=0)
    # one or the other: the layers of a tower patched through one object cannot be patched through the other
    with pytest.raises(UnsupportedModelError, match="already patched"):
        leanvit.patch(whole.vision_model, "tome", r=2)
    with pytest.raises(UnsupportedModelError, match="already patched"):
        leanvit.patch(tower, "tome", r=2)
    leanvit.unpatch(tower.vision_model)
    leanvit.patch(tower, "tome", r=2)  # now it can
    # budget=: a fraction of the vision tower's MACs, the same schedule either way
    leanvit.patch(whole, "gtp", budget=0.7)
    vision = make_clip("CLIPVisionModel")
    leanvit.patch(vision, "gtp", budget=0.7)
    a, b = get_reducer(whole).report, get_reducer(vision).report
    assert a["schedule"] == b["schedule"] and a["macs"] == b["macs"] and a["achieved"] <= 0.7
    assert not is_patched(whole.vision_model)
    clip_out(whole, x)


def test_clip_refuses_what_would_be_wrong():
    x = image()
    model = make_clip("CLIPVisionModel", "eager")
    leanvit.patch(model, "evit", r=2)
    with pytest.raises(UnsupportedModelError, match="output_attentions"):
        model(pixel_values=x, output_attentions=True)
    with pytest.raises(UnsupportedModelError, match="output_hidden_states"):
        model(pixel_values=x, output_hidden_states=True)
    h = torch.randn(2, 65, 64)
    with pytest.raises(UnsupportedModelError, match="attention mask"):
        model.encoder.layers[0](h, torch.zeros(2, 1, 65, 65))
    with pytest.raises(UnsupportedModelError, match="attention mask"):
        model.encoder.layers[0](h, None, causal_attention_mask=torch.zeros(2, 1, 65, 65))
    with pytest.raises(UnsupportedModelError, match="native size"):
        model(pixel_values=torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)
    with pytest.raises(UnsupportedModelError, match="CLIPTextModel"):
        leanvit.patch(make_clip("CLIPModel").text_model, "tome", r=2)
    hidden_states_at_zero_reduction(model, make_clip("CLIPVisionModel", "eager"), x)


def clip_to_timm(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A CLIP vision state dict (``CLIPVisionModel``'s names, with or without ``vision_model.``; a ``CLIPModel``'s
    text tower and projections are dropped) in the names of timm's ``VisionTransformer`` with ``pre_norm=True``
    (``norm_pre`` = ``pre_layrnorm``, ``norm`` = ``post_layernorm``), ``class_token=True``, ``num_classes=0``."""
    sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in state.items()}
    t = {"cls_token": sd["embeddings.class_embedding"].reshape(1, 1, -1),
         "pos_embed": sd["embeddings.position_embedding.weight"].unsqueeze(0),
         "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"]}  # CLIP's patch embedding has no bias
    for ours, theirs in (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")):
        for w in ("weight", "bias"):
            t[f"{ours}.{w}"] = sd[f"{theirs}.{w}"]
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        p = f"encoder.layers.{i}."
        for w in ("weight", "bias"):
            for ours, theirs in names.items():
                t[f"blocks.{i}.{ours}.{w}"] = sd[f"{p}{theirs}.{w}"]
            t[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([sd[f"{p}self_attn.{n}_proj.{w}"] for n in "qkv"])
    return t


def make_timm_clip(act: str, eps: float) -> nn.Module:
    """timm's ``vit_base_patch16_clip_224`` arguments at CLIP_SIZE."""
    return VisionTransformer(
        img_size=CLIP_SIZE["image_size"], patch_size=CLIP_SIZE["patch_size"], embed_dim=CLIP_SIZE["hidden_size"],
        depth=CLIP_SIZE["num_hidden_layers"], num_heads=CLIP_SIZE["num_attention_heads"],
        mlp_ratio=CLIP_SIZE["intermediate_size"] / CLIP_SIZE["hidden_size"], qkv_bias=True, pre_norm=True,
        act_layer=QuickGELU if act == "quick_gelu" else nn.GELU, norm_layer=partial(nn.LayerNorm, eps=eps),
        class_token=True, global_pool="token", fc_norm=False, num_classes=0).eval()


def clip_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(all tokens after the final norm, the pooled cls token): timm's ``forward_features`` and
    ``forward_head(pre_logits=True)``; CLIP's ``post_layernorm(last_hidden_state)`` and ``pooler_output``."""
    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            f = model.forward_features(x)
            return f, model.forward_head(f, pre_logits=True)
        tower = model.vision_model
        o = tower(pixel_values=x)
        return tower.post_layernorm(o.last_hidden_state), o.pooler_output


CLIP_AMOUNTS = [("gtp", {"r": 2}), ("tome", {"r": 2}), ("evit", {"r": 2}), ("idle", {"keep": 0.7})]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("method,amount", CLIP_AMOUNTS, ids=[m for m, _ in CLIP_AMOUNTS])
def test_clip_same_weights_same_output_as_timm(method, amount, impl, act):
    hf = make_clip("CLIPModel", impl, hidden_act=act).double()
    eps = hf.config.vision_config.layer_norm_eps
    tm = make_timm_clip(act, eps)
    tm.load_state_dict(clip_to_timm(hf.state_dict(), CLIP_SIZE["num_hidden_layers"]))  # strict: every key mapped
    tm = tm.double()
    x = image().double()
    torch.testing.assert_close(clip_features(hf, x), clip_features(tm, x), atol=1e-5, rtol=1e-5)  # dense
    leanvit.patch(hf, method, **amount)
    leanvit.patch(tm, method, **amount)
    assert get_reducer(hf).schedule == get_reducer(tm).schedule
    assert any(get_reducer(hf).schedule)
    a, b = clip_features(hf, x), clip_features(tm, x)
    assert a[0].shape == b[0].shape and (a[0].shape[1] < 65 or method == "idle")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the image embedding is the projection of that pooled output
        emb = hf.get_image_features(pixel_values=x)
        emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb
    torch.testing.assert_close(emb, hf.visual_projection(b[1]), atol=1e-5, rtol=1e-5)
