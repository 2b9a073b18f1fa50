"""The OpenAI-compatible backend against a real vLLM server (CPU build) serving SmolLM2-135M-Instruct.

The server runs from its own environment (tests/model_servers.py).  The end-to-end tests use the
real CLI, a separately started Celery worker, Redis and PostgreSQL; one of them kills the vLLM
server mid-run and starts it again, and the jobs must retry and finish.  A second vLLM serves a
tiny random `Qwen2ForProcessRewardModel` (tests/tinymodel.py) with its pooling runner, for the
reward-head PRM family.
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

import httpx
import pytest
from sqlalchemy import func, select

from etsq.models import openai_compat as oc
from etsq.models.base import ExpandRequest, SamplingParams, ScoreRequest
from etsq.models.local import LocalLikelihoodPRM, LocalPRM, load_causal_lm
from etsq.models.prm_families import QWEN_PRM_SEPARATOR, QWEN_PRM_SYSTEM
from etsq.models.reward_head import load_reward_prm
from etsq.store import schema as m
from etsq.store.session import session_scope
from etsq.store.trees import load_tree
from tests.helpers import cli, etsq, etsq_json, one_error_line
from tests.model_servers import start_vllm_prm
from tests.services import HttpServiceHandle, RedisHandle
from tests.tinymodel import build_tiny_prm

pytestmark = pytest.mark.slow

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
# Small enough for a 2-core CPU box: a W=8 ETS problem takes well under a minute.
SHORT = ["--max-step-tokens", "32", "--max-tokens", "96", "--max-depth", "4"]


@pytest.fixture(scope="module")
def served(vllm_server: HttpServiceHandle) -> oc.ServedModel:
    return oc.connect(vllm_server.url)


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_prm(tmp_path_factory.mktemp("models") / "tiny-qwen-prm")


@pytest.fixture(scope="module")
def vllm_prm_server(tiny_prm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServiceHandle]:
    """vLLM's pooling runner on the tiny reward-head PRM, its step rows at the tokenizer's <extra_0>."""
    from transformers import AutoTokenizer

    [separator] = AutoTokenizer.from_pretrained(tiny_prm).encode(QWEN_PRM_SEPARATOR, add_special_tokens=False)
    handle = start_vllm_prm(tiny_prm, tmp_path_factory.mktemp("vllm-prm"), separator)
    yield handle
    handle.stop()


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


SCORE_REQUESTS = [
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n",)),
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n", "The answer is: \\boxed{7}")),
    ScoreRequest(QUESTION, ("3 * 4 = 12.\n\n",)),
]


def test_prm_reads_the_labels_at_one_generated_position_like_the_in_process_prm(
    served: oc.ServedModel, smollm2_dir: Path
) -> None:
    remote = oc.OpenAIPRM(served, "judge")
    local = LocalPRM(load_causal_lm(str(smollm2_dir)), "judge")
    assert remote.api == oc.NEXT_TOKEN and remote.info.details["prm_api"] == "next-token"
    assert remote.label_ids == local.label_ids
    remote.server_stats()  # forget the start-up probe
    assert remote.score(SCORE_REQUESTS) == pytest.approx(local.score(SCORE_REQUESTS), abs=2e-3)
    assert remote.server_stats()["requests"] == len(SCORE_REQUESTS)  # one position per text


def test_the_prompt_logprob_path_scores_the_same_but_never_from_the_cache(served: oc.ServedModel) -> None:
    remote = oc.OpenAIPRM(served, "judge")
    expected = remote.score(SCORE_REQUESTS)
    remote.api = oc.PROMPT_LOGPROBS  # what a server without vLLM's logprob_token_ids gets
    remote.server_stats()
    assert remote.score(SCORE_REQUESTS) == pytest.approx(expected, abs=2e-3)
    stats = remote.server_stats()
    assert stats["requests"] == 1 and stats["prompt_tokens"] > 0 and stats["cached_prompt_tokens"] == 0


def test_likelihood_prm_reads_prompt_logprobs_like_the_in_process_prm(
    served: oc.ServedModel, smollm2_dir: Path
) -> None:
    remote = oc.make_prm(served, "likelihood")
    local = LocalLikelihoodPRM(load_causal_lm(str(smollm2_dir)), "likelihood")
    assert isinstance(remote, oc.LikelihoodPRM) and remote.info.details["prm_api"] == oc.PROMPT_LOGPROBS
    remote.server_stats()
    scores = remote.score(SCORE_REQUESTS)
    assert scores == pytest.approx(local.score(SCORE_REQUESTS), rel=2e-2)
    assert all(0 < s < 1 for s in scores)
    assert remote.server_stats()["requests"] == 1  # one batch


def test_likelihood_prm_sends_texts_that_score_as_their_token_ids_with_one_tokenize_per_prompt(
    served: oc.ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server tokenizes the texts it scores exactly as /tokenize does (the same scores), so a
    scored text costs no /tokenize of its own: one per problem prompt, none for the texts."""
    import etsq.models.remote as remote_module

    remote = oc.make_prm(served, "likelihood")
    calls: list[str] = []
    real = remote_module.tokenize

    async def counted(model: oc.ServedModel, text: str, special: bool) -> list[int]:
        calls.append(text)
        return await real(model, text, special)

    monkeypatch.setattr(remote_module, "tokenize", counted)
    requests = [ScoreRequest("Q: 12 + 30?", (f"Step {i}: {12 + i} + 30 = {42 + i}.",)) for i in range(4)]
    by_text = remote.score(requests)
    assert len(calls) == 1  # the shared prompt, once
    remote.sends_text = False
    by_ids = remote.score(requests)
    assert len(calls) == 1 + len(requests)  # one per text (the prompt's length is cached)
    assert by_text == pytest.approx(by_ids, abs=1e-6)


