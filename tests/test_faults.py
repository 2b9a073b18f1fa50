"""Sweeps that survive faults: real Postgres, Redis and worker processes, bounded in time.

The `sim` backend stands in for the model servers here so that each run takes seconds; the
search, ILP, clustering, queue and database are all the real ones.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from etsq.store import schema as m
from etsq.store.session import session_scope
from tests.helpers import etsq, etsq_json
from tests.services import RedisHandle, start_redis

pytestmark = pytest.mark.slow

FAST_FAULTS = {"ETSQ_HEARTBEAT_S": "0.3", "ETSQ_STALE_AFTER_S": "3", "ETSQ_JANITOR_S": "1"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisHandle]:
    handle = start_redis(tmp_path / "redis")
    yield handle
    handle.stop()


@pytest.fixture
def env(pg_url: str, own_redis: RedisHandle) -> dict[str, str]:
    return {"ETSQ_DATABASE_URL": pg_url, "ETSQ_BROKER_URL": own_redis.url, **FAST_FAULTS}


class Workers:
    """Worker processes started by a test, killed at its end whatever happened."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []  # type: list[subprocess.Popen[bytes]]

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"worker{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO", *args],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def tail(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.logs.glob("worker*.log")))


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()


def wait_for(what: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def submit(env: dict[str, str], *args: str) -> int:
    proc = etsq("submit", "gsm8k", "--backend", "sim", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def jobs_of(url: str, run_id: int) -> list[m.Job]:
    with session_scope(url) as s:
        return list(s.scalars(select(m.Job).where(m.Job.run_id == run_id).order_by(m.Job.id)))


def run_done(url: str, run_id: int) -> bool:
    return all(j.status.finished for j in jobs_of(url, run_id))


def node_ids(url: str, job_id: int) -> dict[str, int]:
    with session_scope(url) as s:
        return {
            path: node_id
            for path, node_id in s.execute(select(m.Node.path, m.Node.id).where(m.Node.job_id == job_id))
        }


def assert_no_duplicates(url: str, run_id: int) -> None:
    with session_scope(url) as s:
        q = (
            select(m.Node.job_id, m.Node.path)
            .join(m.Job, m.Job.id == m.Node.job_id)
            .where(m.Job.run_id == run_id)
        )
        rows = s.execute(q).all()
        depths = s.execute(
            select(m.SelectionStep.job_id, m.SelectionStep.depth)
            .join(m.Job, m.Job.id == m.SelectionStep.job_id)
            .where(m.Job.run_id == run_id)
        ).all()
    assert len(rows) == len(set(rows)) and len(depths) == len(set(depths))


def running_past(url: str, run_id: int, depth: int) -> m.Job | None:
    return next((j for j in jobs_of(url, run_id) if j.status == "running" and j.depth >= depth), None)


def test_kill_9_mid_run_loses_nothing(env: dict[str, str], pg_url: str, workers: Workers) -> None:
    first = workers.start()
    run_id = submit(env, "--method", "ets", "--width", "16", "--limit", "10", "--sim-latency", "0.15")
    victim = wait_for(
        lambda: running_past(pg_url, run_id, 2), 120, "a job reaching depth 2\n" + workers.tail()
    )
    before = node_ids(pg_url, victim.id)
    first.send_signal(signal.SIGKILL)
    first.wait()
    workers.start()
    wait_for(lambda: run_done(pg_url, run_id), 240, "the run finishing\n" + workers.tail())
    jobs = jobs_of(pg_url, run_id)
    assert [j.status for j in jobs] == ["done"] * 10
    resumed = next(j for j in jobs if j.id == victim.id)
    assert resumed.attempts == 2
    after = node_ids(pg_url, victim.id)
    assert {p: after[p] for p in before} == before  # earlier depths kept, not redone
    assert len(after) > len(before)
    assert_no_duplicates(pg_url, run_id)


def test_flushed_redis_then_resume(
    env: dict[str, str], pg_url: str, workers: Workers, own_redis: RedisHandle
) -> None:
    workers.start()
    run_id = submit(env, "--method", "rebase", "--width", "8", "--limit", "6", "--sim-latency", "0.2")
    wait_for(
        lambda: any(j.status == "done" for j in jobs_of(pg_url, run_id)),
        120,
        "a first job\n" + workers.tail(),
    )
    own_redis.flushall()  # every queued task is gone
    time.sleep(4)  # the job in hand finishes; nothing else arrives
    assert not run_done(pg_url, run_id)
    out = etsq_json("resume", str(run_id), env=env)
    assert out["enqueued"] >= 1
    wait_for(lambda: run_done(pg_url, run_id), 180, "the resumed run\n" + workers.tail())
    assert all(j.status == "done" for j in jobs_of(pg_url, run_id))
    assert_no_duplicates(pg_url, run_id)


def test_sigterm_finishes_the_depth_and_requeues(env: dict[str, str], pg_url: str, workers: Workers) -> None:
    first = workers.start()
    run_id = submit(env, "--method", "rebase", "--width", "8", "--limit", "2", "--sim-latency", "0.5")
    victim = wait_for(lambda: running_past(pg_url, run_id, 1), 120, "a running job\n" + workers.tail())
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    job = next(j for j in jobs_of(pg_url, run_id) if j.id == victim.id)
    assert job.status in ("queued", "done")  # handed back after its depth, or it had just finished
    workers.start()
    wait_for(lambda: run_done(pg_url, run_id), 120, "the run after restart\n" + workers.tail())
    assert all(j.status == "done" for j in jobs_of(pg_url, run_id))
    assert_no_duplicates(pg_url, run_id)


SWEEP = """
datasets: [gsm8k]
methods: [rebase, bon]
widths: [4, 8]
limit: 3
params: {max_tokens: [512, 1024]}
models: {backend: sim}
"""


def test_same_sweep_twice_concurrently_makes_one_set_of_runs(
    env: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    cmd = [sys.executable, "-m", "cli", "sweep", str(path), "--json"]
    procs = [
        subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    with session_scope(pg_url) as s:
        assert s.scalar(select(func.count()).select_from(m.Run)) == 8  # 2 methods x 2 widths x 2 max_tokens
        assert s.scalar(select(func.count()).select_from(m.Job)) == 8 * 3
    again = etsq_json("sweep", str(path), env=env)
    assert len(again) == 8 and not any(r["created"] for r in again)


def test_jobs_spread_over_gpu_queues(env: dict[str, str], pg_url: str, workers: Workers) -> None:
    workers.start("--gpu", "0")
    workers.start("--gpu", "1")
    wait_for(lambda: _queues_live(pg_url), 60, "two live workers")
    run_id = submit(env, "--method", "bon", "--width", "4", "--limit", "6", "--sim-latency", "0.1")
    wait_for(lambda: run_done(pg_url, run_id), 120, "the run\n" + workers.tail())
    jobs = jobs_of(pg_url, run_id)
    assert [j.queue for j in jobs] == ["gpu0", "gpu1"] * 3
    assert all(j.gpu == j.queue.removeprefix("gpu") for j in jobs)
    assert all(j.status == "done" and j.worker and j.started_at and j.finished_at for j in jobs)


def _queues_live(url: str) -> bool:
    """Both workers registered: submit reads the queues of live workers from the database."""
    from etsq.store.session import Store
    from etsq.store.workers import live_queues

    with Store.open(url).session() as s:
        return live_queues(s, 120) == ["gpu0", "gpu1"]


def test_cancel_and_watch(env: dict[str, str], pg_url: str) -> None:
    run_id = submit(env, "--method", "bon", "--width", "4", "--limit", "3", "--queue", "nobody-listens")
    proc = etsq("cancel", str(run_id), env=env)
    assert proc.returncode == 0 and "3 jobs cancelled" in proc.stdout
    [row] = etsq_json("status", str(run_id), env=env)
    assert (row["status"], row["problems_cancelled"]) == ("cancelled", 3)
    watch = etsq("status", "--watch", str(run_id), env=env, timeout=30)
    assert watch.returncode == 0 and f"run {run_id}" in watch.stdout


@pytest.fixture
def proxy(sglang_server: Any) -> Iterator[Any]:
    from tests.faultproxy import FaultProxy

    p = FaultProxy(sglang_server.url)
    yield p
    p.stop()


def _submit_sglang(env: dict[str, str], url: str) -> int:
    proc = etsq(
        "submit",
        "gsm8k",
        "--backend",
        "sglang",
        "--policy-url",
        url,
        "--method",
        "rebase",
        "--width",
        "4",
        "--limit",
        "2",
        "--max-step-tokens",
        "6",
        "--max-tokens",
        "30",
        "--max-depth",
        "5",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def test_policy_server_503_for_a_while_then_recovering(
    env: dict[str, str], pg_url: str, workers: Workers, proxy: Any
) -> None:
    workers.env = {**env, "ETSQ_HTTP_RETRIES": "1", "ETSQ_RETRY_BACKOFF_S": "0.5", "ETSQ_JOB_RETRIES": "20"}
    run_id = _submit_sglang(env, proxy.url)
    proxy.failing = True
    workers.start()
    wait_for(lambda: proxy.refused >= 4, 90, "the worker meeting the 503s\n" + workers.tail())
    proxy.failing = False
    wait_for(lambda: run_done(pg_url, run_id), 180, "the run after the server recovered\n" + workers.tail())
    jobs = jobs_of(pg_url, run_id)
    assert [j.status for j in jobs] == ["done", "done"]
    assert max(j.attempts for j in jobs) >= 2
    assert_no_duplicates(pg_url, run_id)


def test_a_server_that_never_recovers_fails_jobs_with_the_reason(
    env: dict[str, str], pg_url: str, workers: Workers, proxy: Any
) -> None:
    workers.env = {**env, "ETSQ_HTTP_RETRIES": "1", "ETSQ_RETRY_BACKOFF_S": "0.2", "ETSQ_JOB_RETRIES": "2"}
    run_id = _submit_sglang(env, proxy.url)
    proxy.failing = True
    workers.start()
    wait_for(lambda: run_done(pg_url, run_id), 120, "the jobs giving up\n" + workers.tail())
    jobs = jobs_of(pg_url, run_id)
    assert [j.status for j in jobs] == ["failed", "failed"]
    assert all("503" in (j.error or "") and "gave up after 2 retries" in (j.error or "") for j in jobs)
    [row] = etsq_json("status", str(run_id), env=env)
    assert row["status"] == "failed"


def test_one_worker_searches_several_problems_at_once(
    env: dict[str, str], pg_url: str, workers: Workers
) -> None:
    workers.start("--concurrency", "3")
    run_id = submit(env, "--method", "rebase", "--width", "4", "--limit", "6", "--sim-latency", "0.3")
    wait_for(lambda: run_done(pg_url, run_id), 120, "the run\n" + workers.tail())
    jobs = jobs_of(pg_url, run_id)
    assert all(j.status == "done" for j in jobs)
    spans = sorted((j.started_at, j.finished_at) for j in jobs)
    overlaps = sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)
    assert overlaps >= 2  # jobs ran side by side, not one after another
    assert len({j.worker for j in jobs}) == 1
    assert_no_duplicates(pg_url, run_id)
