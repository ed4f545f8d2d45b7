#!/usr/bin/env bash
# Create .venv in the checkout (if missing) and install leanvit with everything it needs, including the
# Fashion-MNIST Debian package where apt is available. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  if [ -f /etc/xdg/pip/constraints.txt ] && grep -q "torch<=2.14.1" /etc/xdg/pip/constraints.txt; then
    # this workplace serves these two wheels from local disk
    $PIP install -q torch==2.14.1 torchvision==0.29.1
  else
    $PIP install -q torch torchvision
  fi
fi
$PIP install -q -e ".[test,hf,clip,onnx]"

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${LEANVIT_FMNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; set LEANVIT_FMNIST to a folder with the idx files" >&2
  else
    echo "warning: no apt-get: set LEANVIT_FMNIST to a folder with the Fashion-MNIST idx files" >&2
  fi
fi
touch "$VENV/.leanvit-installed"
