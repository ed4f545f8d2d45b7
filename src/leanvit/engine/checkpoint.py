"""Training checkpoints: a dict of state dicts, counters and RNG states, written atomically (:mod:`leanvit.io`)
and read without running code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import _is_safetensors, _torch_load, atomic_write

FORMAT = "leanvit-checkpoint-v2"  # v2: RNG states stored as tensors, so the file loads with weights_only=True


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save a training checkpoint (a dict of state dicts, counters and RNG states)."""
    state = {"format": FORMAT, **state}
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a torn or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _is_safetensors(path):
        raise CheckpointError(f"{path} is a weights file (safetensors), not a leanvit training checkpoint; load it "
                              f"with --weights")
    state = _torch_load(path, "checkpoint")
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("leanvit-checkpoint"):
        raise CheckpointError(f"{path} is not a leanvit training checkpoint")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path} is a {state['format']} checkpoint; this leanvit reads {FORMAT} (start the "
                              f"run again, or resume it with the leanvit version that wrote it)")
    return state
