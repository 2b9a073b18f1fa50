"""The SGLang backend over real HTTP, against the SGLang stand-in (tests/sglang_standin.py).

The stand-in serves the session's tiny model, so the HTTP PRM's scores can be checked against the
in-process PRM on the very same weights.  No test reaches past the stand-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from etsq.errors import ConfigError, ModelError, TransientError
from etsq.models import sglang
from etsq.models.base import ExpandRequest, SamplingParams, ScoreRequest
from etsq.models.config import ModelConfig
from etsq.models.local import LocalLikelihoodPRM, LocalPRM, load_causal_lm
from etsq.queue.broker import free_local_port, stop_local_redis
from etsq.queue.execute import run_job
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store.runs import RunSpec, create_run, load_problems
from etsq.store.session import Store, session_scope
from tests.helpers import FAST, cli, etsq, one_error_line, queued_ids, tiny_config
from tests.model_servers import start_sglang_standin
from tests.services import HttpServiceHandle
from tests.tinymodel import build_tiny_model

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
NEVER = "\x00\x07\x00"  # a delimiter no sample contains
SCORES = [
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n",)),
    ScoreRequest(QUESTION, ("3 + 4 = 7.\n\n", "The answer is: \\boxed{7}")),
    ScoreRequest(QUESTION, ("3 * 4 = 12.\n\n",)),
]


@pytest.fixture(scope="module")
def served(sglang_server: HttpServiceHandle) -> sglang.ServedModel:
    return sglang.connect(sglang_server.url)


def _requests(root: str, seed: int = 3) -> list[ExpandRequest]:
    return [
        ExpandRequest(root, 3, seed),
        ExpandRequest(root + "Step 1: 3 + 4 = 7.\n\n", 2, seed + 1),
        ExpandRequest(root, 0, 9),
    ]


def test_connect_reads_the_model_and_its_chat_template(served: sglang.ServedModel, tiny_model: Path) -> None:
    policy = sglang.SGLangPolicy(served)
    assert served.model_id == str(tiny_model) and served.details["tokenizer_path"] == str(tiny_model)
    assert (policy.info.backend, policy.info.details["template"], policy.info.details["url"]) == (
        "sglang",
        "chat",
        served.url,
    )
    root = policy.format_prompt(QUESTION)
    assert root.startswith("<s><|system|>\n") and root.endswith("<|assistant|>\n")
    assert policy.count_tokens(root) > 20


def test_expand_sends_a_node_s_children_together_and_is_seeded(served: sglang.ServedModel) -> None:
    policy = sglang.SGLangPolicy(served)
    root, params = policy.format_prompt(QUESTION), SamplingParams(1.0, 8, "\n\n")
    first = policy.expand(_requests(root), params)
    assert [len(group) for group in first] == [3, 2, 0]
    assert policy.expand(_requests(root), params) == first  # per-child sampling_seed
    assert policy.expand(_requests(root, seed=40), params) != first
    assert len({s.text for s in first[0]}) > 1  # children of one node differ
    for sample in (s for group in first for s in group):
        assert 1 <= sample.tokens <= 8 and sample.finish_reason in {"stop", "eos", "length"}
        assert sample.finish_reason != "stop" or sample.text.endswith("\n\n")
        assert sample.finish_reason != "length" or sample.tokens == 8
    stats = policy.server_stats()
    assert stats["requests"] == 15 and stats["prompt_tokens"] > 0
    assert 0 < stats["cached_prompt_tokens"] < stats["prompt_tokens"]  # siblings share the prompt
    assert policy.server_stats()["requests"] == 0  # figures are per depth: take() resets them


def test_the_monitor_sees_kv_in_use_while_a_long_step_runs(served: sglang.ServedModel) -> None:
    policy = sglang.SGLangPolicy(served)
    policy.monitor.interval_s = 0.01  # the tiny model can finish 400 tokens inside one 0.2 s poll
    root = policy.format_prompt(QUESTION)
    policy.server_stats()
    [[sample]] = policy.expand([ExpandRequest(root, 1, 1)], SamplingParams(1.0, 400, NEVER))
    stats = policy.server_stats()
    prompt = policy.count_tokens(root)
    assert sample.tokens > 50  # long enough for the sampler to catch it running
    assert prompt <= stats["kv_tokens"] <= prompt + sample.tokens
    assert 0 < stats["kv_usage"] < 1 and 0 <= stats["cache_hit_rate"] <= 1


@pytest.mark.parametrize("family", ["judge", "math-shepherd", "rlhflow"])
def test_prm_scores_match_the_in_process_prm(
    served: sglang.ServedModel, tiny_model: Path, family: str
) -> None:
    remote = sglang.SGLangPRM(served, family)
    local = LocalPRM(load_causal_lm(str(tiny_model)), family)
    assert remote.label_ids == local.label_ids
    scores = remote.score(SCORES)
    assert scores == pytest.approx(local.score(SCORES), abs=1e-4)
    assert all(0 < s < 1 for s in scores) and len(set(scores)) == len(scores)
    stats = remote.server_stats()
    assert stats["requests"] == len(SCORES) and stats["prompt_tokens"] > 0


def test_likelihood_prm_reads_the_solution_input_logprobs_like_the_in_process_prm(
    served: sglang.ServedModel, tiny_model: Path
) -> None:
    remote = sglang.SGLangLikelihoodPRM(served, "likelihood")
    local = LocalLikelihoodPRM(load_causal_lm(str(tiny_model)), "likelihood")
    remote.server_stats()
    scores = remote.score(SCORES)
    assert scores == pytest.approx(local.score(SCORES), rel=1e-3)
    assert all(0 < s < 1 for s in scores) and len(set(scores)) == len(scores)
    assert remote.server_stats()["requests"] == len(SCORES)  # one item each, in one /generate batch
    with pytest.raises(ConfigError, match="cannot read token likelihoods"):
        sglang.SGLangLikelihoodPRM(served, "likelihood", api="fork")
    with pytest.raises(ConfigError, match="reads token likelihoods"):
        sglang.SGLangPRM(served, "likelihood")


def test_a_workers_concurrent_first_jobs_share_one_connection(sglang_server: HttpServiceHandle) -> None:
    """A worker's first jobs arrive together; each used to connect (and load the server's tokenizer)
    on its own, and transformers' lazy imports from several threads at once failed some of them."""
    from concurrent.futures import ThreadPoolExecutor

    sglang._connect_pair.cache_clear()
    cfg = ModelConfig.create(
        "sglang", policy_url=sglang_server.url, prm_url=sglang_server.url, prm_family="likelihood"
    )
    settings = Settings.from_env()
    with ThreadPoolExecutor(8) as pool:
        pairs = list(pool.map(lambda _: sglang.load(cfg, settings), range(8)))
    assert all(policy is pairs[0][0] and prm is pairs[0][1] for policy, prm in pairs)
    assert isinstance(pairs[0][1], sglang.SGLangLikelihoodPRM)


