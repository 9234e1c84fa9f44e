#!/usr/bin/env bash
# Creates .venv with attnc and its development tools. Without a GPU it installs the CPU build of torch
# first (light, and the build these machines keep on disk); with one, pip resolves torch from the range
# in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "torch>=2.6"
    else
        "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.6"
    fi
fi
"${pip[@]}" -e ".[dev]"
