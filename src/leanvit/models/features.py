"""Features of any timm classifier, read through timm's own interfaces, with forward hooks as the fallback.

* :func:`pooled_features`: the pre-logits features (what the classifier reads) and the logits, from
  ``forward_features`` + ``forward_head(pre_logits=True)``; PEFD distils these (the authors take the pooled
  feature before the final fully connected layer).
* :func:`block_features`: one pooled feature per block or stage from ``forward_intermediates`` (per-block CKA).

A model without these methods is read with forward hooks: the input of its classifier (``get_classifier()``, or
else its last ``nn.Linear``) and the outputs of the children of its ``blocks`` / ``stages`` / ``layers``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError

_BLOCK_CONTAINERS = ("blocks", "stages", "layers")


def pooled_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (B, D), logits (B, K))`` of ``model`` on ``images``, in one forward pass."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        f = model.forward_features(images)
        return model.forward_head(f, pre_logits=True), model.forward_head(f)
    head = _classifier(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return captured[-1].flatten(1), logits


def block_features(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(per-block features, features, logits)`` of ``model`` on ``images``, in one forward pass.

    Each block's output is averaged over its tokens or spatial positions into ``(B, C_i)``. Through
    ``forward_intermediates`` a ViT's prefix tokens (cls, registers) are left out of the average (timm drops them);
    through the hook fallback a ``(B, N, C)`` output is averaged over all ``N`` tokens.
    """
    if hasattr(model, "forward_intermediates") and hasattr(model, "forward_head"):
        try:
            final, inter = model.forward_intermediates(images)
        except NotImplementedError:
            pass
        else:
            pooled = [_pool(t) for t in inter]
            return pooled, model.forward_head(final, pre_logits=True), model.forward_head(final)
    container = next((getattr(model, n) for n in _BLOCK_CONTAINERS
                      if isinstance(getattr(model, n, None), (nn.Sequential, nn.ModuleList))), None)
    if container is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no forward_intermediates and no "
                                    f"{' / '.join(_BLOCK_CONTAINERS)} container to hook for per-block features")
    outputs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda _m, _in, out: outputs.append(out[0] if isinstance(out, tuple)
                                                                             else out))
               for blk in container]
    try:
        features, logits = pooled_features(model, images)
    finally:
        for h in handles:
            h.remove()
    return [_pool(t) for t in outputs], features, logits


@torch.no_grad()
def probe_widths(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> tuple[int, int]:
    """``(feature width, number of logits)`` of ``model`` from a dry forward pass of two blank images in eval mode.

    A dry pass rather than ``num_features``: timm's ``num_features`` is the backbone width, which differs from the
    pre-logits width when a model has a pre-logits projection (``head_hidden_size``), and models read through the
    hook fallback have neither attribute.
    """
    from ..analysis.macs import default_input_size

    size = input_size or default_input_size(model)
    param = next(model.parameters(), None)
    x = torch.zeros(2, *size, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        features, logits = pooled_features(model, x)
    finally:
        model.train(was_training)
    return features.shape[-1], logits.shape[-1]


def _classifier(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnsupportedModelError(f"{type(model).__name__} has no forward_head, get_classifier or nn.Linear "
                                    f"classifier to read its features from")
    return linears[-1]


def _pool(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> mean over H, W; ``(B, N, C)`` -> mean over N; ``(B, C)`` unchanged."""
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.flatten(1)
