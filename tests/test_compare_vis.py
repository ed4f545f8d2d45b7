"""The comparison job (library and ``leanvit compare``), the ``vis`` verb and the plots, on tiny models and data."""
from __future__ import annotations

import json
import math

import numpy as np

import pytest
import timm
import torch
from torch.utils.data import DataLoader

import leanvit
from leanvit.data import SyntheticImages
from leanvit.reduce import get_reducer
from leanvit.experiments.compare import format_table, run_comparison
from leanvit.vis import plot_pareto, plot_token_maps

STUDENT = ["--model", "leanvit_vit_fm_student", "--no-pretrained"]


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96, depth=4, num_classes=10).eval()


def test_run_comparison_rows():
    model = tiny_vit()
    loader = DataLoader(SyntheticImages((3, 96, 96), num_classes=10, size=8), batch_size=4)
    budgets = [0.9, 0.7]
    rows = run_comparison(model, loader, ["dense", "gtp", "tome", "evit"], budgets, bench_batch=2, bench_runs=1,
                          progress=False)
    assert [(r.method, r.budget) for r in rows] == [("dense", 1.0)] + [
        (m, b) for m in ("gtp", "tome", "evit") for b in budgets]
    dense = rows[0]
    assert dense.macs_ratio == 1.0 and dense.schedule == [] and dense.speedup == 1.0
    assert dense.gmacs == pytest.approx(leanvit.analysis.count_macs(model).macs / 1e9)
    from leanvit.ops.schedule import block_macs, solve_budget

    info = leanvit.reduce.inspect_vit(model)
    dense_macs = leanvit.analysis.count_macs(model).macs
    other = dense_macs - block_macs(info.blocks, [0] * info.depth, info.num_prefix, info.num_image)
    for r in rows:
        assert 0.0 <= r.top1 <= 100.0 and r.seeds == 1
        assert r.images_per_s > 0 and math.isfinite(r.images_per_s)
        assert r.gmacs > 0
        if r.method == "dense":
            continue
        assert r.macs_ratio <= r.budget + 1e-9
        assert r.macs_ratio > r.budget - 0.15
        assert r.gmacs < dense.gmacs
        # every method runs the analytic schedule for the budget, or a tighter one where its own work costs MACs
        analytic = solve_budget(r.budget, info.blocks, info.num_prefix, info.num_image, other)
        assert sum(r.schedule) >= sum(analytic) > 0
    for b in budgets:
        at_b = [r for r in rows if r.budget == b and r.method != "dense"]
        # EViT's selection costs almost nothing: it gets the analytic schedule
        evit = next(r for r in at_b if r.method == "evit")
        assert evit.schedule == solve_budget(b, info.blocks, info.num_prefix, info.num_image, other)
    gtp = [r for r in rows if r.method == "gtp"]
    assert all("lost_token_fraction" in r.extra and 0.0 <= r.extra["lost_token_fraction"] <= 1.0 for r in gtp)
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "gtp" in table and "evit" in table
    # the original model is left unpatched (variants are copies)
    assert not leanvit.reduce.is_patched(model)


def test_run_comparison_random_score_uses_seeds():
    model = tiny_vit()
    loader = DataLoader(SyntheticImages((3, 96, 96), num_classes=10, size=4), batch_size=4)
    rows = run_comparison(model, loader, ["gtp"], [0.8], method_options={"gtp": {"score": "random"}}, seeds=2,
                          bench_runs=0, progress=False)
    assert len(rows) == 1 and rows[0].seeds == 2 and rows[0].options["score"] == "random"
    assert math.isnan(rows[0].images_per_s)


