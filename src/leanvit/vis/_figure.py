"""Making and writing matplotlib figures without touching matplotlib's process-wide state.

Figures are :class:`matplotlib.figure.Figure` objects drawn on a canvas of their own: never through ``pyplot`` and
never with ``matplotlib.use``, so plotting from leanvit in a notebook neither switches the user's backend nor adds
figures to pyplot's list (which would then show up, or leak, in the user's session). Saving is atomic: a failed or
interrupted save leaves no partial file.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def new_figure(**kwargs: Any):
    """A :class:`matplotlib.figure.Figure` (``figsize``, ``dpi``, ...) unknown to pyplot: ``savefig`` picks the
    canvas for the file format itself, so no backend is selected, and the figure is freed with its last
    reference (no ``plt.close`` to forget)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` in the format its extension names, atomically; parent folders are created."""
    from ..io import atomic_write
    from ..errors import ConfigError

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt or None)
    except ValueError as e:  # unknown format
        raise ConfigError(f"cannot write plot {path}: {e}") from None
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
