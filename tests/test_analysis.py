"""MACs counting, throughput measurement and the ``leanvit bench`` verb."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import leanvit
from leanvit.analysis import (MacsReport, ThroughputReport, compare_throughput, count_macs, measure_latency,
                              measure_throughput)
from leanvit.cli.main import main
from leanvit.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_vit(**kwargs) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, **kwargs)


def _analytic_macs(model) -> int:
    """MACs of a plain timm ViT from its layer shapes: patch-embed conv, block linears, attention, head."""
    pe = model.patch_embed.proj
    n_patches = model.patch_embed.num_patches
    n = n_patches + model.num_prefix_tokens
    conv = n_patches * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * pe.out_channels
    blocks = 0
    for blk in model.blocks:
        linears = [blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2]
        blocks += sum(n * m.in_features * m.out_features for m in linears)
        dim = blk.attn.qkv.in_features
        blocks += 2 * n * n * dim  # q @ k^T and attn @ v over all heads
    head = model.head.in_features * model.head.out_features  # cls token only
    return conv + blocks + head


def test_macs_match_analytic_count():
    model = _tiny_vit()
    rep = count_macs(model)
    assert isinstance(rep, MacsReport)
    assert rep.macs == _analytic_macs(model)
    assert rep.input_size == (3, 32, 32)
    assert sum(rep.by_op.values()) == rep.macs
    assert rep.gmacs == pytest.approx(rep.macs / 1e9)


def test_macs_per_image_and_fused_attention_counted():
    model = _tiny_vit()
    fused = count_macs(model, batch_size=3)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    unfused = count_macs(model)
    assert fused.macs == unfused.macs == _analytic_macs(model)


class _InPlace(nn.Module):
    def forward(self, x):  # x (B, 1, 4, 5): an in-place batched product and an in-place matrix product
        x = x[:, 0]
        out = x[:, :, :3].clone()
        out[:, 1:].baddbmm_(x[:, 1:, :4], x[:, :4, :3])
        flat = out.reshape(-1, 3).clone()
        return flat.addmm_(x.reshape(-1, 5)[:, :2], x[0, :2, :3])


def test_macs_count_in_place_products():
    # GTP's propagation runs as out[:, P:].baddbmm_(w, x_removed): in-place products count like out-of-place ones
    rep = count_macs(_InPlace(), input_size=(1, 4, 5), batch_size=2)
    assert rep.macs == (3 * 4 * 3) + (4 * 2 * 3)  # per image: baddbmm_ (3x4 @ 4x3), addmm_ (4 rows x 2 x 3)


def test_gtp_propagation_counted():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10)
    gtp = leanvit.patch(model, "gtp", r=4)
    by_op = {str(k): v for k, v in count_macs(gtp).by_op.items()}
    # two reducing blocks; in each, every kept image token receives the features (C) and the size (1) of the 4
    # removed ones: K * r * (C + 1) MACs
    dim, n = model.embed_dim, model.patch_embed.num_patches
    assert by_op["aten.baddbmm_"] == sum((n - 4 * (i + 1)) * 4 * (dim + 1) for i in range(2))


def test_macs_restores_training_flag():
    model = _tiny_vit().train()
    count_macs(model)
    assert model.training


def test_deit_small_macs():
    model = leanvit.create_model("deit_small_patch16_224", pretrained=False)
    assert 4.5 <= count_macs(model).gmacs <= 4.7


def test_reference_student_cheaper_than_teacher():
    student = count_macs(leanvit.create_model("leanvit_vit_fm_student")).macs
    teacher = count_macs(leanvit.create_model("leanvit_vit_fm_teacher")).macs
    assert 0 < student < teacher


@pytest.mark.parametrize("name, size", [("tiny", (1, 32, 32)), ("leanvit_vit_fm_student", (3, 28, 28)),
                                        ("leanvit_vit_fm_student", (1, 32, 32))])
def test_wrong_input_gives_config_error(name, size):
    model = _tiny_vit() if name == "tiny" else leanvit.create_model(name)
    with pytest.raises(ConfigError, match="expects"):
        count_macs(model, input_size=size)


def test_malformed_input_size():
    with pytest.raises(ConfigError):
        count_macs(_tiny_vit(), input_size=(32, 32))


def test_throughput_report():
    model = _tiny_vit()
    rep = measure_throughput(model, batch_size=2, warmup=1, runs=4)
    assert isinstance(rep, ThroughputReport)
    assert rep.images_per_s > 0 and len(rep.times_s) == 4
    assert rep.latency_ms / 1e3 in rep.times_s
    assert rep.images_per_s == pytest.approx(2 / (rep.latency_ms / 1e3))
    assert rep.threads == torch.get_num_threads() and rep.batch_size == 2 and rep.device == "cpu"
    assert measure_latency(model, warmup=0, runs=2) > 0
    with pytest.raises(ConfigError):
        measure_throughput(model, runs=0)


def test_compare_throughput_interleaved():
    res = compare_throughput({"a": _tiny_vit(), "b": _tiny_vit(embed_dim=96, num_heads=2)},
                             batch_size=1, warmup=0, runs=1, rounds=2)
    assert list(res) == ["a", "b"] and all(v > 0 for v in res.values())
    reps = compare_throughput({"a": _tiny_vit()}, batch_size=2, warmup=0, runs=3, rounds=2, reports=True)
    rep = reps["a"]
    assert len(rep.times_s) == 6 and rep.batch_size == 2
    assert rep.images_per_s == pytest.approx(2 / sorted(rep.times_s)[2])  # lower median of 6 runs


def test_bench_cli_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "leanvit_vit_fm_student", "--no-pretrained", "--runs", "2", "--warmup", "1",
               "--batch-size", "4", "--threads", "1", "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())
    for key in ("model", "method", "gmacs", "images_per_s", "latency_ms_b1", "batch_size", "threads", "device",
                "torch", "date", "machine"):
        assert key in row
    assert row["model"] == "leanvit_vit_fm_student" and row["method"] == "dense" and row["batch_size"] == 4
    assert row["gmacs"] > 0 and row["images_per_s"] > 0
    assert "GMACs" in capsys.readouterr().out


def test_bench_timm_model_defaults_to_no_download(tmp_path):
    # test_vit has hub weights; bench must not try to fetch them unless --pretrained is given
    rc = main(["bench", "--model", "test_vit", "--runs", "1", "--warmup", "0", "--batch-size", "1",
               "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert rc == 0


def test_bench_patched_with_options(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--model", "leanvit_vit_fm_student", "--no-pretrained", "--method", "gtp", "--budget", "0.8",
               "-O", "score=cls", "-O", "graph=spatial", "--runs", "1", "--warmup", "0", "--batch-size", "2",
               "--threads", "1", "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())
    assert row["method"] == "gtp" and row["options"]["score"] == "cls" and row["options"]["graph"] == "spatial"
    assert row["compiled"] is False
    # the schedule that ran and the share of dense MACs it reached are printed and saved
    assert len(row["schedule"]) == 4 and sum(row["schedule"]) > 0
    assert row["macs_fraction"] <= 0.8 and row["gmacs"] == pytest.approx(row["macs_fraction"] * row["dense_gmacs"])
    out = capsys.readouterr().out
    assert "score" in out and f"schedule     {row['schedule']}" in out and "of dense" in out


@pytest.mark.parametrize("argv, message", [
    (["-O", "alpha=0.2"], "pick a --method"),
    (["--method", "gtp"], "r"),
    (["--method", "gtp", "--r", "2", "-O", "nope=1"], "nope"),
])
def test_bench_bad_arguments(capsys, argv, message):
    rc = main(["bench", "--model", "leanvit_vit_fm_student", "--no-pretrained", "--runs", "1", "--warmup", "0",
               *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_bench_rejects_schedule_for_dense(capsys):
    rc = main(["bench", "--model", "leanvit_vit_fm_student", "--no-pretrained", "--r", "4"])
    assert rc == 2


@pytest.mark.slow
def test_bench_compiled_under_autocast(tmp_path):
    """--compile (fullgraph) and --amp on a patched model: the forward runs compiled under autocast."""
    out = tmp_path / "c.json"
    rc = main(["bench", "--model", "leanvit_vit_fm_student", "--no-pretrained", "--method", "tome", "--r", "8",
               "--compile", "--amp", "bf16", "--runs", "1", "--warmup", "1", "--batch-size", "2", "--threads", "1",
               "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())
    assert row["compiled"] is True and row["amp"] == "bf16" and row["images_per_s"] > 0


def test_compare_compiled_timing(monkeypatch):
    """--compile times every variant compiled with fullgraph=True, --amp under autocast (torch.compile recorded
    here, and run with dynamo's eager backend to keep the test fast; the inductor runs are the slow bench test)."""
    from leanvit.experiments.compare import run_comparison

    compiled = []
    real = torch.compile

    def record(model, **kw):
        compiled.append(kw)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", record)
    torch.manual_seed(0)
    model = timm.create_model("leanvit_vit_fm_student", pretrained=False).eval()
    rows = run_comparison(model, None, ["dense", "gtp", "idle"], [0.7], bench_batch=2, bench_runs=1,
                          progress=False, compile=True, amp="bf16")
    assert [r.method for r in rows] == ["dense", "gtp", "idle"] and all(r.images_per_s > 0 for r in rows)
    assert compiled == [{"fullgraph": True}] * 3


@pytest.mark.parametrize("threads, words", [(1, "1 thread"), (2, "2 threads")])
def test_machine_summary_names_thread_count(threads, words):
    from leanvit.analysis import machine_summary, threads_phrase

    assert threads_phrase(threads) == words
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert machine_summary().endswith(f", {words}")
    finally:
        torch.set_num_threads(before)


def test_macs_count_multihead_attention_on_its_fast_path_too():
    """nn.MultiheadAttention in eval mode without gradients runs one fused op the counter has no formula for."""
    from leanvit.analysis.macs import count_macs

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 8, 8)
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 32)
            return self.attn(t, t, t)[0]

    n, d = 16, 32
    expected = n * 3 * 8 * 8 * d + n * d * 3 * d + 2 * n * n * d + n * d * d  # embed, in_proj, q k^T and a v, out
    assert count_macs(Tower(), (3, 32, 32)).macs == expected
    assert torch.backends.mha.get_fastpath_enabled()  # the setting is given back
