#!/usr/bin/env bash
# Creates .venv with attnc (editable) and its development tools. torch comes first: without a GPU its
# CPU build (light), from a wheel on disk where pip's find-links hold one (these machines keep
# torch 2.13.0+cpu), else from the PyTorch CPU index, else whatever pip resolves; with a GPU, pip resolves
# it from the range in pyproject.toml (the CUDA build, which brings Triton). attnc's own requirement is a
# range, never a build: see docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "torch>=2.10"
    else
        "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
            || "${pip[@]}" "torch>=2.10" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
            || "${pip[@]}" "torch>=2.10"
    fi
fi
# The transformers extra too, so that the tests of attnc.integrations.transformers run (about 25 s, 190 MB).
"${pip[@]}" -e ".[dev,transformers]"
