"""A batch of 0 images through a patched model gives an empty output instead of an error, as timm's own ViT does:
every method (with and without tracing, GTP's options that take other code paths), eval and train mode,
``forward`` and ``forward_features``, and the pyramid adapter. Batches of 0 occur at the end of a sharded or
filtered evaluation set; they must not need a special case in the caller.

``forward`` gives the dense model's shape, ``(0, num_classes)``. ``forward_features`` gives the patched model's own
token count with a batch of 0, the shape it gives for one image with the batch dimension 0 (for idling, which keeps
every token, that is the dense shape): so that features of an empty batch concatenate with those of the others."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import leanvit
from leanvit.errors import LeanvitError
from leanvit.reduce import METHODS, get_reducer

from conftest import image, make


def _amount(method: str) -> dict:
    return dict(keep=0.7) if method == "idle" else dict(r=2)


# (method, options): every registered method, then GTP's options that change its code paths
CASES = [(m, {}) for m in METHODS] + [
    ("gtp", dict(score="cls")),
    ("gtp", dict(score="random")),
    ("gtp", dict(orphans="nearest")),
    ("gtp", dict(orphans="merge")),
    ("gtp", dict(orphans="merge", prop_attn=False)),
    ("gtp", dict(prop_attn=False)),
    ("gtp", dict(score_path="fused")),
    ("gtp", dict(theta=0.5)),
    ("gtp", dict(graph="semantic")),
    ("gtp", dict(graph="spatial", stats=True)),
    ("truncate", dict(point="attn")),
    ("evit", dict(fuse=None)),
    ("idle", dict(path="masked")),
    ("idle", dict(path="gather")),
]


def _ids(case) -> str:
    method, opts = case
    return "-".join([method] + [f"{k}={v}" for k, v in opts.items()])


def _pyramid(model: torch.nn.Module) -> bool:
    return not isinstance(model, timm.models.VisionTransformer)


def _outputs(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.set_grad_enabled(grad):
        return model(x), model.forward_features(x)


def _check_empty(dense: torch.nn.Module, patched: torch.nn.Module, mode: str, grad: bool = False) -> None:
    getattr(dense, mode)()
    getattr(patched, mode)()
    one = image(batch=1)
    # timm's PVT v2 itself cannot take an empty batch (its stages reshape with -1): its shapes come from one image
    ref, ref_f = _outputs(dense, one if _pyramid(dense) else one[:0], False)
    one_f = _outputs(patched, one, False)[1]
    out, out_f = _outputs(patched, one[:0], grad)
    assert out.shape == (0, *ref.shape[1:]), (out.shape, ref.shape)
    assert out_f.shape == (0, *one_f.shape[1:]), (out_f.shape, one_f.shape)
    if not get_reducer(patched).reducing or get_reducer(patched).keeps_all_tokens:
        assert out_f.shape == (0, *ref_f.shape[1:]), (out_f.shape, ref_f.shape)
    assert out.dtype == ref.dtype and out_f.dtype == ref_f.dtype
    if grad:  # a training step on an empty batch back-propagates (nothing) without an error
        out.sum().backward()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("trace", [False, True])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_empty_batch_gives_the_dense_shape(case, trace, mode):
    method, opts = case
    dense = make("deit", depth=3)
    patched = leanvit.patch(copy.deepcopy(dense), method, trace=trace, **_amount(method), **opts)
    _check_empty(dense, patched, mode)


@pytest.mark.parametrize("variant", ["registers_layerscale", "no_cls_avg", "deit_distilled"])
@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch_other_layouts(method, variant):
    dense = make(variant, depth=3)
    if method in ("evit", "idle") and variant == "no_cls_avg":  # they select by the cls query: refused by name
        with pytest.raises(LeanvitError, match="cls"):
            leanvit.patch(copy.deepcopy(dense), method, **_amount(method))
        return
    patched = leanvit.patch(copy.deepcopy(dense), method, **_amount(method))
    _check_empty(dense, patched, "eval")


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch_trains(method):
    dense = make("deit", depth=3)
    patched = leanvit.patch(copy.deepcopy(dense), method, **_amount(method))
    _check_empty(dense, patched, "train", grad=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("path", ["auto", "masked", "gather"])
def test_empty_batch_pyramid(path, mode):
    torch.manual_seed(0)
    dense = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10, embed_dims=(16, 32, 48, 64),
                              num_heads=(1, 2, 3, 4), depths=(1, 2, 2, 1)).eval()
    patched = leanvit.patch(copy.deepcopy(dense), "idle", keep=0.5, path=path)
    _check_empty(dense, patched, mode)


@pytest.mark.parametrize("method", list(METHODS))
def test_nonempty_batch_after_empty_one(method):
    # the state an empty forward leaves behind does not leak into the next forward
    model = leanvit.patch(make("deit", depth=3), method, **_amount(method))
    x = image(batch=2)
    with torch.no_grad():
        ref = model(x)
        model(x[:0])
        out = model(x)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch_compiles_as_one_graph(method):
    # the empty-batch handling is static for a fixed shape: a compiled forward of 0 images is still one graph
    model = leanvit.patch(make("deit", depth=3), method, **_amount(method))
    x = image(batch=0)
    with torch.no_grad():
        torch._dynamo.reset()
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert out.shape == (0, 10)
