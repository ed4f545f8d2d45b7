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


class _Stop(Exception):
    pass


def test_resume_mid_epoch_is_exact(fmnist_train_dir, tmp_path):
    """A run stopped between two mid-epoch checkpoints resumes from the last one (not from the epoch start) and
    ends with the same weights, EMA, log and RNG stream as an uninterrupted run."""
    import timm

    from leanvit.data import build_dataset
    from leanvit.engine.losses import LossTerm
    from leanvit.engine.train import TrainConfig, Trainer

    class Tripwire(LossTerm):
        """Adds nothing; raises once its countdown reaches zero (a run killed after that many steps)."""

        name = "tripwire"

        def __init__(self, after: int | None):
            super().__init__(0.0)
            self.left = after

        def forward(self, ctx):
            if self.left is not None:
                self.left -= 1
                if self.left < 0:
                    raise _Stop
            return ctx.logits.sum() * 0.0

    def trainer(out, after=None):
        torch.manual_seed(0)
        model = timm.create_model("leanvit_vit_fm_student", pretrained=False)
        data = build_dataset(f"fmnist:{fmnist_train_dir}", "trainval", model, train=True, limit=256,
                             progress=False)
        cfg = TrainConfig(epochs=2, batch_size=32, seed=0, progress=False, checkpoint_steps=3, ema_decay=0.9,
                          warmup_epochs=0.5)
        return Trainer(model, data, None, cfg, out, loss_terms=[Tripwire(after)])

    straight = trainer(tmp_path / "straight")
    straight.fit()
    stopped = trainer(tmp_path / "stopped", after=13)  # 8 steps an epoch: stopped in epoch 2 after step 13
    with pytest.raises(_Stop):
        stopped.fit()
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["step"] == 11  # the mid-epoch checkpoint at 8 + 3
    resumed = trainer(tmp_path / "stopped")
    assert resumed.resume() and resumed.step == 11 and resumed.epoch == 1
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(straight.ema.module.state_dict().values(),
                                                  resumed.ema.module.state_dict().values()))
    for row_a, row_b in zip(straight.history, resumed.history):
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-6) and row_a["step"] == row_b["step"]
