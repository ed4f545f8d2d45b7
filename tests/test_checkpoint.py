"""Checkpoints and weight files: round trips, atomic writes, corrupt files, readable mismatch errors."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from leanvit.engine import checkpoint as ckpt
from leanvit.engine import load_checkpoint, save_checkpoint
from leanvit.io import load_into, load_weights, save_weights
from leanvit.errors import CheckpointError


def _state(v: float = 1.0) -> dict:
    return {"model": {"w": torch.full((3, 4), v), "b": torch.arange(4.0)}, "epoch": 2, "step": 17,
            "history": [{"epoch": 1, "loss": 0.5}], "rng": torch.get_rng_state()}


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "sub" / "last.pt"  # the folder is created
    state = _state(3.0)
    save_checkpoint(state, path)
    back = load_checkpoint(path)
    assert back["format"] == ckpt.FORMAT
    assert back["epoch"] == 2 and back["step"] == 17 and back["history"] == state["history"]
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and torch.equal(back["rng"], state["rng"])
    assert _leftovers(path.parent) == []


def test_checkpoint_overwrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1.0), path)
    good = path.read_bytes()

    def torn_save(obj, f, *a, **k):  # writes half a file, then dies
        f.write(good[: len(good) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3, 4), 1.0))
    assert _leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_weights_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_weights({"w": torch.ones(2)}, path)
    good = path.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_weights({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and _leftovers(tmp_path) == []


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError):
            load_weights(path)


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_checkpoint(tmp_path, seed):
    path = tmp_path / "garbage.pt"
    g = torch.Generator().manual_seed(seed)
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_weights(path)


def test_missing_and_foreign_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")  # a state dict, not a leanvit checkpoint
    with pytest.raises(CheckpointError, match="not a leanvit training checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no model state dict"):
        load_weights(tmp_path / "list.pt")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_load_into_names_keys():
    model = _net()
    sd = model.state_dict()
    bad = dict(sd)
    bad["0.weight"] = torch.zeros(5, 4)  # wrong shape
    del bad["2.bias"]  # missing
    bad["head.extra"] = torch.zeros(1)  # unexpected
    with pytest.raises(CheckpointError) as ei:
        load_into(model, bad, source="weights file x.safetensors")
    msg = str(ei.value)
    assert "weights file x.safetensors" in msg
    assert "0.weight: (5, 4) vs model (3, 4)" in msg
    assert "missing 1 keys" in msg and "2.bias" in msg
    assert "unexpected 1 keys" in msg and "head.extra" in msg
    assert torch.equal(model.state_dict()["0.weight"], sd["0.weight"])  # nothing was loaded

    # non-strict tolerates missing/unexpected keys but never a shape mismatch
    partial = {k: v for k, v in sd.items() if k != "2.bias"}
    load_into(model, partial, strict=False)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(model, {"0.weight": torch.zeros(5, 4)}, strict=False)


def test_load_into_loads():
    src, dst = _net(), _net()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    load_into(dst, src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_safetensors_round_trip(tmp_path):
    model = _net()
    path = tmp_path / "w" / "model.safetensors"
    save_weights(model, path, metadata={"model": "tiny"})
    sd = load_weights(path)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v) and sd[k].dtype == v.dtype
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["model"] == "tiny"
    # tied (shared) tensors are accepted
    shared = torch.ones(3)
    save_weights({"a": shared, "b": shared}, tmp_path / "tied.safetensors")
    assert torch.equal(load_weights(tmp_path / "tied.safetensors")["b"], shared)


def test_load_weights_from_checkpoint_and_ddp_state_dict(tmp_path):
    model = _net()
    save_checkpoint({"model": model.state_dict(), "epoch": 1}, tmp_path / "last.pt")
    assert load_weights(tmp_path / "last.pt").keys() == model.state_dict().keys()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pth")
    sd = load_weights(tmp_path / "ddp.pth")
    assert sd.keys() == model.state_dict().keys()
    load_into(_net(), sd)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    save_weights(_net(), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_cli_eval_corrupt_weights(tmp_path, run_cli, fmnist_dir):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, out, err = run_cli("eval", "--model", "leanvit_vit_fm_student", "--weights", path,
                             "--data", f"fmnist:{fmnist_dir}", "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("leanvit: error: ") and str(path) in lines[0]
    assert "Traceback" not in err and out == ""


def test_cli_eval_mismatched_weights(tmp_path, run_cli, fmnist_dir):
    import timm

    import leanvit  # noqa: F401

    teacher = timm.create_model("leanvit_vit_fm_teacher")
    save_weights(teacher, tmp_path / "teacher.safetensors")
    code, out, err = run_cli("eval", "--model", "leanvit_vit_fm_student", "--weights", tmp_path / "teacher.safetensors",
                             "--data", f"fmnist:{fmnist_dir}", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not match the model" in err and "shape mismatch" in err and "Traceback" not in err
