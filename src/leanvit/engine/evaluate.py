"""Evaluation loop: top-1 / top-5 / loss over a data loader, optionally keeping logits for calibration."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


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


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", amp: bool = False,
             keep_logits: bool = False, progress: bool = True, desc: str = "eval") -> EvalResult:
    """Accuracy (percent) and mean cross-entropy of ``model`` on ``loader``.

    Args:
        amp: bf16/fp16 autocast on CUDA (ignored on CPU, where fp32 is faster for these models).
        keep_logits: also return all logits and targets (for ECE, reliability diagrams).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    all_logits, all_targets = [], []
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images)
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("model produced non-finite logits during evaluation")
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        n += targets.numel()
        if keep_logits:
            all_logits.append(logits.cpu())
            all_targets.append(targets.cpu())
        bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluation loader yielded no images")
    return EvalResult(
        top1=100.0 * correct1 / n, top5=100.0 * correct5 / n, loss=loss_sum / n, n=n, seconds=seconds,
        logits=torch.cat(all_logits) if keep_logits else None,
        targets=torch.cat(all_targets) if keep_logits else None,
    )
