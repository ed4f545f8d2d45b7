"""Every verb against a matrix of bad inputs: one line ``leanvit: error: ...`` on stderr, exit code 2, no traceback,
and nothing written. Most cases fail before a model or dataset is loaded, so the matrix is fast."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from leanvit.io import load_weights, save_weights
from leanvit.errors import CheckpointError

STUDENT = "leanvit_vit_fm_student"


def _cases(fm: str, tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, a fragment the error line must contain). ``tmp`` holds a file ``afile`` and a folder ``adir``."""
    afile, adir = tmp / "afile", tmp / "adir"
    data = ["--data", f"fmnist:{fm}", "--no-progress"]
    m = ["--model", STUDENT]
    cfg_flag = tmp / "flag.yaml"
    cfg_flag.write_text("no_progress: true\n")
    cfg_type = tmp / "type.yaml"
    cfg_type.write_text("batch_size: 0\n")
    cfg_bool = tmp / "bool.yaml"
    cfg_bool.write_text("progress: maybe\n")
    return [
        # ------------------------------------------------------------------ eval
        (["eval", "-b", "0"], "--batch-size"),
        (["eval", "--limit", "-5"], "--limit"),
        (["eval", "--limit", "0"], "--limit"),
        (["eval", "--workers", "-1"], "--workers"),
        (["eval", "--threads", "0"], "--threads"),
        (["eval", "--split", "bogus"], "--split"),
        (["eval", "--num-classes", "0"], "--num-classes"),
        (["eval", "--budget", "0.5"], "pick a --method"),
        (["eval", "--r", "4"], "pick a --method"),
        (["eval", "-O", "alpha=1"], "pick a --method"),
        (["eval", "--method", "gtp"], "needs --r, --budget or --keep"),
        (["eval", "--method", "foo", "--r", "2"], "unknown method 'foo'"),
        (["eval", "--method", "gtp", "--budget", "1.5"], "--budget"),
        (["eval", "--method", "gtp", "--budget", "abc"], "--budget"),
        (["eval", "--method", "gtp", "--r", "2", "--budget", "0.5"], "not --r and --budget"),
        (["eval", "--method", "gtp", "--budget", "0.5", "-O", "alpha=abc"], "option 'alpha' of 'gtp' must be a number"),
        (["eval", "--method", "gtp", "--r", "2", "-O", "k=2.5"], "option 'k' of 'gtp' must be an integer"),
        (["eval", "--method", "gtp", "--r", "2", "-O", "theta=x"], "option 'theta'"),
        (["eval", "--method", "gtp", "--r", "2", "-O", "prop_attn=maybe"], "must be true or false"),
        (["eval", "--method", "gtp", "--r", "2", "-O", "nope=1"], "unknown option 'nope'"),
        (["eval", "--method", "gtp", "--r", "2", "-O", "novalue"], "OPTION=VALUE"),
        (["eval", "--method", "tome", "--keep", "0.7"], "'tome' does not take keep="),
        (["eval", "--method", "evit", "--keep", "0.7", "-O", "keep=0.5"], "not --keep and -O keep"),
        (["bench", "--method", "evit", "--budget", "0.7", "-O", "r=2"], "not --budget and -O r"),
        (["eval", "--device", "foo"], "unknown device 'foo'"),
        (["eval", "--device", "cuda:77"], "--device cuda:77"),
        (["eval", "--json", "/proc/leanvit.json"], "cannot write in /proc"),
        (["eval", "--json", str(adir)], "is a folder"),
        (["eval", "--json", str(afile / "x.json")], "is a file, not a folder"),
        (["eval", "--model", "no_such_vit"], "unknown model 'no_such_vit'"),
        (["eval", *m, "--weights", str(tmp / "missing.pth")], "does not exist"),
        (["eval", *m, "--weights", str(afile)], "is not a readable torch file"),
        (["eval", *m, *data, "--num-classes", "5"], "would be untrained"),
        (["eval", *m, "--data", "bogus", "--no-progress"], "unknown data source"),
        (["eval", *m, "--data", f"fmnist:{tmp / 'nofmnist'}", "--no-progress"], "apt-get install -y"),
        (["eval", *m, "--data", f"imagefolder:{tmp / 'noimages'}", "--no-progress"], "does not exist"),
        (["eval", *m, "--data", "synthetic:abc", "--no-progress"], "synthetic takes a number"),
        (["eval", "-c", str(cfg_flag)], "write 'progress: false'"),
        (["eval", "-c", str(cfg_type)], "batch_size: must be at least 1"),
        (["eval", "-c", str(cfg_bool)], "progress must be true or false"),
        # ------------------------------------------------------------------ compare
        (["compare", "--seeds", "0"], "--seeds"),
        (["compare", "--bench-batch", "0"], "--bench-batch"),
        (["compare", "--bench-runs", "-1"], "--bench-runs"),
        (["compare", "--budgets", "0.5,1.5"], "--budgets"),
        (["compare", "--budgets", ","], "--budgets"),
        (["compare", "--methods", "dense,foo"], "unknown method 'foo'"),
        (["compare", "--methods", "gtp,gtp"], "named twice"),
        (["compare", "-O", "tome.alpha=1"], "unknown option 'alpha' for 'tome'"),
        (["compare", "-O", "gtp.k=2.5"], "option 'k' of 'gtp' must be an integer"),
        (["compare", "-O", "vit.k=2"], "not among --methods"),
        (["compare", "--methods", "dense,e", "-O", "e.method=evit", "-O", "e.keep=2"], "keep must be"),
        (["compare", "--plot", str(tmp / "out" / "x.xyz")], "cannot write plots as 'xyz'"),
        (["compare", "--plot", str(tmp / "x.png"), "--no-accuracy"], "--plot needs accuracy"),
        (["compare", "--json", "/proc/leanvit.json"], "cannot write in /proc"),
        (["compare", "--device", "foo"], "unknown device"),
        # ------------------------------------------------------------------ vis
        (["vis", "-o", str(tmp / "maps.xyz")], "cannot write plots as 'xyz'"),
        (["vis", "-o", str(adir)], "is a folder"),
        (["vis", "--index", "-1"], "--index"),
        (["vis", "--methods", "foo"], "unknown method 'foo'"),
        (["vis", "--methods", ","], "--methods needs at least one"),
        (["vis", "--methods", "dense,gtp"], "'dense' has nothing to draw"),
        (["vis", "--budget", "0"], "--budget"),
        (["vis", "--device", "foo"], "unknown device"),
        (["vis", *m, *data, "--index", "999", "-o", str(tmp / "maps.png")], "--index 999 is outside"),
        # ------------------------------------------------------------------ bench
        (["bench", "-b", "0"], "--batch-size"),
        (["bench", "--runs", "0"], "--runs"),
        (["bench", "--warmup", "-1"], "--warmup"),
        (["bench", "--budget", "0.5"], "pick a --method"),
        (["bench", "--method", "gtp"], "needs --r, --budget or --keep"),
        (["bench", "--method", "gtp", "--r", "2", "-O", "k=x"], "option 'k'"),
        (["bench", "--json", "/proc/leanvit.json"], "cannot write in /proc"),
        (["bench", "--device", "foo"], "unknown device"),
        # ------------------------------------------------------------------ train
        (["train", "-o", str(afile)], "is a file"),
        (["train", "-o", str(tmp / "run"), "--epochs", "0"], "--epochs"),
        (["train", "-o", str(tmp / "run"), "--epochs", "three"], "--epochs"),
        (["train", "-o", str(tmp / "run"), "-b", "0"], "--batch-size"),
        (["train", "-o", str(tmp / "run"), "--lr", "-1"], "--lr"),
        (["train", "-o", str(tmp / "run"), "--device", "foo"], "unknown device"),
        (["train", *m, *data, "--split", "trainval", "--val-split", "none", "--limit", "16", "-b", "8",
          "--frozen", "no_such_param", "-o", str(tmp / "run")], "frozen prefix 'no_such_param' matches no"),
        (["train", *m, *data, "--split", "trainval", "--num-classes", "5", "-o", str(tmp / "run")],
         "10 classes but the model's head has 5"),
        # ------------------------------------------------------------------ distill, analyze
        (["distill", "--method", "foo", "-o", str(tmp / "run")], "unknown distillation method 'foo'"),
        (["distill", "--method", "pefd", "--projectors", "0", "-o", str(tmp / "run")], "projectors"),
        (["distill", "--method", "pefd", "-o", str(tmp / "run")], "needs a teacher"),
        (["distill", "--teacher", "nope_vit", "-o", str(tmp / "run")], "unknown model 'nope_vit'"),
        (["distill", "--teacher", "leanvit_vit_fm_teacher", "-o", str(afile)], "is a file"),
        (["analyze", "--json", "/proc/leanvit.json"], "cannot write in /proc"),
        (["analyze", "--reliability-plot", str(tmp / "r.xyz")], "cannot write plots as 'xyz'"),
        (["analyze", "--teacher", "nope_vit"], "unknown model 'nope_vit'"),
        # ------------------------------------------------------------------ list-models, verbs
        (["list-models", "nonexist*"], "no model matches 'nonexist*'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_bad_input_matrix(run_cli, fmnist_dir, tmp_path, monkeypatch):
    """One pass over the matrix (one test, so the shared set-up is paid once); every failure is listed."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("x")
    (work / "adir").mkdir()
    monkeypatch.chdir(work)
    cases = _cases(str(fmnist_dir), work)
    before = _snapshot(work)
    failures = []
    for argv, fragment in cases:
        code, out, err = run_cli(*argv)
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("leanvit: error: ") and fragment in lines[0]
              and "Traceback" not in err)
        if not ok:
            failures.append(f"{' '.join(argv)}\n    -> exit {code}, stderr {err.strip()!r}")
        after = _snapshot(work)
        if after != before:
            failures.append(f"{' '.join(argv)}\n    -> wrote {sorted(after - before)}")
            before = after
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- weights files cannot run code
class _Evil:
    """Unpickling this runs ``open(path, 'w')``: a stand-in for a shell command hidden in a .pth file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path, run_cli, fmnist_dir):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(evil)
    code, _, err = run_cli("eval", "--model", STUDENT, "--weights", evil, "--data", f"fmnist:{fmnist_dir}",
                           "--no-progress")
    assert code == 2 and "refused" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    # a training checkpoint is read the same way
    from leanvit.engine import load_checkpoint

    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()
    # and a raw pickle (no torch zip) too
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    with pytest.raises(CheckpointError):
        load_weights(raw)
    assert not marker.exists()


def test_weights_format_by_content(tmp_path):
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    misnamed = tmp_path / "weights.pth"  # safetensors content behind a torch extension
    save_weights(sd, misnamed)
    assert set(load_weights(misnamed)) == {"a", "b"}
    as_torch = tmp_path / "weights.safetensors"  # a torch state dict behind the safetensors extension
    torch.save(sd, as_torch)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_weights(as_torch)
    plain = tmp_path / "plain.pt"
    torch.save({"model": sd}, plain)
    assert torch.equal(load_weights(plain)["b"], sd["b"])


# ---------------------------------------------------------------- outputs: strict JSON, atomic files
def test_json_has_null_not_nan(tmp_path):
    from leanvit.io import write_json

    path = tmp_path / "r.json"
    write_json(path, {"a": float("nan"), "b": [1.0, float("inf")], "c": (1, 2)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [1, 2]}


def test_compare_json_is_strict_and_keep_variant_runs(run_cli, fmnist_dir, tmp_path):
    out = tmp_path / "c.json"
    code, stdout, err = run_cli("compare", "--model", STUDENT, "--data", f"fmnist:{fmnist_dir}", "--limit", "8",
                                "--methods", "dense,evit,evit-k", "-O", "evit-k.method=evit", "-O", "evit-k.keep=0.7",
                                "--budgets", "0.6", "--bench-runs", "0", "--no-progress", "--json", out)
    assert code == 0, err
    text = out.read_text()
    assert "NaN" not in text
    rows = {r["method"]: r for r in json.loads(text)["rows"]}
    assert rows["dense"]["images_per_s"] is None  # not timed: null, not NaN
    assert rows["evit-k"]["macs_ratio"] < 1.0 and rows["evit-k"]["budget"] == pytest.approx(
        rows["evit-k"]["macs_ratio"])
    assert math.isfinite(rows["evit"]["top1"])


def test_eval_keep_and_lost_token_share(run_cli, fmnist_dir, tmp_path):
    code, out, err = run_cli("eval", "--model", STUDENT, "--data", f"fmnist:{fmnist_dir}", "--no-progress",
                             "--method", "evit", "--keep", "0.7", "--json", tmp_path / "e.json")
    assert code == 0, err
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["method"] == "evit" and row["keep"] == 0.7 and sum(row["schedule"]) > 0
    code, out, err = run_cli("eval", "--model", STUDENT, "--data", f"fmnist:{fmnist_dir}", "--no-progress",
                             "--method", "gtp", "--budget", "0.6", "--json", tmp_path / "g.json")
    assert code == 0, err
    row = json.loads((tmp_path / "g.json").read_text())
    # counted over the evaluation only: the 32 test images, each losing sum(schedule) tokens
    assert row["removed_tokens"] == 32 * sum(row["schedule"]) and 0 <= row["lost_token_fraction"] <= 1
    assert "of removed tokens lost" in out


# ---------------------------------------------------------------- progress output off a terminal
def test_progress_prints_few_lines_off_a_terminal():
    from leanvit.progress import track

    buf = io.StringIO()
    for _ in track(range(1000), desc="phase", file=buf):
        pass
    lines = buf.getvalue().splitlines()
    assert 3 <= len(lines) <= 6 and lines[0].startswith("phase: started") and "done in" in lines[-1]
    assert "\r" not in buf.getvalue()
    buf = io.StringIO()
    for _ in track(range(10), desc="quiet", enabled=False, file=buf):
        pass
    assert buf.getvalue() == ""


# ---------------------------------------------------------------- image folders
def _image_folder(root: Path, mode: str = "RGB") -> Path:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for c in range(10):
        d = root / "val" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(2):
            arr = rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(d / f"{i}.png")
    return root


def test_grayscale_model_reads_image_folder(run_cli, tmp_path):
    root = _image_folder(tmp_path / "imgs")
    code, out, err = run_cli("eval", "--model", STUDENT, "--data", f"imagefolder:{root}", "--no-progress")
    assert code == 0, err
    assert "(test, 20 images)" in out
    (root / "val" / "class3" / "broken.png").write_bytes(b"not an image")
    code, out, err = run_cli("eval", "--model", STUDENT, "--data", f"imagefolder:{root}", "--no-progress")
    assert code == 2 and "broken.png" in err and "--skip-bad-images" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("eval", "--model", STUDENT, "--data", f"imagefolder:{root}", "--no-progress",
                             "--skip-bad-images")
    assert code == 0 and "(test, 20 images)" in out and "broken.png" in err


def test_dense_eval_with_workers_names_bad_file(run_cli, tmp_path):
    root = _image_folder(tmp_path / "imgs", mode="L")
    (root / "val" / "class0" / "zz.png").write_bytes(b"\x89PNG garbage")
    code, _, err = run_cli("eval", "--model", STUDENT, "--data", f"imagefolder:{root}", "--no-progress",
                           "--workers", "1", "-b", "4")
    assert code == 2 and "zz.png" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_atomic_plot_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanvit.vis._figure import save_figure

    fig = plt.figure()
    target = tmp_path / "p.png"
    save_figure(fig, target)
    assert target.read_bytes()[:4] == b"\x89PNG"
    before = target.read_bytes()
    fig = plt.figure()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(OSError):
        save_figure(fig, target)
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["p.png"]