def test_prm_requests_read_the_policys_cached_prefix(served: oc.ServedModel) -> None:
    # A question long enough that the policy's prompt fills a whole 128-token KV block by itself.
    question = " ".join([QUESTION] * 8)
    policy, prm = oc.OpenAIPolicy(served), oc.OpenAIPRM(served, "judge")
    root = policy.format_prompt(question)
    assert policy.count_tokens(root) > 128
    [children] = policy.expand([ExpandRequest(root, 3, 77)], SamplingParams(1.0, 24, "\n\n"))
    prm.server_stats()
    prm.score([ScoreRequest(question, (child.text,)) for child in children])
    stats = prm.server_stats()
    # Each judge text starts with the policy's prompt verbatim, so its first block is a cache hit.
    assert stats["cached_prompt_tokens"] >= 128 * len(children), stats
    assert stats["prompt_tokens"] > stats["cached_prompt_tokens"]


# --------------------------------------------------------------------------- reward-head PRM


def _model_card_text(tokenizer: Any, question: str, steps: list[str]) -> str:
    """Qwen2.5-Math-PRM's input as its model card builds it, cut after the newest step's <extra_0>."""
    messages = [
        {"role": "system", "content": QWEN_PRM_SYSTEM},
        {"role": "user", "content": question},
        {
            "role": "assistant",
            "content": QWEN_PRM_SEPARATOR.join(s.strip() for s in steps) + QWEN_PRM_SEPARATOR,
        },
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return str(text[: text.rindex(QWEN_PRM_SEPARATOR) + len(QWEN_PRM_SEPARATOR)])


def _direct_pooling(url: str, texts: list[str]) -> list[float]:
    """p(label 1) at the last step row, from vLLM's own softmax (use_activation) over /pooling."""
    body = {"input": texts, "task": "token_classify", "add_special_tokens": False}
    out = httpx.post(f"{url}/pooling", json=body, timeout=120).json()
    return [float(item["data"][-1][1]) for item in sorted(out["data"], key=lambda i: i["index"])]


def test_pooling_prm_matches_the_in_process_model_and_a_direct_request(
    vllm_prm_server: HttpServiceHandle, tiny_prm: Path
) -> None:
    remote = oc.make_prm(oc.connect(vllm_prm_server.url), "qwen-prm")
    assert isinstance(remote, oc.PoolingPRM) and remote.info.details["prm_api"] == "pooling"
    local = load_reward_prm(str(tiny_prm), "qwen-prm")
    scores = remote.score(SCORE_REQUESTS)
    assert scores == pytest.approx(local.score(SCORE_REQUESTS), abs=2e-3)
    texts = [_model_card_text(local.loaded.tokenizer, r.question, list(r.steps)) for r in SCORE_REQUESTS]
    assert scores == pytest.approx(_direct_pooling(vllm_prm_server.url, texts), abs=1e-5)
    assert len({round(x, 4) for x in scores}) == len(scores)  # the head has opinions


def test_a_server_without_a_reward_head_is_refused_at_the_check(
    vllm_server: HttpServiceHandle, vllm_prm_server: HttpServiceHandle
) -> None:
    # SmolLM2 is a generation model: its tokenizer has no <extra_0>, and it has no pooling head.
    line = one_error_line(
        cli("worker", "--backend", "openai", "--policy-url", vllm_server.url, "--prm-family", "qwen-prm")
    )
    assert vllm_server.url in line and "'<extra_0>'" in line, line
    # The other way round: a pooling-only server cannot answer a token family's completion request.
    args = ("--backend", "openai", "--policy-url", vllm_server.url, "--prm-url", vllm_prm_server.url)
    line = one_error_line(cli("worker", *args))
    assert "cannot score PRM family 'judge'" in line and "404" in line, line


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


def test_ets_with_a_reward_head_prm_on_vllm_scores_every_node(
    vllm_server: HttpServiceHandle,
    vllm_prm_server: HttpServiceHandle,
    tiny_prm: Path,
    pg_url: str,
    redis_server: RedisHandle,
    tmp_path: Path,
) -> None:
    env, log = _env(pg_url, redis_server, tmp_path), tmp_path / "worker.log"
    args = ["--method", "ets", "--width", "4", "--limit", "1", "--prm-family", "qwen-prm", *SHORT]
    with _worker(env, log):
        proc = etsq(
            "submit", "gsm8k", "--backend", "openai", "--policy-url", vllm_server.url,
            "--prm-url", vllm_prm_server.url, *args, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        row = _wait_done(int(proc.stdout.strip()), env, log, timeout=900)
    assert (row["problems_done"], row["problems_failed"]) == (1, 0), log.read_text()[-3000:]
    with session_scope(pg_url) as s:
        job = s.scalars(select(m.Job).where(m.Job.run_id == row["run_id"])).one()
        tree, _ = load_tree(s, job.id)  # type: ignore[misc]
        info = s.get_one(m.Run, row["run_id"]).model_info
        question = job.problem.question
    assert info["prm"]["details"]["prm_api"] == "pooling" and info["prm"]["details"]["family"] == "qwen-prm"
    nodes = tree.nodes[1:]
    assert len(nodes) >= 4 and all(n.score is not None for n in nodes)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_prm)
    texts = [_model_card_text(tokenizer, question, tree.steps(n.idx)) for n in nodes]
    assert [n.score for n in nodes] == pytest.approx(_direct_pooling(vllm_prm_server.url, texts), abs=1e-5)


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
