"""Kill a training run mid-epoch, resume it, and get bit-identical weights to an uninterrupted run."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leanvit.engine import load_checkpoint
from leanvit.errors import CheckpointError

from conftest import subprocess_env


def _train_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "leanvit_vit_fm_student", "--data", f"fmnist:{data_dir}",
            "--split", "trainval", "--val-split", "test", "--limit", "256", "--limit-val", "64",
            "--epochs", "3", "--batch-size", "32", "--threads", "1", "--no-progress", "--seed", "0",
            "--warmup-epochs", "1", "--output", str(out), *extra]


def _cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "leanvit.cli.main", *argv]


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["epoch"])
    except CheckpointError:
        return -1


def _log_rows(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "log.json").read_text())


@pytest.fixture(scope="module")
def runs(fmnist_train_dir, tmp_path_factory):
    """An interrupted-then-resumed run and an uninterrupted run of the same command."""
    base = tmp_path_factory.mktemp("resume")
    killed, straight = base / "killed", base / "straight"
    env = subprocess_env()

    proc = subprocess.Popen(_cmd(_train_argv(fmnist_train_dir, killed)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = killed / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # epoch 1's checkpoint and logs are written (logs come after the checkpoint): epoch 2 is under way
            if (killed / "log.json").is_file() and _checkpoint_epoch(last) >= 1:
                proc.send_signal(signal.SIGKILL)  # no chance to clean up
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_output = proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL, f"run was not killed mid-way (rc {proc.returncode}):\n{killed_output}"
    epoch_at_kill = _checkpoint_epoch(last)
    assert not (killed / "model.safetensors").exists()

    resumed = subprocess.run(_cmd(_train_argv(fmnist_train_dir, killed, "--resume")), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    uninterrupted = subprocess.run(_cmd(_train_argv(fmnist_train_dir, straight)), env=env,
                                   capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr
    return dict(killed=killed, straight=straight, epoch_at_kill=epoch_at_kill, resumed=resumed,
                killed_output=killed_output)


def test_killed_mid_epoch_two(runs):
    # the kill landed after epoch 1's checkpoint and before epoch 2's
    assert runs["epoch_at_kill"] == 1
    assert "[epoch 2/3]" not in runs["killed_output"]
    assert "resumed" in runs["resumed"].stdout and "at epoch 1" in runs["resumed"].stdout


def test_resumed_weights_identical(runs):
    a = load_file(str(runs["killed"] / "model.safetensors"))
    b = load_file(str(runs["straight"] / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # the checkpoints agree too (optimizer moments included)
    ca, cb = load_checkpoint(runs["killed"] / "last.pt"), load_checkpoint(runs["straight"] / "last.pt")
    assert ca["epoch"] == cb["epoch"] == 3 and ca["step"] == cb["step"] == 3 * (256 // 32)
    for k in ca["optimizer"]["state"]:
        assert torch.equal(ca["optimizer"]["state"][k]["exp_avg_sq"], cb["optimizer"]["state"][k]["exp_avg_sq"])


def test_logs_have_three_epochs(runs):
    for out in (runs["killed"], runs["straight"]):
        rows, js = _log_rows(out)
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
        assert [r["epoch"] for r in js] == [1, 2, 3]
        assert [r["step"] for r in js] == [8, 16, 24]
        assert all("val_top1" in r for r in js)
    ja, jb = _log_rows(runs["killed"])[1], _log_rows(runs["straight"])[1]
    for ra, rb in zip(ja, jb):  # same losses and accuracies, epoch by epoch
        assert ra["loss"] == rb["loss"] and ra["val_top1"] == rb["val_top1"] and ra["lr"] == rb["lr"]


def test_rerun_without_resume_refused(runs, run_cli, fmnist_train_dir):
    before = (runs["straight"] / "last.pt").read_bytes()
    code, out, err = run_cli(*_train_argv(fmnist_train_dir, runs["straight"]))
    assert code == 2
    assert "last.pt exists" in err and "--resume" in err and "Traceback" not in err
    assert (runs["straight"] / "last.pt").read_bytes() == before


def test_resume_with_other_batch_size_refused(runs, run_cli, fmnist_train_dir):
    argv = _train_argv(fmnist_train_dir, runs["straight"], "--resume")
    argv[argv.index("--batch-size") + 1] = "16"
    code, out, err = run_cli(*argv)
    assert code == 2
    assert "batch_size=32" in err and "batch_size=16" in err and "Traceback" not in err


def test_resume_finished_run_is_noop(runs, run_cli, fmnist_train_dir):
    before = load_file(str(runs["straight"] / "model.safetensors"))
    code, out, err = run_cli(*_train_argv(fmnist_train_dir, runs["straight"], "--resume"))
    assert code == 0, err
    assert "nothing to do" in out
    after = load_file(str(runs["straight"] / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_other_model_or_loss_refused(runs, run_cli, fmnist_train_dir):
    """A run resumes only as what it was: another model, or another loss (a teacher term added), is refused."""
    before = (runs["straight"] / "last.pt").read_bytes()
    argv = _train_argv(fmnist_train_dir, runs["straight"], "--resume")
    argv[argv.index("--model") + 1] = "leanvit_vit_fm_teacher"
    code, _, err = run_cli(*argv)
    assert code == 2 and "model leanvit_vit_fm_student, now leanvit_vit_fm_teacher" in err
    code, _, err = run_cli(*_train_argv(fmnist_train_dir, runs["straight"], "--resume", "--teacher",
                                        "leanvit_vit_fm_student", "--kd-weight", "0.5"))
    assert code == 2 and "loss terms were" in err and "'kd'" in err and "Traceback" not in err
    assert (runs["straight"] / "last.pt").read_bytes() == before
