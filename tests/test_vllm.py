"""The OpenAI-compatible backend against a real vLLM server (CPU build) serving SmolLM2-135M-Instruct.

The server runs from its own environment (tests/model_servers.py).  The end-to-end tests use the
real CLI, a separately started Celery worker, Redis and PostgreSQL; one of them kills the vLLM
server mid-run and starts it again, and the jobs must retry and finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from etsq.db import models as m
from etsq.db.session import session_scope
from etsq.models import openai_compat as oc
from etsq.models.base import ExpandRequest, SamplingParams, ScoreRequest
from etsq.models.local import LocalPRM, load_causal_lm
from tests.helpers import cli, etsq, etsq_json, one_error_line
from tests.services import HttpServiceHandle, RedisHandle

pytestmark = pytest.mark.slow

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
# Small enough for a 2-core CPU box: a W=8 ETS problem takes well under a minute.
SHORT = ["--max-step-tokens", "32", "--max-tokens", "96", "--max-depth", "4"]


@pytest.fixture(scope="module")
def served(vllm_server: HttpServiceHandle) -> oc.ServedModel:
    return oc.connect(vllm_server.url)


def test_the_served_model_is_the_converted_smollm2(served: oc.ServedModel, smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # ensure_smollm2 strips the GGUF leftover
    assert served.model_id == str(smollm2_dir) and served.details["max_model_len"] == "2048"
    assert oc.OpenAIPolicy(served).info.details["template"] == "chat"


def test_children_of_a_node_come_from_one_seeded_request(served: oc.ServedModel) -> None:
    policy = oc.OpenAIPolicy(served)
    root = policy.format_prompt(QUESTION)
    requests = [ExpandRequest(root, 4, 1234567), ExpandRequest(root, 0, 5)]
    params = SamplingParams(1.0, 24, "\n\n")
    first = policy.expand(requests, params)
    assert [len(group) for group in first] == [4, 0]
    assert policy.expand(requests, params) == first  # the per-request seed
    assert len({s.text for s in first[0]}) > 1
    for sample in first[0]:
        assert 1 <= sample.tokens <= 24 and sample.finish_reason in {"stop", "eos", "length"}
        assert sample.finish_reason != "stop" or sample.text.endswith("\n\n")
    stats = policy.server_stats()
    assert stats["requests"] == 2 and stats["prompt_tokens"] == 2 * policy.count_tokens(
        root
    )  # one prefill each
    assert stats["cached_prompt_tokens"] is not None and stats["kv_usage"] is not None


def test_prm_prompt_logprobs_match_the_in_process_prm(served: oc.ServedModel, smollm2_dir: Path) -> None:
    requests = [
        ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n",)),
        ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n", "The answer is: \\boxed{7}")),
        ScoreRequest(QUESTION, ("3 * 4 = 12.\n\n",)),
    ]
    remote = oc.OpenAIPRM(served, "judge")
    local = LocalPRM(load_causal_lm(str(smollm2_dir)), "judge")
    assert remote.label_ids == local.label_ids
    assert remote.score(requests) == pytest.approx(local.score(requests), abs=2e-3)
    assert remote.server_stats()["requests"] == 1  # 3 texts x 2 labels in one batch


def test_an_sglang_client_refuses_the_vllm_server(vllm_server: HttpServiceHandle) -> None:
    line = one_error_line(cli("worker", "--backend", "sglang", "--policy-url", vllm_server.url))
    assert "is not an SGLang server" in line and "404" in line


# --------------------------------------------------------------------------- end to end


@contextmanager
def _worker(env: dict[str, str], log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO", *extra],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _env(pg_url: str, redis: RedisHandle, tmp_path: Path) -> dict[str, str]:
    return {
        "ETSQ_DATABASE_URL": pg_url,
        "ETSQ_BROKER_URL": redis.url,
        "ETSQ_QUEUE": f"q{tmp_path.name[-10:]}",
    }


def _wait_done(run_id: int, env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [row] = etsq_json("status", str(run_id), env=env)
        if row["status"] in ("done", "failed"):
            return dict(row)
        time.sleep(2.0)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")


def _submit(env: dict[str, str], url: str, *args: str) -> int:
    proc = etsq(
        "submit", "gsm8k", "--backend", "openai", "--policy-url", url, "--prm-url", url, *args, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def _steps(url: str, run_id: int) -> list[m.SelectionStep]:
    with session_scope(url) as s:
        return list(s.scalars(select(m.SelectionStep).join(m.Job).where(m.Job.run_id == run_id)).all())


def test_ets_width_8_against_vllm_stores_server_kv_for_every_depth(
    vllm_server: HttpServiceHandle, pg_url: str, redis_server: RedisHandle, tmp_path: Path
) -> None:
    env, log = _env(pg_url, redis_server, tmp_path), tmp_path / "worker.log"
    with _worker(env, log):
        run_id = _submit(env, vllm_server.url, "--method", "ets", "--width", "8", "--limit", "2", *SHORT)
        row = _wait_done(run_id, env, log, timeout=900)
    assert (row["problems_done"], row["problems_failed"]) == (2, 0), log.read_text()[-3000:]
    steps = _steps(pg_url, run_id)
    assert {s.job_id for s in steps} and all(
        s.kv_before is not None and s.kv_after is not None for s in steps
    )
    for step in steps:
        figures = (step.server_kv_tokens, step.server_kv_usage, step.server_cache_hit_rate,
                   step.cached_prompt_tokens, step.prompt_tokens)  # fmt: skip
        assert None not in figures, (step.depth, figures)
    expanded = [s for s in steps if s.children]
    assert all(s.prompt_tokens > 0 and s.server_kv_tokens > 0 for s in expanded)
    assert sum(s.cached_prompt_tokens for s in steps) > 0  # the prefix cache served shared prefixes
    with session_scope(pg_url) as s:
        info = s.get_one(m.Run, run_id).model_info
    assert info["policy"]["backend"] == "openai" and info["policy"]["details"]["url"] == vllm_server.url


def test_killing_vllm_mid_run_the_jobs_retry_and_finish(
    vllm_server: HttpServiceHandle, pg_url: str, redis_server: RedisHandle, tmp_path: Path
) -> None:
    env, log = _env(pg_url, redis_server, tmp_path), tmp_path / "worker.log"
    with _worker(env, log):
        run_id = _submit(env, vllm_server.url, "--method", "rebase", "--width", "4", "--limit", "2", *SHORT)
        _wait_for_a_committed_depth(pg_url, run_id, log)
        vllm_server.kill()
        time.sleep(2.0)
        vllm_server.restart()
        row = _wait_done(run_id, env, log, timeout=600)
    assert (row["problems_done"], row["problems_failed"]) == (2, 0), log.read_text()[-3000:]
    with session_scope(pg_url) as s:
        attempts = list(s.scalars(select(m.Job.attempts).where(m.Job.run_id == run_id)))
    assert max(attempts) >= 2, attempts  # a job was retried, and resumed
    by_job: dict[int, list[int]] = {}
    for step in _steps(pg_url, run_id):
        by_job.setdefault(step.job_id, []).append(step.depth)
    assert all(sorted(d) == list(range(len(d))) for d in by_job.values())  # each depth committed once
    assert "retry: Retry in" in log.read_text()  # the Celery task retried on a TransientError


def _wait_for_a_committed_depth(url: str, run_id: int, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(url) as s:
            q = select(func.count()).select_from(m.SelectionStep).join(m.Job).where(m.Job.run_id == run_id)
            if s.scalar(q):
                return
        time.sleep(0.5)
    raise AssertionError(f"no depth committed in {timeout} s:\n{log.read_text()[-3000:]}")
