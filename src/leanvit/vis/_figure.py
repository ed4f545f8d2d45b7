"""Writing matplotlib figures (headless backend, atomic: a failed or interrupted save leaves no partial file)."""
from __future__ import annotations

import io
from pathlib import Path


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` in the format its extension names, atomically; parent folders are created."""
    import matplotlib.pyplot as plt

    from ..io import atomic_write
    from ..errors import ConfigError

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format=fmt or None)
        except ValueError as e:  # unknown format
            raise ConfigError(f"cannot write plot {path}: {e}") from None
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    finally:
        plt.close(fig)
    return path
