"""Output files and folders, checked before any work (so bad input costs no work and leaves nothing behind), and the records a run writes."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..io import atomic_write_text

def save_resolved(args: argparse.Namespace, path: Path) -> None:
    values = {k: v for k, v in vars(args).items() if k not in ("func", "config")}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=True))


# ------------------------------------------------------------------------------------------- output paths
def _writable_folder(folder: Path, flag: str, target: Path) -> None:
    """The deepest existing folder on the way to ``folder`` must be a folder we can create files in."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {target}: {existing} is a file, not a folder")
    try:  # os.access is not enough: /proc and read-only mounts pass it as root
        fd, probe = tempfile.mkstemp(prefix=".leanvit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {target}: cannot write in {existing} ({e.strerror or e})") from None


def plot_formats() -> dict[str, str]:
    """File extensions matplotlib can write (``png``, ``pdf``, ``svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return FigureCanvasBase.get_supported_filetypes()


def check_output_file(path: str | os.PathLike | None, flag: str, plot: bool = False) -> Path | None:
    """Check an output file before any work: not a folder, in a folder we can write, a plot format matplotlib
    writes. Returns the path (None stays None)."""
    if path is None:
        return None
    p = Path(path)
    if str(path).strip() == "" or p.name in ("", ".", ".."):
        raise ConfigError(f"{flag} needs a file name, got '{path}'")
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file name")
    if plot:
        fmt = p.suffix.lower().lstrip(".")
        formats = plot_formats()
        if fmt not in formats:
            raise ConfigError(f"{flag} {p}: cannot write plots as '{fmt or 'no extension'}'; use a file name ending "
                              f"in one of {', '.join('.' + f for f in sorted(formats))}")
    _writable_folder(p.parent, flag, p)
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Check an output folder before any work: not a file, and creatable / writable. For folders a run fills
    later (a run folder, a teacher cache), where a bad path would otherwise surface at the first write, after the
    work it was meant to keep."""
    p = Path(path)
    if str(path).strip() == "":
        raise ConfigError(f"{flag} needs a folder name, got '{path}'")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a folder")
    _writable_folder(p, flag, p)
    return p


# the files a training run writes in its run folder: the records of cli/train.py (config.yaml, command.txt) and
# those of leanvit.engine.Trainer (its docstring and checkpoint code). Each is written to a temporary file that is
# renamed over the name, which fails if a folder is in the way.
RUN_FILES = ("config.yaml", "command.txt", "last.pt", "log.csv", "log.json", "best.safetensors", "model.safetensors",
             "model_ema.safetensors")


def check_run_dir(path: str | os.PathLike, flag: str, files: tuple[str, ...] = RUN_FILES) -> Path:
    """Check a run folder before any work: :func:`check_output_dir`, and no folder sits where the run writes one of
    ``files`` (the rename would fail at the first checkpoint, an epoch in, or at the very end)."""
    p = check_output_dir(path, flag)
    for name in files:
        if (p / name).is_dir():
            raise ConfigError(f"{flag} {p}: {p / name} is a folder, where the run writes its {name}; remove it or "
                              f"choose another {flag}")
    return p
