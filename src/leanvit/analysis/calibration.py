"""Expected calibration error (ECE) and the per-bin data of a reliability diagram.

ECE (Guo et al., ICML 2017) with equal-width confidence bins, computed by torchmetrics'
``MulticlassCalibrationError`` (L1 norm): ``sum_b |acc_b - conf_b| * n_b / n`` over bins of the top-1 confidence.
15 bins is the setting of Guo et al. and of the PEFD analysis.

The per-bin accuracy, confidence and count are computed here for the diagram with torchmetrics' binning: bin ``b``
holds the float32 top-1 confidences in ``[b / B, (b + 1) / B)``. One difference: a confidence that is exactly 1.0
in float32 (a logit gap above about 17), which torchmetrics counts in a bin of its own, is put in the last bin, so
the bins add up to the reported ECE only when no confidence rounds to 1.0 (and to within the last bin's share
of those predictions otherwise).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError

__all__ = ["CalibrationReport", "calibration"]


@dataclass
class CalibrationReport:
    """ECE and reliability-diagram data.

    Attributes:
        ece: expected calibration error in [0, 1] (torchmetrics, L1).
        n: number of predictions.
        edges: ``n_bins + 1`` bin edges from 0 to 1.
        counts: predictions per bin.
        accuracy: accuracy of each bin's predictions (0 for an empty bin).
        confidence: mean top-1 confidence of each bin's predictions (0 for an empty bin).
    """

    ece: float
    n: int
    edges: list[float]
    counts: list[int]
    accuracy: list[float]
    confidence: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def calibration(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> CalibrationReport:
    """ECE and per-bin data of a classifier's ``logits`` (n, K) against integer ``targets`` (n,).

    Raises:
        ConfigError: mismatched shapes, no predictions, or ``n_bins`` < 1.
    """
    from torchmetrics.classification import MulticlassCalibrationError

    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"the number of calibration bins must be an integer >= 1, got {n_bins!r}")
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ConfigError(f"calibration takes logits (n, K) and targets (n,) with n > 0, got shapes "
                          f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    probs = torch.softmax(logits.double(), dim=1)  # (n, K)
    targets = targets.long().to(probs.device)
    metric = MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=n_bins, norm="l1").to(probs.device)
    ece = float(metric(probs, targets))
    top, pred = probs.max(dim=1)  # (n,), (n,)
    conf = top.float()  # torchmetrics bins float32 confidences
    correct = pred.eq(targets).double()  # (n,)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=probs.device)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(max=n_bins - 1)  # (n,) bin of each prediction
    counts = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, idx, torch.ones_like(correct))
    acc_sum = torch.zeros_like(counts).index_add_(0, idx, correct)
    conf_sum = torch.zeros_like(counts).index_add_(0, idx, conf.double())
    filled = counts.clamp(min=1)
    return CalibrationReport(ece=ece, n=int(conf.numel()), edges=edges.tolist(),
                             counts=[int(c) for c in counts.tolist()], accuracy=(acc_sum / filled).tolist(),
                             confidence=(conf_sum / filled).tolist())