def test_run_comparison_labelled_variants_side_by_side():
    """Labels run one method with different options in the same comparison (and the same timed run)."""
    model = tiny_vit()
    loader = DataLoader(SyntheticImages((3, 96, 96), num_classes=10, size=4), batch_size=4)
    opts = {"gtp": {"score": "mixed"}, "gtp-cls": {"method": "gtp", "score": "cls"},
            "gtp-random": {"method": "gtp", "score": "random"}}
    rows = run_comparison(model, loader, ["dense", "gtp", "gtp-cls", "gtp-random"], [0.8], method_options=opts,
                          seeds=2, bench_batch=2, bench_runs=1, progress=False)
    by = {r.method: r for r in rows}
    assert list(by) == ["dense", "gtp", "gtp-cls", "gtp-random"]
    assert by["gtp-cls"].options["score"] == "cls" and by["gtp"].options["score"] == "mixed"
    assert by["gtp-random"].seeds == 2 and by["gtp-cls"].seeds == 1
    assert by["gtp-cls"].schedule == by["gtp"].schedule
    assert all(r.images_per_s > 0 for r in rows)
    with pytest.raises(leanvit.ConfigError, match="label 'x' names method 'nope'"):
        run_comparison(model, None, ["x"], [0.8], method_options={"x": {"method": "nope"}}, bench_runs=0,
                       progress=False)


def test_run_comparison_unknown_method():
    with pytest.raises(leanvit.ConfigError, match="dense, gtp, tome, evit"):
        run_comparison(tiny_vit(), None, ["dense", "nope"], [0.8], bench_runs=0, progress=False)


def test_cli_compare(run_cli, fmnist_dir, tmp_path):
    out_json, out_png = tmp_path / "rows.json", tmp_path / "pareto.png"
    code, out, err = run_cli("compare", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--limit", "32",
                             "--budgets", "0.8", "--bench-runs", "1", "--bench-batch", "4", "--json", out_json,
                             "--plot", out_png, "--no-progress", "-O", "gtp.alpha=0.3")
    assert code == 0, err
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert [r["method"] for r in rows] == ["dense", "gtp", "tome", "evit"]
    for r in rows:
        for key in ("method", "budget", "gmacs", "top1", "images_per_s", "schedule", "macs_ratio"):
            assert key in r
        assert r["images_per_s"] > 0 and 0 <= r["top1"] <= 100
        assert r["macs_ratio"] <= r["budget"] + 1e-9
    assert rows[1]["options"]["alpha"] == 0.3
    assert data["meta"]["images"] == 32 and data["meta"]["model"] == "leanvit_vit_fm_student"
    assert out_png.is_file() and out_png.stat().st_size > 1000
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gtp" in out and "schedule" in out


@pytest.mark.parametrize("argv, match", [
    (["--methods", "dense,nope"], "gtp, tome, evit"),
    (["--budgets", "0"], "budget"),
    (["--budgets", "1.5"], "budget"),
    (["-O", "foo"], "METHOD.OPTION=VALUE"),
    (["-O", "gtp.foo=1"], "foo"),
    (["--methods", "dense,tome", "-O", "gtp.alpha=0.3"], "not among --methods"),
    (["--methods", "dense,gtp-x", "-O", "gtp-x.method=gpt"], "label 'gtp-x' names method 'gpt'"),
])
def test_cli_compare_bad_input(run_cli, fmnist_dir, argv, match):
    code, out, err = run_cli("compare", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--limit", "4",
                             "--bench-runs", "0", "--no-progress", *argv)
    assert code == 2
    assert match in err and "Traceback" not in err


