"""The ``leanvit`` command line and the public model API: model listing, errors, YAML configs, NaN guard,
train + eval end to end, and pretrained weights from the zoo folder."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

import leanvit
from leanvit.data import fashion_mnist
from leanvit.data.fashion_mnist import FashionMNIST
from leanvit.engine import LossTerm, Trainer, TrainConfig
from leanvit.io import save_weights
from leanvit.errors import ConfigError, LeanvitError, TrainingError

REFERENCE = ("leanvit_vit_fm_teacher", "leanvit_vit_fm_student")


# ---------------------------------------------------------------- model listing and names
def test_list_models(run_cli):
    code, out, err = run_cli("list-models")
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.splitlines()]
    assert set(REFERENCE) <= set(names)
    assert all(n.startswith("leanvit_") for n in names)
    assert set(REFERENCE) <= set(leanvit.list_models())
    code, out, _ = run_cli("list-models", "test_vi*")
    assert code == 0 and "test_vit" in out.split()


def test_unknown_model_lists_valid_names(run_cli, fmnist_dir):
    code, out, err = run_cli("eval", "--model", "leanvit_vit_fm_studnet", "--data", f"fmnist:{fmnist_dir}")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "unknown model 'leanvit_vit_fm_studnet'" in err
    for name in REFERENCE:
        assert name in err
    assert "Did you mean" in err
    with pytest.raises(ConfigError, match="leanvit_vit_fm_teacher"):
        leanvit.create_model("no_such_vit")


def test_unknown_verb_and_bad_option_exit_2(run_cli):
    """argparse's own errors come out as one ``leanvit: error:`` line too (no usage block, no SystemExit)."""
    code, _, err = run_cli("frobnicate")
    assert code == 2 and err.startswith("leanvit: error: ") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("train", "--epochs", "three", "-o", "x")
    assert code == 2 and "argument --epochs: expected an integer, got 'three'" in err


# ---------------------------------------------------------------- YAML configs
def test_yaml_config_sets_defaults(tmp_path, run_cli, fmnist_dir):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: leanvit_vit_fm_student\ndata: fmnist:{fmnist_dir}\nsplit: test\nlimit: 12\n"
                   f"batch-size: 5\npretrained: false\nprogress: false\njson: {tmp_path / 'r.json'}\n")
    code, out, err = run_cli("eval", "--config", cfg)
    assert code == 0, err
    assert f"leanvit_vit_fm_student on fmnist:{fmnist_dir} (test, 12 images)" in out
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["n"] == 12 and row["model"] == "leanvit_vit_fm_student"
    # a flag on the command line wins over the file
    code, out, err = run_cli("eval", "-c", cfg, "--limit", "7")
    assert code == 0 and "(test, 7 images)" in out


