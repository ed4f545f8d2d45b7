"""ONNX export and ONNX Runtime (leanvit.export, ``leanvit export``, ``--runtime onnxruntime``, ``--quantize int8``).

Every method (GTP on each score path, ToMe, EViT, IdleViT, truncation) and the dense model, on tiny timm ViTs, and
the shipped models: one file with a dynamic batch axis passes ``onnx.checker`` and gives PyTorch's logits in ONNX
Runtime at batch 1 and batch 7 (max |diff| <= 1e-4, float32). Bad input (training mode, a model or patch that cannot
be exported, an output path that cannot be written, onnx not installed) is one clear error and leaves nothing
written. Export is slow-ish (seconds to tens of seconds per model on the 2-core host): tiny models for the method
matrix, the shipped models once each.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REAL_FMNIST, image, make

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import leanvit  # noqa: E402
from leanvit.errors import ConfigError, UnsupportedModelError  # noqa: E402
from leanvit.export import ATOL, OrtModel, export_onnx, make_session  # noqa: E402

PROC = Path("/proc/leanvit-test")


def _ort_vs_torch(path: Path, model: nn.Module, size: tuple[int, int, int], batches=(1, 7)) -> float:
    """The largest |ORT - PyTorch| over random batches of each size, all through one session of the file."""
    session = make_session(path)
    worst = 0.0
    for b in batches:
        x = torch.randn(b, *size, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert out.shape == ref.shape
        worst = max(worst, float((out - ref).abs().max()))
    return worst


def _check_file(path: Path) -> None:
    """onnx.checker passes on the written file and its batch axis is symbolic (a name, not a number)."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["batch_axis"] == "dynamic" and "method" in props


# ------------------------------------------------------------------------------------------------ every method
# (label, variant, method, amount and options); tiny 2-block ViTs on a 4x4 grid, r=2 removes 2 of 16 tokens
CASES = [
    ("dense", "deit", None, {}),
    ("gtp-auto", "deit", "gtp", dict(r=2)),
    ("gtp-fused", "deit", "gtp", dict(r=2, score_path="fused")),
    ("gtp-explicit", "deit", "gtp", dict(r=2, score_path="explicit")),
    ("tome", "deit", "tome", dict(r=2)),
    ("evit", "deit", "evit", dict(r=2)),
    ("idle", "deit", "idle", dict(keep=0.7)),
    ("truncate", "deit", "truncate", dict(r=2)),
]


@pytest.mark.parametrize("label, variant, method, kw", CASES, ids=[c[0] for c in CASES])
def test_every_method_exports_with_a_dynamic_batch(tmp_path, label, variant, method, kw):
    model = make(variant)
    if method is not None:
        leanvit.patch(model, method, **kw)
    before = None if method is None else list(leanvit.get_reducer(model).schedule)
    report = export_onnx(model, tmp_path / f"{label}.onnx")
    assert report.path == tmp_path / f"{label}.onnx" and report.method == (method or "dense")
    assert report.max_abs_diff is not None and report.max_abs_diff <= ATOL
    _check_file(report.path)
    assert _ort_vs_torch(report.path, model, (3, 64, 64)) <= ATOL
    if method is not None:  # the model itself is untouched (a copy was exported) and still runs
        assert leanvit.get_reducer(model).schedule == before
        model(image(batch=1))


# the same on other layouts and paths: registers + LayerScale with GTP's cls score and merged orphans (in-place
# propagation with fallback edges), average pooling without a cls token under ToMe (size-weighted pooling), EViT on
# a distilled DeiT (cls + dist token)
MORE = [
    ("gtp-cls-merge-registers", "registers_layerscale", "gtp", dict(r=2, score="cls", orphans="merge")),
    ("tome-avgpool", "no_cls_avg", "tome", dict(r=2)),
    ("evit-distilled", "deit_distilled", "evit", dict(r=2)),
]


@pytest.mark.slow
@pytest.mark.parametrize("label, variant, method, kw", MORE, ids=[c[0] for c in MORE])
def test_other_layouts_export(tmp_path, label, variant, method, kw):
    model = leanvit.patch(make(variant), method, **kw)
    report = export_onnx(model, tmp_path / f"{label}.onnx")
    _check_file(report.path)
    assert _ort_vs_torch(report.path, model, (3, 64, 64)) <= ATOL