def test_reference_fork_mode_scores_like_stock_logprobs(
    sglang_server: HttpServiceHandle, tiny_model: Path, tmp_path: Path
) -> None:
    # The fork predates /tokenize: token ids and counts come from the local copy of its tokenizer.
    with start_sglang_standin(tiny_model, tmp_path, "--fork", "--no-tokenize") as fork_server:
        served = sglang.connect(fork_server.url)
        fork = sglang.SGLangPRM(served, "math-shepherd", api="fork")
        stock = sglang.SGLangPRM(sglang.connect(sglang_server.url), "math-shepherd")
        assert fork.label_ids[:2] == stock.label_ids and len(fork.label_ids) == 3
        assert fork.score(SCORES) == pytest.approx(stock.score(SCORES), abs=1e-5)
        policy = sglang.SGLangPolicy(served)
        root = policy.format_prompt(QUESTION)
        assert policy.count_tokens(root) == sglang.SGLangPolicy(stock.served).count_tokens(root) > 20
        with pytest.raises(ModelError, match="no step tag"):
            sglang.SGLangPRM(served, "judge", api="fork")


def _worker_check(*args: str) -> str:
    """The one error line of a worker that refuses its servers at start (in-process: it never starts)."""
    return one_error_line(cli("worker", *args, env={"ETSQ_HTTP_RETRIES": "2"}))