def test_cli_compare_budgets_not_numbers(run_cli, fmnist_dir):
    code, _, err = run_cli("compare", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--budgets", "abc")
    assert code == 2 and "--budgets" in err and len(err.strip().splitlines()) == 1


def test_cli_vis(run_cli, fmnist_dir, tmp_path):
    out_png = tmp_path / "maps.png"
    code, out, err = run_cli("vis", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--methods", "gtp,tome,evit",
                             "--budget", "0.6", "--index", "3", "--output", out_png)
    assert code == 0, err
    assert out_png.is_file() and out_png.stat().st_size > 1000
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # IdleViT (its keep rate) beside a labelled GTP variant: both drawn from their traces
    code, out, err = run_cli("vis", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--methods", "idle,evit,gtp-cls",
                             "-O", "gtp-cls.method=gtp", "-O", "gtp-cls.score=cls", "--keep", "0.5",
                             "--output", tmp_path / "idle.png")
    assert code == 0, err
    assert (tmp_path / "idle.png").stat().st_size > 1000
    code, out, err = run_cli("vis", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--index", "999",
                             "--output", tmp_path / "x.png")
    assert code == 2 and "--index" in err
    code, out, err = run_cli("vis", *STUDENT, "--data", f"fmnist:{fmnist_dir}", "--methods", "gtp,nope",
                             "--output", tmp_path / "y.png")
    assert code == 2 and "nope" in err


def test_plot_token_maps_from_real_traces(tmp_path):
    model = tiny_vit()
    x = torch.randn(1, 3, 96, 96)
    traces = {}
    for method in ("gtp", "tome", "evit"):
        m = leanvit.patch(tiny_vit(), method, r=[6, 5, 4, 3], trace=True)
        with torch.no_grad():
            m(x)
        traces[method] = get_reducer(m).trace_log
        assert len(traces[method]) == 4
    path = plot_token_maps(x[0], traces, (6, 6), tmp_path / "maps.png", title="t")
    assert path.is_file() and path.stat().st_size > 1000
    del model


def test_plot_token_maps_hand_made(tmp_path):
    """Every record is drawn from its data (states, groups, edges), whatever its row's label."""
    from leanvit.reduce.types import IDLE, KEPT, MERGED, PROPAGATED, REACTIVATED, REMOVED

    h = w = 4
    n = h * w
    eye = torch.eye(n, dtype=torch.bool)
    kept = [i for i in range(n) if i not in (0, 5)]

    def state(**codes):
        s = torch.full((1, n), KEPT, dtype=torch.uint8)
        for code, idx in codes.items():
            s[0, idx] = {"merged": MERGED, "propagated": PROPAGATED, "removed": REMOVED, "idle": IDLE,
                         "reactivated": REACTIVATED}[code]
        return s

    gtp_entry = {"block": torch.tensor(0), "tokens": torch.tensor(14), "source": eye[kept][None],
                 "state": state(propagated=[0], removed=[5]), "removed_source": eye[[0, 5]][None],
                 "weights": torch.rand(1, len(kept), 2) * (torch.rand(1, len(kept), 2) > 0.5)}
    merged = eye.clone()[1::2]
    merged[0, 0] = True  # token 0 merged into token 1
    tome_entry = {"block": torch.tensor(1), "tokens": torch.tensor(15), "source": torch.cat([eye[2::2], merged])[None],
                  "state": state(merged=[0, 1])}
    idle_entry = {"block": torch.tensor(2), "tokens": torch.tensor(10), "source": eye[None],
                  "state": state(idle=[0, 1, 2, 3, 4, 5], reactivated=[6])}
    gray = torch.rand(1, 32, 32)
    path = plot_token_maps(gray, {"gtp": [gtp_entry], "my-merge": [tome_entry], "idle": [idle_entry, idle_entry]},
                           (h, w), tmp_path / "sub" / "hand.png")
    assert path.is_file() and path.stat().st_size > 1000
    # an empty trace (e.g. truncate, or r=0) still plots the input
    assert plot_token_maps(torch.rand(3, 32, 32), {"truncate": []}, (h, w), tmp_path / "empty.png").is_file()


def test_trace_states_of_every_method():
    """The trace says what happened to each patch: ToMe merges, EViT fuses (merged) or drops (removed), GTP
    propagates (and, as published, loses orphans), IdleViT idles and re-activates."""
    from leanvit.reduce.types import IDLE, KEPT, MERGED, PROPAGATED, REACTIVATED, REMOVED
    from conftest import image, make

    x = image(96, batch=1)
    found = {}
    for method, kw in (("tome", dict(r=6)), ("evit", dict(keep=0.5)), ("evit", dict(keep=0.5, fuse=None)),
                       ("gtp", dict(r=6, graph="spatial")), ("idle", dict(keep=[1.0, 0.3, 0.3, 0.3]))):
        model = make("deit", img_size=96, depth=4)
        leanvit.patch(model, method, trace=True, **kw)
        with torch.no_grad():
            model(x)
        log = get_reducer(model).trace_log
        assert log, method
        states = torch.stack([e["state"][0] for e in log])
        found[(method, kw.get("fuse", "mean"))] = set(states.unique().tolist())
        for e in log:  # tokens: image tokens the block goes on with (removal) or computes (idling)
            assert int(e["tokens"]) == (int((e["state"][0] == KEPT).sum() + (e["state"][0] == REACTIVATED).sum())
                                        if method == "idle" else e["source"].shape[1])
    assert MERGED in found[("tome", "mean")] and PROPAGATED not in found[("tome", "mean")]
    assert MERGED in found[("evit", "mean")] and REMOVED not in found[("evit", "mean")]
    assert REMOVED in found[("evit", None)] and MERGED not in found[("evit", None)]
    assert PROPAGATED in found[("gtp", "mean")]
    assert {IDLE, REACTIVATED} <= found[("idle", "mean")]


def test_plot_pareto_hand_made(tmp_path):
    rows = [{"method": "dense", "gmacs": 1.0, "top1": 80.0},
            {"method": "gtp", "gmacs": 0.7, "top1": 79.0, "top1_std": 0.2},
            {"method": "gtp", "gmacs": 0.5, "top1": 76.0, "top1_std": 0.3},
            {"method": "tome", "gmacs": 0.5, "top1": 75.5},
            {"method": "tome", "gmacs": 0.7, "top1": 78.5},
            {"method": "evit", "gmacs": 0.6, "top1": 74.0},
            {"method": "other", "gmacs": 0.6, "top1": 70.0}]
    for suffix in ("png", "svg"):
        path = plot_pareto(rows, tmp_path / f"p.{suffix}", title="hand")
        assert path.is_file() and path.stat().st_size > 500


def test_cli_compare_timm_checkpoint_on_imagefolder(run_cli, tmp_path):
    """The path a DeiT + ImageNet user takes: a timm model name, a checkpoint file, an ImageFolder."""
    from PIL import Image

    from leanvit.io import save_weights

    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    for c in ("n01440764", "n01443537"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(180, 200, 3), dtype=np.uint8)).save(root / c / f"{i}.JPEG")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=2)
    ckpt = tmp_path / "test_vit.safetensors"
    save_weights(model, ckpt)
    out_json = tmp_path / "rows.json"
    code, out, err = run_cli("compare", "--model", "test_vit", "--weights", str(ckpt), "--num-classes", "2",
                             "--data", f"imagefolder:{tmp_path}", "--methods", "dense,gtp,tome,evit",
                             "--budgets", "0.8", "--bench-runs", "1", "--bench-batch", "2", "--json", str(out_json),
                             "--no-progress")
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["meta"]["images"] == 6  # the 'val' sub-folder was picked for evaluation
    dense = data["rows"][0]
    # the checkpoint was loaded: dense accuracy equals the in-process model's on the same transformed images
    from leanvit.data import build_dataset

    ds = build_dataset(f"imagefolder:{tmp_path}", "test", model)
    with torch.no_grad():
        preds = model.eval()(torch.stack([ds[i][0] for i in range(len(ds))])).argmax(-1)
    expected = 100.0 * (preds == torch.tensor([ds[i][1] for i in range(len(ds))])).float().mean().item()
    assert dense["method"] == "dense" and abs(dense["top1"] - expected) < 1e-6
    assert all(r["macs_ratio"] <= 0.8 + 1e-9 for r in data["rows"][1:])


def test_compare_a_model_that_comes_patched():
    """A fine-tuned zoo model comes patched: its patch is a row of its own, dense is its weights unpatched, and the
    other methods replace the patch on copies (the model itself is left as it came)."""
    from leanvit.experiments.compare import run_comparison
    from conftest import make

    model = leanvit.patch(make("deit", img_size=96, depth=4), "idle", keep=0.5)
    rows = run_comparison(model, None, ["dense", "evit"], [0.7], bench_runs=0, progress=False)
    assert [r.method for r in rows] == ["dense", "idle-shipped", "evit"]
    assert rows[0].macs_ratio == 1.0 and rows[1].macs_ratio < 0.8 and rows[2].macs_ratio <= 0.7
    assert get_reducer(model).name == "idle" and get_reducer(model).report["keep"] == 0.5