# ------------------------------------------------------------------------------------------------ other libraries
def _library_model(kind: str) -> nn.Module:
    """A tiny random model of another library, built from a small config (the test is skipped where the library
    is not installed)."""
    torch.manual_seed(0)
    if kind.startswith("hf-"):
        transformers = pytest.importorskip("transformers")
        size = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)
        if kind == "hf-clip":
            config = transformers.CLIPVisionConfig(**size, projection_dim=16)
            return transformers.CLIPVisionModelWithProjection._from_config(config, attn_implementation="sdpa").eval()
        cls, config_cls = {"hf-vit": ("ViTForImageClassification", "ViTConfig"),
                           "hf-deit-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig")}[kind]
        config = getattr(transformers, config_cls)(**size, num_labels=10)
        return getattr(transformers, cls)._from_config(config, attn_implementation="sdpa").eval()
    if kind == "open_clip":
        pytest.importorskip("open_clip")
        from open_clip.transformer import VisionTransformer as OpenClipTower

        return OpenClipTower(image_size=32, patch_size=4, width=64, layers=2, heads=4, mlp_ratio=2.0,
                             output_dim=16).eval()
    from timm.models.eva import Eva  # EVA-02 style: cls token, rotary position embeddings, SwiGLU

    return Eva(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, mlp_ratio=4 * 2 / 3,
               swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(3, 3),
               global_pool="avg").eval()


# transformers' ViT (its forward returns a ModelOutput; under torch.export it passes an all-visible mask to every
# layer), DeiT with its distillation token, CLIP's vision tower (image embeddings), an open_clip tower and a RoPE Eva
LIBRARIES = [
    ("hf-vit", "idle", dict(keep=0.7)), ("hf-vit", "tome", dict(r=2)), ("hf-deit-teacher", "gtp", dict(r=2)),
    ("hf-clip", "evit", dict(r=2)), ("open_clip", "idle", dict(keep=0.7)), ("open_clip", "gtp", dict(r=2)),
    ("eva-rope", "idle", dict(keep=0.7)), ("eva-rope", "tome", dict(r=2)),
]


@pytest.mark.parametrize("kind, method, kw", LIBRARIES, ids=[f"{c[0]}-{c[1]}" for c in LIBRARIES])
def test_other_libraries_export(tmp_path, kind, method, kw):
    model = leanvit.patch(_library_model(kind), method, **kw)
    report = export_onnx(model, tmp_path / "m.onnx")
    _check_file(report.path)
    size = report.input_size
    with torch.no_grad():
        out = model(torch.zeros(1, *size))
    expected = out if isinstance(out, torch.Tensor) else (getattr(out, "logits", None)
                                                          if getattr(out, "logits", None) is not None
                                                          else getattr(out, "image_embeds", None))
    session = make_session(report.path)
    got = session.run(None, {session.get_inputs()[0].name: torch.zeros(1, *size).numpy()})[0]
    assert got.shape == tuple(expected.shape)
    assert report.max_abs_diff <= ATOL


class _TwoOutputs(nn.Module):
    """A forward that returns a pair: no single tensor for an ONNX graph's output."""

    def forward(self, x):
        return x.mean((2, 3)), x.amax((2, 3))