def test_worker_start_names_a_server_that_is_down(tmp_path: Path) -> None:
    line = _worker_check("--backend", "sglang", "--policy-url", f"http://127.0.0.1:{free_local_port()}")
    assert line.startswith("etsq: error: cannot reach the sglang servers") and "ConnectError" in line


def test_worker_start_rejects_servers_of_the_wrong_kind(
    sglang_server: HttpServiceHandle, tmp_path: Path
) -> None:
    line = _worker_check("--backend", "openai", "--policy-url", sglang_server.url)
    assert "is not an OpenAI-compatible server" in line and "404" in line
    small = build_tiny_model(tmp_path / "small-vocab", vocab_size=270)
    with start_sglang_standin(small, tmp_path / "srv") as wrong_prm:
        line = _worker_check(
            "--backend", "sglang", "--policy-url", sglang_server.url, "--prm-url", wrong_prm.url
        )
        assert "wrong kind of PRM server" in line and "'Yes'" in line and wrong_prm.url in line


def _server_models(url: str, **extra: Any) -> ModelConfig:
    return ModelConfig.create("sglang", policy_url=url, prm_url=url, prm_family="judge", **extra)


def test_a_job_whose_server_is_down_is_retried_not_failed(db_url: str) -> None:
    spec = RunSpec("gsm8k", tiny_config(), _server_models(f"http://127.0.0.1:{free_local_port()}"), limit=1)
    run_id, _ = create_run(Store.open(db_url), spec, load_problems(Settings.from_env(), spec), ["etsq"])
    [job_id] = queued_ids(Store.open(db_url), run_id)
    settings = Settings.from_env().with_(database_url=db_url, http_retries=1)
    with pytest.raises(TransientError, match="ConnectError"):
        run_job(job_id, settings)
    with session_scope(db_url) as s:
        job = s.get_one(m.Job, job_id)
        # Released for the retry: any worker may take it again and resume its committed depths.
        assert (job.status, job.attempts, job.error) == ("queued", 1, None)


def test_ets_run_through_the_cli_stores_server_figures_for_every_depth(
    sglang_server: HttpServiceHandle, tiny_model: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    args = ["--method", "ets", "--width", "4", "--limit", "2", "--backend", "sglang",
            "--policy-url", sglang_server.url, "--max-step-tokens", str(FAST["max_step_tokens"]),
            "--max-tokens", str(FAST["max_tokens"]), "--max-depth", str(FAST["max_depth"])]  # fmt: skip
    try:
        proc = etsq("submit", "gsm8k", *args, "--wait", env={"ETSQ_HOME": str(home)})
        assert proc.returncode == 0, proc.stderr
        run_id = int(proc.stdout.strip().splitlines()[0])
        _check_server_figures(f"sqlite:///{home / 'etsq.db'}", run_id, str(tiny_model), sglang_server.url)
    finally:
        stop_local_redis(home)


def _check_server_figures(url: str, run_id: int, model: str, server: str) -> None:
    with session_scope(url) as s:
        run = s.get_one(m.Run, run_id)
        assert run.policy_model == f"sglang:{server}"
        assert run.model_info["policy"]["name"] == model and run.model_info["prm"]["backend"] == "sglang"
        jobs = s.scalars(select(m.Job).where(m.Job.run_id == run_id)).all()
        assert [j.status for j in jobs] == ["done", "done"]
        steps = s.scalars(select(m.SelectionStep).join(m.Job).where(m.Job.run_id == run_id)).all()
        for step in steps:
            assert step.kv_before is not None and step.kv_after is not None
            figures = (step.server_kv_tokens, step.server_kv_usage, step.server_cache_hit_rate,
                       step.cached_prompt_tokens, step.prompt_tokens)  # fmt: skip
            assert None not in figures, (step.job_id, step.depth, figures)
            assert 0 <= step.cached_prompt_tokens <= step.prompt_tokens
            assert (step.prompt_tokens > 0) == (step.children > 0)
        assert sum(step.cached_prompt_tokens for step in steps) > 0
        assert all(step.info.get("prm_prompt_tokens", 0) > 0 for step in steps if step.children)