def test_yaml_config_errors(tmp_path, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: leanvit_vit_fm_student\nepochz: 3\nlearning_rate: 0.1\n")
    code, out, err = run_cli("train", "-c", bad, "-o", tmp_path / "run")
    assert code == 2 and "unknown keys: epochz, learning_rate" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli("train", "-c", tmp_path / "missing.yaml", "-o", tmp_path / "run")
    assert code == 2 and "does not exist" in err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli("train", "-c", tmp_path / "list.yaml", "-o", tmp_path / "run")
    assert code == 2 and "mapping" in err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    code, _, err = run_cli("train", "-c", tmp_path / "broken.yaml", "-o", tmp_path / "run")
    assert code == 2 and "not valid YAML" in err


# ---------------------------------------------------------------- NaN guard
class NanAtStep(LossTerm):
    """Zero loss until call ``at``, then NaN."""

    name = "nan_probe"

    def __init__(self, at: int):
        super().__init__(1.0)
        self.at, self.calls = at, 0

    def forward(self, ctx):
        self.calls += 1
        zero = ctx.logits.sum() * 0.0
        return zero + float("nan") if self.calls >= self.at else zero


def test_nan_loss_stops_training(fmnist_dir, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("leanvit_vit_fm_student")
    train_set = FashionMNIST(fmnist_dir, split="test", limit=32, train_aug=True)
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, amp=False)
    trainer = Trainer(model, train_set, None, cfg, tmp_path / "run", loss_terms=[NanAtStep(3)])
    with pytest.raises(TrainingError) as ei:
        trainer.fit()
    msg = str(ei.value)
    assert "step 3" in msg and "epoch 1" in msg and "nan" in msg.lower() and "learning rate" in msg
    assert isinstance(ei.value, LeanvitError)
    assert trainer.step == 2  # the bad step was not applied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_nan_loss_from_huge_lr_through_cli(tmp_path, run_cli, fmnist_dir, monkeypatch):
    """lr 1e30 blows the weights up after one step; the CLI reports it as one error line, exit 2."""
    code, out, err = run_cli("train", "--model", "leanvit_vit_fm_student", "--data", f"fmnist:{fmnist_dir}",
                             "--split", "trainval", "--val-split", "none", "--limit", "48", "--batch-size", "16",
                             "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e30", "--clip-grad", "0",
                             "--no-progress", "--threads", "1", "-o", tmp_path / "run")
    assert code == 2, (out, err)
    assert "leanvit: error: loss became" in err and "at step" in err and "Traceback" not in err


# ---------------------------------------------------------------- end to end
def test_train_then_eval(tmp_path, run_cli, fmnist_dir, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "VAL_SIZE", 16)  # default splits: train = 48 images, val = 16
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "--model", "leanvit_vit_fm_student", "--data", f"fmnist:{fmnist_dir}",
                                "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "0.5",
                                "--no-progress", "--threads", "1", "-o", out)
    assert code == 0, err
    assert "[epoch 1/2]" in stdout and "[epoch 2/2]" in stdout
    for name in ("last.pt", "model.safetensors", "best.safetensors", "log.csv", "log.json", "config.yaml",
                 "command.txt"):
        assert (out / name).is_file(), name
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2] and [r["step"] for r in log] == [3, 6]
    assert all(math.isfinite(r["loss"]) and 0 <= r["val_top1"] <= 100 for r in log)
    assert "leanvit_vit_fm_student" in (out / "config.yaml").read_text()
    assert (out / "command.txt").read_text().startswith("leanvit ")

    code, stdout, err = run_cli("eval", "--model", "leanvit_vit_fm_student", "--weights", out / "model.safetensors",
                                "--data", f"fmnist:{fmnist_dir}", "--split", "val", "--no-progress",
                                "--json", tmp_path / "eval.json")
    assert code == 0, err
    assert "top-1" in stdout and "(val, 16 images)" in stdout
    res = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["n"] == 16
    # eval of the saved weights reproduces the last epoch's validation accuracy
    assert res["top1"] == pytest.approx(log[-1]["val_top1"])


# ---------------------------------------------------------------- pretrained weights from the zoo
@pytest.fixture
def temp_zoo(tmp_path, monkeypatch):
    """Point leanvit's zoo (and the timm pretrained cfg of the student) at an empty temporary folder."""
    import leanvit.zoo as zoo
    from timm.models._registry import _model_pretrained_cfgs

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    name = "leanvit_vit_fm_student"
    cfg = _model_pretrained_cfgs[f"{name}.fmnist"]
    monkeypatch.setattr(cfg, "file", zoo.weight_file(name))
    return name, tmp_path / "weights" / f"{name}.safetensors"


def test_pretrained_loads_zoo_file(temp_zoo, run_cli):
    name, path = temp_zoo
    torch.manual_seed(1)
    trained = timm.create_model(name)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5).add_(0.01)
    save_weights(trained, path)
    for model in (timm.create_model(name, pretrained=True), leanvit.create_model(name, pretrained=True)):
        sd, ref = model.state_dict(), load_file(str(path))
        assert sd.keys() == ref.keys()
        assert [k for k in ref if not torch.equal(sd[k], ref[k])] == []
    code, out, _ = run_cli("list-models")
    assert code == 0 and f"{name}  (shipped weights)" in out


def test_pretrained_without_weights_is_clear(temp_zoo, run_cli, fmnist_dir):
    name, path = temp_zoo
    assert not path.exists()
    with pytest.raises(FileNotFoundError) as ei:
        timm.create_model(name, pretrained=True)
    assert str(path) in str(ei.value) and "pretrained=False" in str(ei.value)
    with pytest.raises(ConfigError, match="no shipped weights"):
        leanvit.create_model(name, pretrained=True)
    code, out, err = run_cli("eval", "--model", name, "--data", f"fmnist:{fmnist_dir}", "--no-progress")
    assert code == 2 and str(path) in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli("list-models")
    assert f"{name}  (no weights yet)" in out