def test_a_forward_without_one_tensor_is_one_clear_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match="returns a tuple with no logits or image features"):
        export_onnx(_TwoOutputs().eval(), tmp_path / "m.onnx", input_size=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the shipped models
@pytest.fixture(scope="module")
def teacher_onnx(tmp_path_factory):
    """The shipped teacher exported once (its file is read-only to the tests)."""
    model = leanvit.create_model("leanvit_vit_fm_teacher", pretrained=True).eval()
    report = export_onnx(model, tmp_path_factory.mktemp("teacher") / "teacher.onnx")
    return model, report


def test_shipped_teacher_exports(teacher_onnx):
    model, report = teacher_onnx
    _check_file(report.path)
    assert report.input_size == (1, 28, 28)
    assert _ort_vs_torch(report.path, model, report.input_size) <= ATOL
    props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert props["model"] == "leanvit_vit_fm_teacher" and props["mean"] and props["std"]


SHIPPED = ["leanvit_vit_fm_student", "leanvit_vit_fm_teacher_idle70", "leanvit_shuffle_fm_mlp_grouped",
           "leanvit_vit_fm_student_pefd"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_export(tmp_path, name):
    model = leanvit.create_model(name, pretrained=True).eval()
    report = export_onnx(model, tmp_path / f"{name}.onnx")
    _check_file(report.path)
    red = leanvit.get_reducer(model)
    assert report.method == (red.name if red is not None else "dense")
    assert _ort_vs_torch(report.path, model, report.input_size) <= ATOL


# the int8 check on fewer images than the benchmark's 2,000 (benchmarks/deploy.py checks those, and the whole test
# set): on the first 1,000 test images the int8 teacher stays within 0.5 points of the float teacher's top-1
INT8_IMAGES, INT8_MARGIN = 1000, 0.5


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="needs the Fashion-MNIST test set")
def test_int8_teacher_keeps_its_top1(teacher_onnx):
    from torch.utils.data import DataLoader

    from leanvit.data import build_dataset
    from leanvit.engine.evaluate import evaluate_many
    from leanvit.export import quantize_int8

    model, report = teacher_onnx
    int8 = OrtModel(quantize_int8(report.path.read_bytes()), quantize="int8")
    assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear")
               for n in onnx.load_from_string(int8._source).graph.node)
    loader = DataLoader(build_dataset("fmnist", "test", model, limit=INT8_IMAGES), batch_size=100)
    res = evaluate_many({"float": model, "int8": int8}, loader, progress=False)
    assert res["int8"].n == INT8_IMAGES
    assert abs(res["int8"].top1 - res["float"].top1) <= INT8_MARGIN, (res["int8"].top1, res["float"].top1)


def _weight_products(proto) -> list[str]:
    """Names of the float MatMul / Gemm nodes whose second input is computed from initializers alone (a weight,
    possibly sliced or transposed in the graph): what int8 should have quantized."""
    const = {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:  # nodes are in topological order
        if node.op_type == "Constant" or (node.input and all(i in const for i in node.input if i)):
            const.update(node.output)
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in const]


@pytest.mark.parametrize("method, kw", [("idle", dict(keep=0.7)), ("gtp", dict(r=2)), ("tome", dict(r=2))],
                         ids=["idle", "gtp", "tome"])
def test_int8_quantizes_every_linear_layer(method, kw):
    """No product with a weight stays float32 in the int8 model, including the weights a forward slices at run time
    (IdleViT projects the selected tokens with rows of the fused qkv weight), and the int8 output stays close to
    PyTorch's float output."""
    from leanvit.export import build_onnx, quantize_int8

    model = leanvit.patch(make("deit"), method, **kw)
    data, _ = build_onnx(model)
    assert _weight_products(onnx.load_from_string(data))  # the float export has weight products
    int8 = onnx.load_from_string(quantize_int8(data))
    assert _weight_products(int8) == []
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = make_session(int8.SerializeToString()).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    assert float((torch.from_numpy(out) - ref).abs().max()) < 0.1 * float(ref.abs().max())


# ------------------------------------------------------------------------------------------------ the export ops
def test_export_forms_of_the_custom_ops_give_the_same_values():
    """The decompositions the exporter substitutes for leanvit's custom ops compute what the ops compute."""
    from leanvit.export.exporter import _diag_colsum, _explicit_stats
    from leanvit.ops.fused_score import torch_scores
    from leanvit.reduce.attention import explicit_attention_stats

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 3, 17, 8, generator=g) for _ in range(3))
    bias = torch.randn(5, 17, generator=g).abs().log()
    for b in (None, bias):
        ref = torch_scores(q, k, b, 0.3, chunk_bytes=3 * 17 * 17 * 4 * 2)  # several slices of the batch
        for got, want in zip(_diag_colsum(q, k, b, 0.3), ref):
            torch.testing.assert_close(got, want)
        b4 = None if b is None else b[:, None, None, :]
        for got, want in zip(_explicit_stats(q, k, v, b4, 0.3), explicit_attention_stats(q, k, v, b4, 0.3)):
            torch.testing.assert_close(got, want)


