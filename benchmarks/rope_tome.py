"""RoPE: where ToMe's merged token sits (issue 28, item 3; facebookresearch/ToMe issue 29).

On a rotary-attention ViT a merged token needs a position for its rotation. leanvit keeps the destination's
(:mod:`leanvit.reduce.adapters.eva`); this script measures that rule against the alternatives:

* ``destination`` (leanvit's rule): the merged token keeps the grid position of the token it was merged into;
* ``centroid``: the size-weighted mean of the grid coordinates of every patch the token stands for, rotated
  exactly at that fractional position (timm's RoPE angles are ``coordinate x frequency``, linear in the
  coordinate, so the rotary rows of any real-valued position are computed here the way timm computes the grid's);
* ``none``: a token that stands for more than one patch is not rotated (as prefix tokens are not);
* ``sequence`` (a reference, not a candidate): every token rotated by its place in the current sequence, which is
  what a patch that does not track positions would do (timm's rows in order, cut to the token count).

The alternatives live here only (reducer subclasses and an attention view installed for the run); the library
implements the destination rule. A rule that matters needs trained weights: no hub here, so an EVA-02-style model
(RoPE only, no absolute position embedding: rotation is its only position signal) is trained on Fashion-MNIST at
28x28 with 4x4 patches (a 7x7 grid) on the CPU, then ToMe runs at several ``r`` with each rule on the 10,000 test
images. Differences are paired (the same images): the table gives each alternative's images gained and lost
against the destination rule and a sign-test z ((gained - lost) / sqrt(gained + lost); |z| < 2 is noise).

    python benchmarks/rope_tome.py --threads 1              # trains first (about 15 minutes) unless weights exist
    python benchmarks/rope_tome.py --threads 1 --retrain    # train again, overwrite the weights

The weights (about 1 MB) are written to ``benchmarks/results/rope_tome_eva.pt`` and reused by later runs.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models.eva import Eva
from torch.utils.data import DataLoader

import leanvit
from leanvit.analysis.macs import count_macs
from leanvit.data.fashion_mnist import FashionMNIST
from leanvit.reduce import get_reducer
from leanvit.reduce.adapters import eva as eva_adapter
from leanvit.reduce.tome import ToMeReducer

from common import RESULTS, add_threads, parse_args, table, today, write

WEIGHTS = RESULTS / "rope_tome_eva.pt"
# EVA-02-style (RoPE 'cat' with a reference grid, SwiGLU, cls token, average pooling), without the absolute position
# embedding: the rotation is the only position signal, so where a merged token is rotated matters most
CONFIG = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
              mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, use_abs_pos_emb=False, ref_feat_shape=(7, 7),
              global_pool="avg")
RULES = ("destination", "centroid", "none", "sequence")


# ----------------------------------------------------------------------------------------------- position rules
class CentroidToMe(ToMeReducer):
    """ToMe whose tokens also carry the size-weighted centroid of their patches' grid coordinates (``coords``,
    ``(B, n, 2)`` row and column, float64), read by :class:`CentroidView`."""

    coords: torch.Tensor | None = None

    def begin(self, x: torch.Tensor) -> None:
        super().begin(x)
        self.coords = None
        self.partner_distances: list[torch.Tensor] = []  # per merge: grid distance between the two tokens' centroids

    def _moved(self, x: torch.Tensor, sources: torch.Tensor, dests: torch.Tensor) -> None:
        super()._moved(x, sources, dests)
        P, B = self.info.num_prefix, x.shape[0]
        n, m = dests.shape[1], sources.shape[1]
        coords = self.coords if self.coords is not None else grid_coords(self.info.grid, x.device).expand(B, -1, -1)
        # the tokens merged away (not continued by any token) and the token each went into, as tokens before
        away = torch.ones(B, n, dtype=torch.bool, device=x.device).scatter_(1, sources, False)  # (B, n)
        into = sources.gather(1, dests)  # (B, n) the before-index of the token each one's features went to
        gap = (coords - coords.gather(1, into[..., None].expand(-1, -1, 2))).norm(dim=-1)  # (B, n)
        self.partner_distances.append(gap[away])
        size = self._sizes_or_ones(x)[:, P:].to(torch.float64)  # (B, n) sizes before this merge
        mass = size.new_zeros(B, m).scatter_add_(1, dests, size)  # (B, m): every ToMe token has a destination
        total = coords.new_zeros(B, m, 2).scatter_add_(1, dests[..., None].expand(-1, -1, 2), coords * size[..., None])
        self.coords = total / mass[..., None]  # (B, m, 2)


class NoRotationToMe(ToMeReducer):
    """ToMe whose merged tokens (more than one patch) have no position: not rotated."""

    def _moved(self, x: torch.Tensor, sources: torch.Tensor, dests: torch.Tensor) -> None:
        P, B = self.info.num_prefix, x.shape[0]
        size = self._sizes_or_ones(x)[:, P:]  # (B, n) before this merge
        super()._moved(x, sources, dests)
        mass = size.new_zeros(B, sources.shape[1]).scatter_add_(1, dests, size)  # (B, m)
        img = torch.where(mass > 1, self.info.num_image, self._positions[:, P:])
        self._positions = torch.cat([self._positions[:, :P], img], dim=1)


class SequenceToMe(ToMeReducer):
    """ToMe whose tokens are rotated by their place in the current sequence (positions not tracked)."""

    def _moved(self, x: torch.Tensor, sources: torch.Tensor, dests: torch.Tensor) -> None:
        super()._moved(x, sources, dests)
        P, B, m = self.info.num_prefix, x.shape[0], sources.shape[1]
        self._positions = torch.cat([self._positions[:, :P], torch.arange(m, device=x.device).expand(B, m)], dim=1)


REDUCERS = {"destination": ToMeReducer, "centroid": CentroidToMe, "none": NoRotationToMe, "sequence": SequenceToMe}


def grid_coords(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``(1, H * W, 2)`` the (row, column) of every grid position, row-major, float64."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows, cols], -1).reshape(1, -1, 2).to(device, torch.float64)


def coordinate_rows(rope: RotaryEmbeddingCat, coords: torch.Tensor) -> torch.Tensor:
    """timm's rotary rows ``(..., D)`` (concatenated sin and cos) at real-valued grid coordinates ``(..., 2)``: the
    angle of each band is the (offset, reference-rescaled) coordinate times the band's frequency, as
    ``timm.layers.pos_embed_sincos.build_fourier_pos_embed`` computes it for the integer grid (float32 like timm)."""
    if rope.grid_type != "index" or rope.grid_indexing != "ij":
        raise SystemExit("the centroid rule here supports timm's 'index' grid in 'ij' order only")
    feat = torch.tensor(rope.feat_shape, dtype=torch.float32, device=coords.device)
    ref = torch.tensor(rope.ref_feat_shape or rope.feat_shape, dtype=torch.float32, device=coords.device)
    t = (coords.float() + rope.grid_offset) / feat * ref  # (..., 2)
    angles = (t[..., None] * rope.bands).flatten(-2)  # (..., 2 * bands): rows' bands, then columns'
    angles = torch.cat([angles, angles], -1) if rope.rotate_half else angles.repeat_interleave(2, -1)
    return torch.cat([angles.sin(), angles.cos()], -1)


class CentroidView(eva_adapter.RotaryAttentionView):
    """The adapter's rotary view, rotating image tokens at their centroids (``CentroidToMe.coords``)."""

    def __init__(self, attn, reducer, rope, module: RotaryEmbeddingCat):
        super().__init__(attn, reducer, rope)
        self.rope_module = module

    def rotate(self, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        coords = getattr(self.reducer, "coords", None)
        if coords is None:  # nothing merged yet
            return super().rotate(t, index)
        B, P = t.shape[0], self.num_prefix
        img = coordinate_rows(self.rope_module, coords).to(t.dtype)  # (B, n, D)
        D = img.shape[-1]
        identity = torch.cat([img.new_zeros(D // 2), img.new_ones(D // 2)]).expand(B, P, D)
        rows = torch.cat([identity, img], dim=1)  # (B, P + n, D)
        if index is not None:
            rows = rows.gather(1, index[..., None].expand(-1, -1, D))
        return apply_rot_embed_cat(t, rows[:, None], half=self.half)


@contextlib.contextmanager
def rule(model: Eva, name: str, r: int):
    """``model`` patched with ToMe at ``r`` whose merged tokens follow position rule ``name``."""
    leanvit.patch(model, "tome", r=r)
    get_reducer(model).__class__ = REDUCERS[name]
    make_view = eva_adapter.attention_view
    if name == "centroid":
        eva_adapter.attention_view = lambda attn, red, rope: (
            make_view(attn, red, rope) if rope is None else CentroidView(attn, red, rope, model.rope))
    try:
        yield model
    finally:
        eva_adapter.attention_view = make_view
        leanvit.unpatch(model)


# ----------------------------------------------------------------------------------------------- train, evaluate
def train(model: Eva, epochs: int, batch: int, lr: float) -> float:
    """AdamW, linear warm-up then cosine, label smoothing 0.1, the repo's Fashion-MNIST augmentation (shift by up to
    2 pixels, horizontal flip) on the 55,000 training images; returns the wall time in seconds."""
    data = DataLoader(FashionMNIST(split="train", train_aug=True), batch_size=batch, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))
    steps = epochs * len(data)
    warm = min(200, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    model.train()
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        for x, y in data:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def merge_distances(model: Eva, images: int = 1000) -> torch.Tensor:
    """The grid distances between merged partners' centroids over every merge, on the first ``images`` test
    images (``model`` patched with :class:`CentroidToMe`)."""
    x = torch.stack([FashionMNIST(split="test", limit=images)[i][0] for i in range(images)])
    model(x)
    return torch.cat(get_reducer(model).partner_distances)


@torch.no_grad()
def predictions(model: Eva, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels of the 10,000 test images."""
    preds, labels = [], []
    for x, y in DataLoader(FashionMNIST(split="test"), batch_size=batch):
        preds.append(model(x).argmax(-1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8], help="ToMe's r per block")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--retrain", action="store_true", help="train even if the weights exist")
    p.add_argument("--name", default="rope_tome")
    add_threads(p, default=1)
    args = parse_args(p)

    torch.manual_seed(0)
    model = Eva(**CONFIG).eval()
    # the coordinate rows reproduce timm's table at the integer grid positions
    grid_rows = coordinate_rows(model.rope, grid_coords(model.patch_embed.grid_size, torch.device("cpu")))[0]
    assert torch.allclose(grid_rows, model.rope.get_embed(), atol=1e-6), "coordinate_rows does not match timm"
    if WEIGHTS.is_file() and not args.retrain:
        saved = torch.load(WEIGHTS, map_location="cpu")
        model.load_state_dict(saved["model"])
        trained = saved["trained"]
        print(f"loaded {WEIGHTS} (trained {trained})")
    else:
        seconds = train(model, args.epochs, args.batch, args.lr)
        trained = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seconds": round(seconds, 1),
                   "threads": torch.get_num_threads(), "date": today()}
        torch.save({"model": model.state_dict(), "trained": trained}, WEIGHTS)
        print(f"trained in {seconds / 60:.1f} min, saved {WEIGHTS}")

    dense_macs = count_macs(model, (1, 28, 28)).macs
    start = time.perf_counter()
    pred, labels = predictions(model)
    dense_acc = (pred == labels).float().mean().item() * 100
    rows, results = [], {"dense": {"top1": dense_acc, "macs": dense_macs}, "r": {}}
    for r in args.r:
        correct, out = {}, {}
        for name in RULES:
            with rule(model, name, r):
                macs = count_macs(model, (1, 28, 28)).macs
                pred, _ = predictions(model)
                if name == "centroid":
                    gaps = merge_distances(model)
            correct[name] = pred == labels
            out[name] = {"top1": correct[name].float().mean().item() * 100}
            print(f"r={r} {name}: {out[name]['top1']:.2f}%", flush=True)
        base = correct["destination"]
        for name in RULES[1:]:
            gained = int((correct[name] & ~base).sum())
            lost = int((base & ~correct[name]).sum())
            z = (gained - lost) / math.sqrt(gained + lost) if gained + lost else 0.0
            out[name].update(gained=gained, lost=lost, z=z)
        neighbours = (gaps < 1.5).float().mean().item()  # merged into one of the 8 grid neighbours (or its group)
        results["r"][r] = {"macs_fraction": macs / dense_macs, "rules": out, "merge_distance": gaps.mean().item(),
                           "merges_between_neighbours": neighbours}
        rows.append([r, f"{macs / dense_macs:.2f}", f"{gaps.mean().item():.2f} ({neighbours:.0%})",
                     *(f"{out[n]['top1']:.2f}" for n in RULES),
                     *(f"{out[n]['gained']}/{out[n]['lost']} ({out[n]['z']:+.1f})" for n in RULES[1:])])
    evaluation = time.perf_counter() - start
    header = ["r", "MACs", "merge distance (neighbours)", *RULES, *(f"{n}: gained/lost (z)" for n in RULES[1:])]
    lines = table(header, rows)
    trained_phrase = (f"trained by this script for {trained['epochs']} epochs at batch {trained['batch']} in "
                      f"{trained['seconds'] / 60:.1f} min at {trained.get('threads', 1)} thread(s), weights "
                      f"`benchmarks/results/{WEIGHTS.name}`")
    md = (f"EVA-02-style Eva (RoPE only, width 64, depth 6, 4 heads, 7x7 grid of 4x4 patches, cls token, average "
          f"pooling; {trained_phrase}), Fashion-MNIST test set (10,000 images), dense top-1 {dense_acc:.2f}%. "
          f"ToMe (proportional attention, size-weighted pooling) at each r with each position rule for merged "
          f"tokens; MACs as a fraction of the dense model's. Merge distance: the mean grid distance (in patches) "
          f"between the centroids of two tokens ToMe merges, over every merge of the forward on the first 1,000 "
          f"test images (in parentheses the share under 1.5, i.e. grid neighbours). Gained/lost: test images that "
          f"the rule classifies right and the destination rule wrong, and the reverse; z the paired sign test. "
          f"Evaluation took {evaluation / 60:.1f} min.\n\n" + "\n".join(lines))
    write(args.name, {"config": CONFIG, "trained": trained, "results": results}, md)


if __name__ == "__main__":
    main()
