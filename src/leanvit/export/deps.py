"""The optional packages of deployment (extra ``leanvit[onnx]``): imported here, inside functions only, so that
``import leanvit`` never needs them, and a missing one is named with the command that installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

# import name -> pip name: the exporter (torch.onnx's dynamo exporter translates with onnxscript), the checker and
# ONNX Runtime with its quantization tool
PACKAGES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
INSTALL = "pip install 'leanvit[onnx]'"


def require(*names: str, what: str = "ONNX export") -> list[ModuleType]:
    """The modules ``names`` (default: all of :data:`PACKAGES`), imported; a :class:`ConfigError` naming every
    missing package and how to install them if one is not installed."""
    names = names or tuple(PACKAGES)
    modules, missing = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(PACKAGES.get(name, name))
    if missing:
        raise ConfigError(f"{what} needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, which "
                          f"{'are' if len(missing) > 1 else 'is'} not installed: {INSTALL} (or pip install "
                          f"{' '.join(missing)})")
    return modules