def test_unsliced_explicit_attention_equals_the_sliced_one():
    """The explicit map in one piece (what an exported or compiled graph runs) equals the cache-sized slices."""
    from leanvit.reduce import attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(7, 2, 13, 4, generator=g) for _ in range(3))
    score = lambda p: p.sum(-2)  # noqa: E731

    def run(sliced: bool):
        return attention._explicit_attention(q, k, v, None, 0.5, lambda p: p, 1.0, score, sliced)

    old = attention.CPU_PROBS_CHUNK_BYTES
    attention.CPU_PROBS_CHUNK_BYTES = 2 * 13 * 13 * 4 * 2  # two images a slice: four slices
    try:
        out_s, _, score_s = run(True)
    finally:
        attention.CPU_PROBS_CHUNK_BYTES = old
    out_u, probs, score_u = run(False)
    assert probs is not None and probs.shape == (7, 2, 13, 13)
    torch.testing.assert_close(out_s, out_u)
    torch.testing.assert_close(score_s, score_u)
    empty = attention._explicit_attention(q[:0], k[:0], v[:0], None, 0.5, lambda p: p, 1.0, score, False)
    assert empty[0].shape == (0, 2, 13, 4)


def test_semantic_graph_excludes_self_as_before():
    """The k-NN graph's self exclusion (a masked fill, chosen for export) marks the same neighbours as filling the
    diagonal in place."""
    from leanvit.ops.graph import semantic_adjacency

    x = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(2))
    xn = torch.nn.functional.normalize(x, dim=-1)
    sim = xn @ xn.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    ref = torch.zeros(3, 20, 20).scatter_(2, sim.topk(5, dim=-1, sorted=False).indices, 1.0)
    got = semantic_adjacency(x, 5)
    assert torch.equal(got, ref) and not got.diagonal(dim1=1, dim2=2).any()


# ------------------------------------------------------------------------------------------------ bad input
class _DataDependent(nn.Module):
    """A forward whose branch depends on the values: no one graph can be exported."""

    def forward(self, x):
        return x.mean((1, 2, 3)) if x.sum() > 0 else -x.mean((1, 2, 3))


class _PerImage(nn.Module):
    """A forward that loops over the batch in Python: torch.export fixes the batch size."""

    def forward(self, x):
        return torch.stack([x[i].mean() for i in range(x.shape[0])])[:, None]


