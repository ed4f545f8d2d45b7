"""Models of other libraries on the command line: ``-m hf:PATH`` and ``-m open_clip:ARCH --weights FILE`` in eval,
bench, compare and vis (:mod:`leanvit.models.external`).

Every model is built here from a small config with random weights and saved the way its library saves it
(transformers' ``save_pretrained``; open_clip: a state dict with a registered model config, or open_clip's
``local-dir`` folder); nothing is downloaded. The preprocessing leanvit reads from a model's config is checked
against the library's own image processor on the same images.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leanvit.errors import ConfigError

TINY = dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
QUIET = ("--no-progress",)
BENCH = ("--runs", "1", "--warmup", "0", "--batch-size", "2")


def _transformers():
    return pytest.importorskip("transformers")


def _open_clip():
    return pytest.importorskip("open_clip")


def _save(model, folder: Path, processor=None) -> Path:
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def _error_line(err: str) -> str:
    """The CLI's one error line (the notes before it are on their own lines)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("leanvit: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two class folders ``a`` and ``b`` of three 40x48 RGB images (not the models' 32x32: the resize matters)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Folders written by ``save_pretrained``: a 2-label ViT classifier with its ViT image processor, a CLIPModel
    with its CLIP processor, a DINOv2 encoder without a processor, a SigLIP vision model."""
    t = _transformers()
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    labels = {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    clip = t.CLIPConfig(vision_config=TINY, text_config=TEXT, projection_dim=16)
    return {
        "vit": _save(t.ViTForImageClassification(t.ViTConfig(**TINY, **labels)), root / "vit",
                     t.ViTImageProcessor(size={"height": 32, "width": 32})),
        "clip": _save(t.CLIPModel(clip), root / "clip",
                      t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "dinov2": _save(t.Dinov2Model(t.Dinov2Config(**TINY)), root / "dinov2"),
        "siglip": _save(t.SiglipVisionModel(t.SiglipVisionConfig(**TINY)), root / "siglip"),
    }


@pytest.fixture(scope="module")
def clip_arch(tmp_path_factory) -> tuple[str, Path, Path]:
    """A tiny open_clip architecture registered with ``open_clip.add_model_config`` (its own json file), and its
    weights saved as safetensors and as a torch state dict."""
    open_clip = _open_clip()
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    name = "leanvit-test-tiny-clip"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 4},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    save_file(model.state_dict(), str(root / "tiny.safetensors"))
    torch.save(model.state_dict(), root / "tiny.pt")
    return name, root / "tiny.safetensors", root / "tiny.pt"


def _has_adapter(module: str, what: str | None = None) -> bool:
    """Whether leanvit has the adapter module (and, with ``what``, registers that model class in it)."""
    if importlib.util.find_spec(f"leanvit.reduce.adapters.{module}") is None:
        return False
    if what is None:
        return True
    return what in importlib.import_module(f"leanvit.reduce.adapters.{module}").SUPPORTED


# ------------------------------------------------------------------------------------------------- eval
def test_eval_hf_classifier_gives_the_accuracy_transformers_gives(run_cli, hf_models, images, tmp_path):
    """``leanvit eval -m hf:DIR``: the folder's weights and its own preprocessing (the saved ViT image processor:
    a 32x32 squash, mean/std 0.5): the accuracy equals that of transformers' model on its processor's tensors."""
    t = _transformers()
    from PIL import Image

    out_json = tmp_path / "eval.json"
    code, out, err = run_cli("eval", "-m", f"hf:{hf_models['vit']}", "--data", f"imagefolder:{images}",
                             "--json", out_json, *QUIET)
    assert code == 0, err
    assert "preprocessor_config.json (ViTImageProcessor)" in err and "resize to 32x32 (bilinear)" in err
    row = json.loads(out_json.read_text())
    paths = sorted(images.glob("*/*.png"))
    targets = torch.tensor([0 if p.parent.name == "a" else 1 for p in paths])
    proc = t.AutoImageProcessor.from_pretrained(hf_models["vit"], use_fast=False)
    model = t.ViTForImageClassification.from_pretrained(hf_models["vit"]).eval()
    with torch.no_grad():
        pixels = proc([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        logits = model(pixel_values=pixels).logits
    assert row["n"] == len(paths) == 6 and row["method"] == "dense"
    assert row["top1"] == pytest.approx(100.0 * (logits.argmax(-1) == targets).float().mean().item())
    assert row["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)


@pytest.mark.parametrize("kind", ["vit", "clip", "bit", "siglip"])
def test_preprocessing_is_the_image_processors(kind, images, tmp_path):
    """The tensors leanvit's data module gives a model equal its image processor's (the PIL one, which resizes as
    PIL does, like torchvision on PIL images): squash resizes (ViT, SigLIP), shortest-edge resize and centre crop
    (CLIP, and DINOv2's BitImageProcessor with a crop smaller than the resize), each processor's filter and
    mean/std."""
    t = _transformers()
    from PIL import Image

    from leanvit.data import build_dataset
    from leanvit.models.external import create_external

    processors = {
        "vit": t.ViTImageProcessor(size={"height": 32, "width": 32}),
        "clip": t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "bit": t.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
        "siglip": t.SiglipImageProcessor(size={"height": 32, "width": 32}),
    }
    folder = _save(t.ViTModel(t.ViTConfig(**TINY)), tmp_path / kind, processors[kind])
    model = create_external(f"hf:{folder}")
    ds = build_dataset(f"imagefolder:{images}", "test", model)
    ours = torch.stack([ds[i][0] for i in range(len(ds))])
    proc = t.AutoImageProcessor.from_pretrained(folder, use_fast=False)
    theirs = proc([Image.open(p).convert("RGB") for p, _ in ds.samples], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (6, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hf_without_processor_uses_its_image_size_and_imagenet_defaults(hf_models):
    """No preprocessor_config.json: the config's image_size with timm's ImageNet defaults, and the note says so."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from leanvit.analysis.macs import default_input_size
    from leanvit.models.external import create_external, external_info

    model = create_external(f"hf:{hf_models['dinov2']}")
    assert default_input_size(model) == (3, 32, 32)
    assert tuple(model.pretrained_cfg["mean"]) == IMAGENET_DEFAULT_MEAN
    assert tuple(model.pretrained_cfg["std"]) == IMAGENET_DEFAULT_STD
    (line,) = external_info(model).notes
    assert "no preprocessor_config.json" in line and "timm's ImageNet defaults" in line


def test_eval_siglip_classifier(run_cli, images, tmp_path):
    """A classifier whose config is a composite (SigLIP's, with a text config beside the vision one) runs as the
    classifier: logits over its labels, its processor's 0.5 mean/std."""
    t = _transformers()
    labels = {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    config = t.SiglipConfig(vision_config=TINY, text_config=TEXT, **labels)
    folder = _save(t.SiglipForImageClassification(config), tmp_path / "siglip_cls",
                   t.SiglipImageProcessor(size={"height": 32, "width": 32}))
    out_json = tmp_path / "eval.json"
    code, _, err = run_cli("eval", "-m", f"hf:{folder}", "--data", f"imagefolder:{images}", "--json", out_json, *QUIET)
    assert code == 0, err
    assert json.loads(out_json.read_text())["n"] == 6 and "(SiglipImageProcessor)" in err


def test_hf_label_order_must_match_the_class_folders(run_cli, images, tmp_path):
    """A head that names its labels b, a (in that order) on folders a, b: the labels would not line up."""
    t = _transformers()
    labels = {"id2label": {0: "b", 1: "a"}, "label2id": {"b": 0, "a": 1}}
    folder = _save(t.ViTForImageClassification(t.ViTConfig(**TINY, **labels)), tmp_path / "swapped")
    code, _, err = run_cli("eval", "-m", f"hf:{folder}", "--data", f"imagefolder:{images}", *QUIET)
    assert code == 2 and "would not line up" in _error_line(err)


@pytest.mark.parametrize("which", ["clip", "dinov2", "open_clip"])
def test_eval_and_compare_refuse_a_model_without_a_head(which, run_cli, hf_models, clip_arch, tmp_path):
    """eval and compare need logits over the data's classes: a vision encoder is refused in one line that says what
    is needed, before any data is read (the data folder here does not exist)."""
    if which == "open_clip":
        name, weights, _ = clip_arch
        model = ["-m", f"open_clip:{name}", "--weights", weights]
    else:
        model = ["-m", f"hf:{hf_models[which]}"]
    data = ["--data", f"imagefolder:{tmp_path / 'none'}"]
    for verb in ("eval", "compare"):
        code, _, err = run_cli(verb, *model, *data, *QUIET)
        line = _error_line(err)
        assert code == 2 and "no classification head" in line and "bench, vis or compare --no-accuracy" in line, err


# ------------------------------------------------------------------------------------------------- bench, compare, vis
def _bench(run_cli, tmp_path, *args: str) -> dict:
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli("bench", *args, *BENCH, "--json", out_json)
    assert code == 0, err
    return json.loads(out_json.read_text())


def test_bench_hf_models_with_a_method(run_cli, hf_models, tmp_path):
    """bench runs the hf classifier and a CLIPModel folder (its vision tower with the projection) patched with ToMe:
    fewer MACs than dense, the schedule of r=2."""
    for which in ("vit", "clip"):
        row = _bench(run_cli, tmp_path, "-m", f"hf:{hf_models[which]}", "--method", "tome", "--r", "8")
        assert row["method"] == "tome" and row["schedule"] == [8, 8] and row["macs_fraction"] < 1.0


@pytest.mark.parametrize("which,cls", [("dinov2", "Dinov2Model"), ("siglip", "SiglipVisionModel")])
def test_bench_hf_dinov2_and_siglip(which, cls, run_cli, hf_models, tmp_path):
    """Dense, then ToMe through transformers' adapter (hf_more registers both families)."""
    row = _bench(run_cli, tmp_path, "-m", f"hf:{hf_models[which]}", "--method", "dense")
    assert row["method"] == "dense" and row["gmacs"] > 0
    assert _has_adapter("hf_vit", cls)
    row = _bench(run_cli, tmp_path, "-m", f"hf:{hf_models[which]}", "--method", "tome", "--r", "8")
    assert row["method"] == "tome" and row["macs_fraction"] < 1.0


def test_bench_open_clip_dense_then_with_a_method(run_cli, clip_arch, tmp_path):
    """``open_clip:ARCH --weights FILE``: dense, then ToMe through the open_clip adapter."""
    name, weights, _ = clip_arch
    row = _bench(run_cli, tmp_path, "-m", f"open_clip:{name}", "--weights", weights, "--method", "dense")
    assert row["method"] == "dense" and row["gmacs"] > 0
    row = _bench(run_cli, tmp_path, "-m", f"open_clip:{name}", "--weights", weights, "--method", "tome", "--r", "8")
    assert row["method"] == "tome" and row["schedule"] == [8, 8]


def test_open_clip_loads_its_weights_and_preprocessing(clip_arch, tmp_path):
    """The visual tower of ``open_clip.create_model(ARCH, pretrained=FILE)``: the saved weights (safetensors or a torch
    state dict), giving ``encode_image``'s embeddings; its preprocess_cfg as the data config; open_clip's own
    ``local-dir:`` folder (a custom architecture with its weights) loads the same model."""
    open_clip = _open_clip()
    from leanvit.models.external import create_external, external_info

    name, safetensors, pt = clip_arch
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()  # the same seed as the saved weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.encode_image(x)
        folder = tmp_path / "local"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": {"interpolation": "bilinear"}}))
        (folder / "open_clip_model.safetensors").write_bytes(safetensors.read_bytes())
        for spec, weights in ((name, safetensors), (name, pt), (f"local-dir:{folder}", None)):
            model = create_external(f"open_clip:{spec}", weights=str(weights) if weights else None)
            torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
            assert model.pretrained_cfg["input_size"] == (3, 32, 32)
            assert tuple(model.pretrained_cfg["mean"]) == tuple(open_clip.OPENAI_DATASET_MEAN)
            assert "open_clip preprocess_cfg" in external_info(model).notes[0]
    assert model.pretrained_cfg["interpolation"] == "bilinear"  # the local-dir's own preprocess_cfg
    random = create_external(f"open_clip:{name}", pretrained=False)
    assert not torch.allclose(random(x), expected)
    assert "random weights" in external_info(random).notes[-1]


def test_compare_hf_classifier_and_a_headless_model_without_accuracy(run_cli, hf_models, images, tmp_path):
    """compare: the classifier with accuracy; a CLIP tower with --no-accuracy (MACs only)."""
    out_json = tmp_path / "rows.json"
    code, out, err = run_cli("compare", "-m", f"hf:{hf_models['vit']}", "--data", f"imagefolder:{images}",
                             "--methods", "dense,tome", "--budgets", "0.8", "--bench-runs", "0", "--seeds", "1",
                             "--json", out_json, *QUIET)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "tome"] and all(r.get("error") is None for r in rows)
    assert rows[1]["macs_ratio"] <= 0.8 + 1e-9
    code, out, err = run_cli("compare", "-m", f"hf:{hf_models['clip']}", "--no-accuracy", "--methods", "dense,tome",
                             "--budgets", "0.8", "--bench-runs", "0", *QUIET)
    assert code == 0, err


def test_vis_hf(run_cli, hf_models, images, tmp_path):
    """vis draws the token maps of an hf classifier, and of a CLIP tower (no predictions in its title)."""
    for which in ("vit", "clip"):
        out_png = tmp_path / f"{which}.png"
        code, out, err = run_cli("vis", "-m", f"hf:{hf_models[which]}", "--data", f"imagefolder:{images}",
                                 "--methods", "tome,gtp", "--r", "2", "--output", out_png, *QUIET)
        assert code == 0, err
        assert out_png.is_file() and out_png.stat().st_size > 1000


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("prefix,module,extra", [("hf", "transformers", "hf"), ("open_clip", "open_clip", "clip")])
def test_missing_extra_names_the_install_command(prefix, module, extra, run_cli, monkeypatch, tmp_path):
    """Without the library (its import fails), ``-m PREFIX:...`` is one error line naming the extra to install."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    for verb in ("eval", "bench", "compare", "vis"):
        code, out, err = run_cli(verb, "-m", f"{prefix}:{tmp_path}", *QUIET)
        assert code == 2 and err.strip().count("\n") == 0, err
        assert err.startswith("leanvit: error:") and f"pip install 'leanvit[{extra}]'" in err


def test_bad_hf_names(run_cli, hf_models, tmp_path):
    t = _transformers()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    bert = _save(t.BertModel(t.BertConfig(**TEXT)), tmp_path / "bert")
    # a folder whose config names a classifier but whose weights have no head: the head would be random
    headless = _save(t.ViTModel(t.ViTConfig(**TINY)), tmp_path / "headless")
    cfg = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**cfg, "architectures": ["ViTForImageClassification"]}))
    cases = [
        (["-m", f"hf:{tmp_path / 'missing'}"], "does not exist"),
        (["-m", f"hf:{tmp_path / 'file.txt'}"], "is a file"),
        (["-m", f"hf:{tmp_path / 'empty'}"], "has no config.json"),
        (["-m", "hf:"], "needs a folder written by save_pretrained"),
        (["-m", f"hf:{bert}"], "does not take images"),
        (["-m", f"hf:{headless}"], "lack 2 parameters of ViTForImageClassification (classifier.bias"),
        (["-m", f"hf:{hf_models['vit']}", "--weights", str(tmp_path / "file.txt")], "brings its weights"),
        (["-m", f"hf:{hf_models['vit']}", "--num-classes", "5"], "head of 2 outputs"),
    ]
    for args, expected in cases:
        code, _, err = run_cli("bench", *args, *BENCH)
        assert code == 2 and expected in _error_line(err), (args, err)


def test_bad_open_clip_names(run_cli, clip_arch, tmp_path):
    name, safetensors, _ = clip_arch
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, str(other))
    cases = [
        (["-m", "open_clip:ViT-B-61"], "has no architecture 'ViT-B-61'"),
        (["-m", f"open_clip:{name[:-1]}"], f"Did you mean: {name}"),
        (["-m", "open_clip:"], "needs an architecture"),
        (["-m", f"open_clip:{name}", "--weights", str(tmp_path / "missing.pt")], "does not exist"),
        (["-m", f"open_clip:{name}", "--weights", str(other)], f"cannot load weights file {other}"),
        (["-m", f"open_clip:local-dir:{tmp_path}"], "has no open_clip_config.json"),
    ]
    for args, expected in cases:
        code, _, err = run_cli("bench", *args, *BENCH)
        assert code == 2 and expected in _error_line(err), (args, err)
    # the weights are needed wherever pretrained weights are (vis); bench times random weights without them
    code, _, err = run_cli("vis", "-m", f"open_clip:{name}", *QUIET)
    assert code == 2 and "needs its weights: --weights FILE" in _error_line(err)


def test_other_verbs_refuse_external_models(run_cli, hf_models, tmp_path):
    code, _, err = run_cli("train", "-m", f"hf:{hf_models['vit']}", "-o", tmp_path / "run", *QUIET)
    assert code == 2 and "hf: models run in eval, bench, compare, vis" in _error_line(err)


def test_hub_names_are_passed_on_to_transformers(run_cli, monkeypatch):
    """A name that is not a local folder goes to ``from_pretrained`` (the hub, where it can be reached); here its
    failure is simulated, and the error says where it looked."""
    t = _transformers()
    asked = []

    def offline(ref, *args, **kwargs):
        asked.append(ref)
        raise OSError("the hub cannot be reached")

    monkeypatch.setattr(t.AutoConfig, "from_pretrained", offline)
    code, _, err = run_cli("bench", "-m", "hf:google/vit-base-patch16-224", *BENCH)
    assert asked == ["google/vit-base-patch16-224"]
    assert code == 2 and "looked up on the Hugging Face hub" in _error_line(err)


def test_vit_model_saved_without_its_pooler_runs_without_it(tmp_path):
    """A ViTModel folder without pooler weights (as DINO's are) runs without a pooler, not with a random one: its
    features are the first token of the last hidden state."""
    t = _transformers()
    from leanvit.models.external import create_external

    torch.manual_seed(0)
    saved = t.ViTModel(t.ViTConfig(**TINY), add_pooling_layer=False).eval()
    folder = _save(saved, tmp_path / "nopool")
    model = create_external(f"hf:{folder}")
    assert model.pooler is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), saved(pixel_values=x).last_hidden_state[:, 0])


def test_external_names_through_the_python_factory(hf_models):
    """``leanvit.create_model`` takes the same names; a timm option is refused for them."""
    import leanvit

    model = leanvit.create_model(f"hf:{hf_models['vit']}")
    assert model.num_classes == 2 and model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(ConfigError, match="apply to timm models only"):
        leanvit.create_model(f"hf:{hf_models['vit']}", drop_path_rate=0.1)
