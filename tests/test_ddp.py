"""Two-process DDP training on CPU (gloo) through torchrun and the ``leanvit train`` CLI."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import BIN_DIR, subprocess_env

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
N_IMAGES, BATCH, WORLD = 128, 16, 2


def test_ddp_two_ranks(fmnist_train_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN_DIR / "torchrun"), "--standalone", "--nproc_per_node", str(WORLD), str(WORKER),
           "train", "--model", "leanvit_vit_fm_student", "--data", f"fmnist:{fmnist_train_dir}",
           "--split", "trainval", "--limit", str(N_IMAGES), "--val-split", "test", "--limit-val", "32",
           "--epochs", "1", "--batch-size", str(BATCH), "--device", "cpu", "--threads", "1", "--no-progress",
           "--warmup-epochs", "0", "--lr", "0.003", "--output", str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    init = [load_file(str(out / f"init_rank{r}.safetensors")) for r in range(WORLD)]
    final = [load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # the ranks started from different weights (the worker perturbs rank 1) ...
    assert not torch.equal(init[0]["head.weight"], init[1]["head.weight"])
    # ... and end identical: DDP broadcast rank 0's start and averaged every gradient; buffers included
    assert final[0].keys() == final[1].keys()
    assert [k for k in final[0] if not torch.equal(final[0][k], final[1][k])] == []
    # training changed the weights
    changed = [k for k in final[0] if final[0][k].is_floating_point() and not torch.equal(final[0][k], init[0][k])]
    assert "head.weight" in changed and "blocks.0.attn.qkv.weight" in changed
    # the CLI's model.safetensors (written by rank 0) is the trained model
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], final[0][k]) for k in saved)

    # the distributed sampler splits the data: disjoint halves, each rank N / (world * batch) steps
    expected_steps = N_IMAGES // (WORLD * BATCH)
    assert [i["steps_per_epoch"] for i in info] == [expected_steps] * WORLD
    assert [i["step"] for i in info] == [expected_steps] * WORLD
    assert [i["world_size"] for i in info] == [WORLD] * WORLD
    idx = [set(i["indices"]) for i in info]
    assert len(idx[0]) == len(idx[1]) == N_IMAGES // WORLD
    assert idx[0].isdisjoint(idx[1]) and idx[0] | idx[1] == set(range(N_IMAGES))

    log = json.loads((out / "log.json").read_text())
    assert len(log) == 1 and log[0]["step"] == expected_steps and "val_top1" in log[0]
    assert not (out / "rank1.json").read_text() == (out / "rank0.json").read_text()
