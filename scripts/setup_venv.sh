#!/usr/bin/env bash
# Create the project's virtual environment (default .venv) and install lung_tumor_seg into it.
# Writes nothing outside the project folder and its virtual environment.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
command -v "$py" >/dev/null 2>&1 || { echo "error: $py not found: install Python 3.10 or newer (or set PYTHON=/path/to/python3)" >&2; exit 1; }
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
  echo "error: $("$py" --version 2>&1) is not supported: lung_tumor_seg needs Python 3.10 or newer (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
"$py" -c 'import venv, ensurepip' 2>/dev/null || { echo "error: $py lacks venv/ensurepip: install your distribution's python3-venv package" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true
# A plain `torch` requirement pulls a CUDA build of several GB. Install torch first:
# a GPU machine gets the default (CUDA) build, a CPU-only machine the CPU build
# (a locally provided wheel if pip finds one, else the PyTorch CPU index).
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    $pip install -q torch
  else
    echo "setup: no GPU found, installing a CPU build of torch"
    # A CPU wheel that pip finds locally (its find-links) is taken first, then its dependencies from the index;
    # elsewhere the CPU build comes from the PyTorch CPU index, its dependencies from PyPI.
    if $pip install -q --no-deps --no-index torch==2.13.0 2>/dev/null; then
      $pip install -q torch==2.13.0
    else
      $pip install -q torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
  fi
fi
$pip install -q -e ".[dev]"
echo "setup: ready ($("$venv/bin/python" -c 'import torch, lung_tumor_seg as l; print(f"lung_tumor_seg {l.__version__}, torch {torch.__version__}")'))"
