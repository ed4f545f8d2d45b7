"""Shipped reference weights: one safetensors file per model, with the config and log of the run that made it.

Layout: ``zoo/weights/<model>.safetensors`` and ``zoo/runs/<model>/`` (``config.yaml``, ``log.csv``,
``command.txt``, ``eval.json``).
"""
from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = ZOO_DIR / "weights"
RUNS_DIR = ZOO_DIR / "runs"


def weight_file(name: str) -> str:
    """Path of the shipped safetensors file for model ``name`` (it may not exist yet)."""
    return str(WEIGHTS_DIR / f"{name}.safetensors")


def has_weights(name: str) -> bool:
    return Path(weight_file(name)).is_file()


def require_weights(name: str) -> None:
    """Raise a clear error when a reference model has no shipped weights."""
    if not has_weights(name):
        raise FileNotFoundError(
            f"no shipped weights for '{name}' (expected {weight_file(name)}). Train them with the command in "
            f"{RUNS_DIR / name / 'command.txt'}, or create the model with pretrained=False."
        )
