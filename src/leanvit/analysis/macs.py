"""Multiply-accumulate counts of a model's forward pass, per image.

Counting convention (the one behind the "4.6 GMACs" that papers quote for DeiT-S at 224):

* counted: the ops torch's :class:`~torch.utils.flop_counter.FlopCounterMode` has formulas for, i.e. matrix
  products and convolutions: ``mm``, ``addmm`` (``nn.Linear``), ``bmm``, ``baddbmm``, ``matmul`` (which
  decomposes into those; their in-place forms too), ``convolution`` (patch embedding, conv stems) and scaled
  dot-product attention (``q @ k^T`` and ``attn @ v``, two batched matmuls per head);
* not counted: elementwise ops (adds, scaling, residuals), softmax, LayerNorm / BatchNorm, GELU, pooling, and the
  gathers / scatters / sorts that token-reduction methods add. These are small next to the matmuls and are
  left out by the papers too.

One MAC is one multiply plus one add, so MACs = FLOPs / 2 in torch's counter.

Fused attention on CPU: timm's ViTs call ``F.scaled_dot_product_attention``, which on CPU dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``. torch's counter (checked on torch 2.14) has formulas only for
the CUDA kernels (flash, efficient, cuDNN), so on CPU the attention matmuls would silently count as zero
(DeiT-S would report 4.24 instead of 4.60 GMACs). :func:`count_macs` registers torch's own SDPA formula for the CPU
kernel (and for the ``overrideable`` fused kernel of out-of-tree backends) so that fused and unfused attention
count the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError

__all__ = ["MacsReport", "count_macs", "default_input_size"]


@dataclass
class MacsReport:
    """MACs of one forward pass, per image.

    Attributes:
        macs: multiply-accumulates per image.
        by_op: MACs per image for each counted aten op (``"aten.addmm"``, ``"aten.convolution"``, ...).
        input_size: the ``(C, H, W)`` the model was run at.
    """

    macs: int
    by_op: dict[str, int] = field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None

    @property
    def gmacs(self) -> float:
        """MACs per image in billions."""
        return self.macs / 1e9

    def as_dict(self) -> dict:
        return {"macs": self.macs, "gmacs": self.gmacs, "by_op": dict(self.by_op),
                "input_size": list(self.input_size) if self.input_size else None}


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of fused attention from the q / k / v shapes (``q @ k^T`` and ``attn @ v``), as torch counts SDPA."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _baddbmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``self.baddbmm_(a, b)``: those of the batched product ``a @ b`` (the add is not counted)."""
    return flop_counter.bmm_flop(a_shape, b_shape)


def _addmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``self.addmm_(a, b)``: those of the product ``a @ b``."""
    return flop_counter.mm_flop(a_shape, b_shape)


def _sdpa_mapping() -> dict:
    """Flop formulas torch's counter does not register: the CPU fused attention kernel, and the in-place matrix
    products (``baddbmm_``, ``addmm_``: GTP's propagation and size updates run in place) with the
    formulas of their out-of-place forms."""
    aten = torch.ops.aten
    mapping = {}
    for name, formula in (("baddbmm_", _baddbmm_flop), ("addmm_", _addmm_flop)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            mapping[op] = formula
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            mapping[op] = _sdpa_cpu_flop
    return mapping


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The ``(C, H, W)`` input size of a timm model.

    Starts from the pretrained config (``timm.data.resolve_data_config``), then trusts the model's patch embedding
    where it has one: a ViT built with ``img_size=`` / ``in_chans=`` overrides keeps its pretrained config's size
    (224) even though its patch embedding only accepts the new one.
    """
    from timm.data import resolve_data_config

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its original module
    c, h, w = (int(v) for v in resolve_data_config(model=model)["input_size"])
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        img_size = getattr(pe, "img_size", None)
        if img_size is not None and not getattr(pe, "dynamic_img_size", False):
            h, w = (int(v) for v in img_size)
        chans = getattr(pe, "in_chans", None)
        if chans is None and isinstance(getattr(pe, "proj", None), nn.Conv2d):
            chans = pe.proj.in_channels
        if chans is not None:
            c = int(chans)
    return c, h, w


def _check_input_size(input_size) -> tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"input size must be (channels, height, width) with positive values, got {input_size}")
    return size


def run_checked(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, turning a shape mismatch into a :class:`ConfigError` that names the expected shape."""
    try:
        return model(x)
    except (RuntimeError, ValueError, AssertionError) as e:
        try:
            expected = default_input_size(model)
        except Exception:  # noqa: BLE001  (the hint is best effort)
            expected = None
        if expected is not None and tuple(x.shape[1:]) == tuple(expected):
            raise  # the input is what the model expects: the error is not about the input, do not say it is
        hint = (f"the model expects (B, {expected[0]}, {expected[1]}, {expected[2]})" if expected is not None
                else "check the model's input size")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{type(model).__name__} cannot run on an input of shape {tuple(x.shape)}: {hint} "
                          f"({msg})") from None


def count_macs(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
) -> MacsReport:
    """Count the multiply-accumulates of one forward pass of ``model``, per image.

    Matmuls, linear layers, convolutions and attention (including fused ``scaled_dot_product_attention`` on CPU)
    are counted; elementwise ops, softmax, norms, activations and gathers are not (see the module docstring).
    The model is run once in eval mode under ``torch.no_grad`` on random input; its training flag is restored
    afterwards. It is moved to ``device``.

    Args:
        model: any ``nn.Module`` that takes a ``(B, C, H, W)`` image batch (timm ViTs, patched or not).
        input_size: ``(C, H, W)``; default: :func:`default_input_size` (the pretrained config's, corrected by the
            patch embedding's image size and channels).
        batch_size: images in the counted batch; the result is divided by it. Models whose cost depends on the
            batch content (adaptive token reduction) may want a larger batch for an average.
        device: where to run the counting pass.

    Returns:
        A :class:`MacsReport` with MACs per image in total and per aten op.

    Raises:
        ConfigError: the input size is malformed or the model cannot run on it (wrong channels or image size).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    size = _check_input_size(default_input_size(model) if input_size is None else input_size)
    device = torch.device(device)
    model.to(device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(batch_size, *size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    # torch's counter tracks modules with autograd hooks on inputs that require grad; a parameter expanded under
    # no_grad (the latent query of timm's attention-pool head, global_pool="map") requires grad but has no grad_fn,
    # which breaks that tracking (torch 2.14). Counting needs no gradients, so parameters are frozen meanwhile.
    trainable = [p for p in model.parameters() if p.requires_grad]
    # nn.MultiheadAttention (open_clip, SigLIP's pooling head) takes its fused "fast path" in eval mode without
    # gradients, one aten op the counter has no formula for, so its attention would count as zero: counted on the
    # ordinary path, which computes the same attention from linear layers and matmuls
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        for p in trainable:
            p.requires_grad_(False)
        if mha is not None:
            mha.set_fastpath_enabled(False)
        counter = FlopCounterMode(display=False, custom_mapping=_sdpa_mapping())
        with torch.no_grad(), counter:
            run_checked(model, x)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    flops = counter.get_flop_counts().get("Global", {})
    by_op = {str(op): int(round(n / 2 / batch_size)) for op, n in flops.items() if n}
    total = int(round(counter.get_total_flops() / 2 / batch_size))
    return MacsReport(macs=total, by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])), input_size=size)
