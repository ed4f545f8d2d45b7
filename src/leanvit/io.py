"""Files in and out: atomic writes, strict JSON, and weight files read without running code.

Every output is written to a temporary file in the destination folder, flushed to disk, then renamed over the old
one (``os.replace`` is atomic on POSIX), so a run killed at any moment leaves either the previous file or the
new one, never a torn file.

Reading never unpickles arbitrary objects: a pickle can run any command when it is loaded, so torch files are read
with ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only) and a file that needs more is
refused with the reason. Safetensors files are recognised by their content, not their name.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file that is renamed over it when complete.

    The temporary file is opened with mode 0o666 and ``O_EXCL``, so the kernel applies the process umask as for
    any new file (``tempfile.mkstemp`` would create it 0600, and reading the umask means swapping it, which races
    with other threads).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - a name collision of 32 random bits
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    data = text.encode()
    atomic_write(Path(path), lambda f: f.write(data))


def to_json_safe(obj: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON (NaN and infinities as null) atomically."""
    atomic_write_text(path, json.dumps(to_json_safe(obj), indent=1, allow_nan=False) + "\n")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of a JSON header that begins with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8 and head[8:9] == b"{"


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load`` that runs no code from the file; the refusal names what the file wanted to run."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:  # a pickle that asks for code to run
            glob = next((line.split("GLOBAL", 1)[1].split()[0] for line in text.splitlines() if "GLOBAL" in line),
                        None)
            raise CheckpointError(
                f"{what} {path} was refused: it is a pickle that needs "
                f"{f'the Python object {glob}' if glob else 'Python objects beyond tensors'} to load, and loading a "
                f"pickle can run arbitrary code. Save the weights as a state dict of tensors or as safetensors "
                f"(leanvit.engine.save_weights) from a trusted copy") from None
        reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line or "load key" in line),
                      "not a torch file")
        raise CheckpointError(f"{what} {path} is not a readable torch file ({reason}); give a safetensors file, a "
                              f"leanvit checkpoint or a torch state dict") from None
    except Exception as e:  # a torn zip, garbage bytes, or a foreign file
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def save_weights(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Atomically write model weights as safetensors (shared tensors are cloned so safetensors accepts them)."""
    from safetensors.torch import save

    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    data = save(sd, metadata=metadata)
    atomic_write(Path(path), lambda f: f.write(data))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file, a leanvit checkpoint, or a plain torch state-dict file.

    The format is told by content (a ``.pth`` that holds safetensors loads too). torch files are read with
    ``weights_only=True``: a pickle that needs Python objects beyond tensors and containers is refused, because
    loading it could run code. timm-style wrappers (``{"state_dict": ...}``, ``{"model": ...}``;
    ``{"model_ema": ...}`` is not chosen implicitly) and a DDP ``module.`` prefix are handled.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"weights file {path} is corrupt ({e})") from None
    if path.suffix == ".safetensors":
        raise CheckpointError(f"weights file {path} is not a valid safetensors file (bad header)")
    obj = _torch_load(path, "weights file")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no model state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_record(path: str | os.PathLike, key: str) -> Any:
    """A record a weights file carries beside its tensors, or None: the JSON under ``key`` in a safetensors file's
    metadata (what :func:`save_weights` writes), or ``run_info[key]`` of a leanvit checkpoint; read without
    running code, like the weights themselves."""
    path = Path(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CheckpointError(f"weights file {path} records a {key} that is not JSON: {raw!r}") from None
    obj = _torch_load(path, "weights file")
    info = obj.get("run_info") if isinstance(obj, dict) else None
    return info.get(key) if isinstance(info, dict) else None


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
              strict: bool = True) -> None:
    """``model.load_state_dict`` with one readable error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if shape or (strict and (missing or unexpected)):
        parts = []
        if shape:
            parts.append("shape mismatch: " + "; ".join(shape[:5]) + (" ..." if len(shape) > 5 else ""))
        if strict and missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if strict and unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=strict)
