"""Shared fixtures: tiny Fashion-MNIST idx files generated on the fly, one torch thread, in-process CLI runs."""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
BIN_DIR = Path(sys.executable).parent


def write_idx(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """Write ``arr`` (uint8) as an idx file; gzipped when ``path`` ends with ``.gz``."""
    path = Path(path)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_fmnist(root: str | os.PathLike, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A Fashion-MNIST-like folder: random 28x28 images, labels 0..9; two files gzipped, two plain.

    Each class gets a bright square in its own place so the data is learnable (a short run beats chance).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 64, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 5)
            images[i, 4 + 12 * r: 12 + 12 * r, 1 + 5 * q: 5 + 5 * q] = 255
        return images, labels

    tr_x, tr_y = split(n_train)
    te_x, te_y = split(n_test)
    write_idx(root / "train-images-idx3-ubyte.gz", tr_x)
    write_idx(root / "train-labels-idx1-ubyte", tr_y)
    write_idx(root / "t10k-images-idx3-ubyte", te_x)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", te_y)
    return root


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """64 training and 32 test images in the real idx format (read-only: do not modify)."""
    return make_fmnist(tmp_path_factory.mktemp("fmnist_small"), 64, 32, seed=0)


@pytest.fixture(scope="session")
def fmnist_train_dir(tmp_path_factory) -> Path:
    """256 training and 64 test images, for short training runs (use --split trainval --val-split test)."""
    return make_fmnist(tmp_path_factory.mktemp("fmnist_train"), 256, 64, seed=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread (the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_cli(capsys):
    """Run ``leanvit ARGV`` in-process; returns ``(exit_code, stdout, stderr)``."""
    from leanvit.cli.main import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def subprocess_env() -> dict[str, str]:
    """Environment for leanvit subprocesses: one thread, no stray distributed variables."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LEANVIT_FMNIST"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def mlp_token_counts(model, x):
    """``model.forward_features(x)`` without grad, and the token count each block's MLP saw."""
    counts = []
    hooks = [b.mlp.register_forward_hook(lambda m, inp, out: counts.append(inp[0].shape[1])) for b in model.blocks]
    try:
        with torch.no_grad():
            f = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return f, counts