def test_training_mode_is_refused_and_nothing_is_written(tmp_path):
    model = make("deit").train()
    with pytest.raises(ConfigError, match="training mode"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module, why", [(_DataDependent(), "cannot export"), (_PerImage(), "fixes the batch size")])
def test_a_model_that_cannot_export_is_one_clear_error(tmp_path, module, why):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous file")
    with pytest.raises(UnsupportedModelError, match=why) as e:
        export_onnx(module.eval(), out, input_size=(3, 8, 8))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    assert out.read_bytes() == b"the previous file"  # untouched: written only when complete
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


def test_a_random_selection_is_refused(tmp_path):
    """score="random" draws new numbers every forward: no exported graph can reproduce PyTorch's output."""
    model = leanvit.patch(make("deit"), "gtp", r=2, score="random")
    with pytest.raises(UnsupportedModelError, match="random"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["proc", "under-a-file", "folder"])
def test_an_unwritable_path_is_refused_before_any_work(tmp_path, monkeypatch, where):
    (tmp_path / "afile").write_text("x")
    path = {"proc": PROC / "m.onnx", "under-a-file": tmp_path / "afile" / "m.onnx", "folder": tmp_path}[where]
    import leanvit.export.exporter as exporter

    monkeypatch.setattr(exporter, "export_program", lambda *a, **k: pytest.fail("exported before the path check"))
    with pytest.raises(ConfigError, match="cannot write in /proc|is a file, not a folder|is a folder"):
        export_onnx(make("deit"), path)


def test_an_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown quantization"):
        export_onnx(make("deit"), tmp_path / "m.onnx", quantize="int4")


# ------------------------------------------------------------------------------------------------ the CLI
STUDENT = "leanvit_vit_fm_student"


def _one_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("leanvit: error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def test_cli_export_writes_a_checked_int8_file(tmp_path, run_cli):
    out, js = tmp_path / "student_tome.onnx", tmp_path / "x.json"
    code, stdout, err = run_cli("export", "-m", STUDENT, "--method", "tome", "--r", "8", "-o", out,
                                "--quantize", "int8", "--json", js)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "int8" in stdout and "max |diff|" in stdout
    onnx.checker.check_model(str(out))
    import json

    record = json.loads(js.read_text())
    assert record["method"] == "tome" and record["quantize"] == "int8" and record["max_abs_diff"] <= ATOL
    logits = OrtModel(out)(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_cli_unwritable_output_is_one_error(tmp_path, run_cli, where):
    (tmp_path / "afile").write_text("x")
    out = PROC / "m.onnx" if where == "proc" else tmp_path / "afile" / "m.onnx"
    code, _, err = run_cli("export", "-m", STUDENT, "-o", out)
    _one_error(code, err, f"--output {out}")


def test_cli_unexportable_patch_is_one_error_and_writes_nothing(tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    code, _, err = run_cli("export", "-m", STUDENT, "--method", "gtp", "--r", "4", "-O", "score=random", "-o", out)
    _one_error(code, err, "random")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_cli_export_without_onnx_names_the_package(tmp_path, run_cli, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    code, _, err = run_cli("export", "-m", STUDENT, "-o", tmp_path / "m.onnx")
    _one_error(code, err, f"pip install 'leanvit[onnx]'")
    assert missing in err


def test_cli_runtime_checks_before_work(run_cli):
    code, _, err = run_cli("eval", "-m", STUDENT, "--data", "synthetic:8", "--quantize", "int8")
    _one_error(code, err, "add --runtime onnxruntime")
    code, _, err = run_cli("bench", "-m", STUDENT, "--runtime", "onnxruntime", "--amp", "bf16")
    _one_error(code, err, "--amp bf16")
    code, _, err = run_cli("bench", "-m", STUDENT, "--runtime", "pytorch,onnxruntime")
    _one_error(code, err, "need --batch-sizes")
    code, _, err = run_cli("bench", "-m", STUDENT, "--runtime", "tensorrt")
    _one_error(code, err, "unknown runtime 'tensorrt'")


def test_cli_eval_in_onnxruntime_matches_pytorch(run_cli):
    argv = ["eval", "-m", STUDENT, "--data", "synthetic:40", "--method", "evit", "--r", "16", "--no-progress"]
    code, torch_out, err = run_cli(*argv)
    assert code == 0, err
    code, ort_out, err = run_cli(*argv, "--runtime", "onnxruntime")
    assert code == 0, err
    top1 = [line.split("top-1 ")[1].split("%")[0] for line in (torch_out, ort_out)]
    assert top1[0] == top1[1] and "[onnxruntime]" in ort_out


# ------------------------------------------------------------------------------------------------ runtime and timing
def test_ort_model_times_like_a_module_and_says_its_runtime(tmp_path):
    from leanvit.analysis import measure_throughput
    from leanvit.export import as_runtime

    ort_model = as_runtime(make("deit"), "onnxruntime", threads=1)
    report = measure_throughput(ort_model, (3, 64, 64), batch_size=2, warmup=1, runs=2)
    assert report.runtime == "onnxruntime" and report.threads == 1 and report.images_per_s > 0
    import pickle

    again = pickle.loads(pickle.dumps(ort_model))  # the session is rebuilt from the model
    x = image(batch=2)
    torch.testing.assert_close(again(x), ort_model(x))


def test_break_even_batch():
    from leanvit.analysis import break_even_batch

    assert break_even_batch({1: 0.8, 2: 0.95, 4: 1.1, 8: 1.3}) == 4
    assert break_even_batch({1: 1.2, 2: 1.1, 4: 1.05}) == 1
    assert break_even_batch({1: 1.2, 2: 0.9, 4: 1.1}) == 4  # faster from 4 on, not from 1
    assert break_even_batch({1: 1.2, 2: 1.1, 4: 0.99}) is None  # slower at the largest batch: no break-even
    assert break_even_batch({1: 1.0, 2: 1.0}) is None  # as fast is not faster


def test_cli_bench_prints_the_break_even_table(run_cli, tmp_path):
    js = tmp_path / "be.json"
    code, out, err = run_cli("bench", "-m", STUDENT, "--method", "truncate", "--r", "20", "--batch-sizes", "2,1",
                             "--runs", "1", "--warmup", "0", "--no-progress", "--json", js)
    assert code == 0, err
    assert "runtime pytorch" in out and "faster from" in out and "b1" in out and "b2" in out
    import json

    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "truncate"]
    assert set(rows[1]["speedup"]) == {"1", "2"} and rows[0]["break_even"] is None
