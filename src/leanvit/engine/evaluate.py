"""Evaluation loop: top-1 / top-5 / loss over a data loader, optionally keeping logits for calibration."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..progress import track


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    n: int
    seconds: float
    logits: torch.Tensor | None = field(default=None, repr=False)
    targets: torch.Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "n": self.n,
                "images_per_s": self.n / self.seconds if self.seconds > 0 else float("nan")}


class _Tally:
    """Running top-1 / top-5 / loss of one model over the batches of an evaluation."""

    def __init__(self, keep_logits: bool):
        self.correct1 = self.correct5 = self.n = 0
        self.loss_sum = 0.0
        self.seconds = 0.0
        self.keep_logits = keep_logits
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("model produced non-finite logits during evaluation")
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices.eq(targets[:, None])
        self.correct1 += hit[:, 0].sum().item()
        self.correct5 += hit.any(dim=1).sum().item()
        self.n += targets.numel()
        if self.keep_logits:
            self.logits.append(logits.cpu())
            self.targets.append(targets.cpu())

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.n, 1)

    def result(self) -> EvalResult:
        if self.n == 0:
            raise ValueError("evaluation loader yielded no images")
        return EvalResult(
            top1=100.0 * self.correct1 / self.n, top5=100.0 * self.correct5 / self.n, loss=self.loss_sum / self.n,
            n=self.n, seconds=self.seconds, logits=torch.cat(self.logits) if self.keep_logits else None,
            targets=torch.cat(self.targets) if self.keep_logits else None)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", amp: bool = False,
             keep_logits: bool = False, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Accuracy (percent) and mean cross-entropy of ``model`` on ``loader``.

    Args:
        amp: bf16/fp16 autocast on CUDA (ignored on CPU, where fp32 is faster for these models).
        keep_logits: also return all logits and targets (for ECE, reliability diagrams).
    """
    return evaluate_many({desc: model}, loader, device, amp=amp, keep_logits=keep_logits, progress=progress,
                         desc=desc)[desc]


@torch.no_grad()  # not inference_mode: cached constants (GTP's grid graph) must stay usable in training
def evaluate_many(models: dict[str, nn.Module], loader: DataLoader, device: torch.device | str = "cpu",
                  amp: bool = False, keep_logits: bool = False, progress: bool = True,
                  desc: str = "eval") -> dict[str, EvalResult]:
    """:func:`evaluate` for several models in one pass over ``loader``: each batch is loaded (decoded,
    transformed) once and given to every model, so comparing many variants costs one data pass, not one each.

    Each model's ``seconds`` counts its own forwards only. Models run in eval mode and get their training flag back.
    """
    device = torch.device(device)
    flags = {name: m.training for name, m in models.items()}
    tallies = {name: _Tally(keep_logits) for name in models}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for m in models.values():
        m.eval()
    try:
        bar = track(loader, desc=desc, enabled=progress)
        for images, targets in bar:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            for name, m in models.items():
                t0 = time.perf_counter()
                with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    logits = m(images)
                sync()
                tallies[name].seconds += time.perf_counter() - t0
                tallies[name].add(logits, targets)
            if len(models) == 1:
                bar.set_postfix(top1=f"{next(iter(tallies.values())).top1:.2f}")
    finally:
        for name, m in models.items():
            m.train(flags[name])
    return {name: t.result() for name, t in tallies.items()}
