"""Shared fixtures: tiny Fashion-MNIST idx files generated on the fly, one torch thread, in-process CLI runs."""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from leanvit.engine import StepContext
from leanvit.ops.graph import build_graph
from leanvit.ops.select import attention_score, split_topk

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


# ------------------------------------------------------------------ tiny timm ViTs (token-reduction tests)
# name -> (timm architecture, overrides); all at img_size 64 (4x4 grid) and depth 2 unless given
VARIANTS = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_layerscale": ("vit_small_patch16_224", dict(reg_tokens=4, init_values=0.1)),
    "no_cls_avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "qk_norm": ("vit_tiny_patch16_224", dict(qk_norm=True)),
    "no_embed_class_pre_norm": ("vit_tiny_patch16_224", dict(no_embed_class=True, pre_norm=True)),
}


def make(variant: str = "deit", img_size: int = 64, depth: int = 2, **kw) -> nn.Module:
    arch, over = VARIANTS[variant]
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=img_size, depth=depth, num_classes=10, **over)
    args.update(kw)
    return timm.create_model(arch, **args).eval()


def image(img_size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g)


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@torch.no_grad()
def gtp_reference(model, x, sched, alpha, prop_attn, graph="mixed", k=8, score="mixed"):
    """GTP written out from the paper with the ops functions, batch element by batch element."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    B = x.shape[0]
    G = build_graph(x[:, P:], model.patch_embed.grid_size, graph, k)  # over the original image tokens
    pos = [list(range(x.shape[1] - P)) for _ in range(B)]  # original index of every current image token
    size = torch.ones(B, x.shape[1])
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        N = h.shape[1]
        qkv = a.qkv(h).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv.unbind(0)
        q, kk = a.q_norm(q), a.k_norm(kk)
        logits = (q * a.scale) @ kk.transpose(-2, -1)
        if prop_attn:
            logits = logits + size.log()[:, None, None, :]
        probs = logits.softmax(-1)
        out = a.proj((probs @ v).transpose(1, 2).reshape(B, N, -1))
        x = x + blk.ls1(out)
        r = sched[i]
        if r:
            kept, removed = split_topk(attention_score(probs, P, score), r)
            xs, ss, new_pos = [], [], []
            for b in range(B):
                kb, rb = kept[b].tolist(), removed[b].tolist()
                img, s = x[b, P:], size[b, P:]
                w = G[b][[pos[b][j] for j in kb]][:, [pos[b][j] for j in rb]]  # (K, r)
                xs.append(torch.cat([x[b, :P], img[kb] + alpha * w @ img[rb]]))
                ss.append(torch.cat([size[b, :P], s[kb] + alpha * w @ s[rb]]) if prop_attn else size[b, :P + len(kb)])
                new_pos.append([pos[b][j] for j in kb])
            x, size, pos = torch.stack(xs), torch.stack(ss), new_pos
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg":
        w = size[:, P:, None] if prop_attn else torch.ones_like(size[:, P:, None])
        pooled = (x[:, P:] * w).sum(1) / w.sum(1)
    else:
        pooled = x[:, 0]
    return model.head(model.fc_norm(pooled))


# ------------------------------------------------------------------ loss terms
class FixedTeacher(nn.Module):
    """A 'teacher' whose pre-logits features and logits are given tensors (timm's forward_features/forward_head)."""

    def __init__(self, features: torch.Tensor, logits: torch.Tensor):
        super().__init__()
        self.features, self.logits = features, logits

    def forward_features(self, images):
        return self.features

    def forward_head(self, f, pre_logits=False):
        return f if pre_logits else self.logits


def step_context(logits, features=None, t_features=None, t_logits=None) -> StepContext:
    b = logits.shape[0]
    teacher = FixedTeacher(t_features if t_features is not None else torch.zeros(b, 1),
                           t_logits if t_logits is not None else torch.zeros_like(logits))
    return StepContext(nn.Identity(), torch.zeros(b, 1, 4, 4), torch.zeros(b, dtype=torch.long), logits, features,
                       teacher)


# ------------------------------------------------------------------ which attention building blocks ran
@pytest.fixture
def attention_calls(monkeypatch):
    """Counts of the attention building blocks (and GTP's fused score pass) called since the fixture started:
    ``{"fused": n, "explicit": n, "cls_row": n, "fused_score": n}``."""
    from leanvit.reduce import attention, gtp

    counts = {"fused": 0, "explicit": 0, "cls_row": 0, "fused_score": 0}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("fused", "explicit", "cls_row"):
        counting(attention, name)
    counting(gtp, "fused_score")
    return counts
