"""End to end with real parts: the CLI, Redis, a separately started Celery worker, the database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from etsq.queue.broker import stop_local_redis
from etsq.store import schema as m
from etsq.store.session import session_scope
from tests.helpers import etsq, etsq_json, tiny_submit_args
from tests.services import RedisHandle

pytestmark = pytest.mark.slow


def _wait_done(run_id: int, env: dict[str, str], timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [row] = etsq_json("status", str(run_id), env=env)
        if row["status"] in ("done", "failed"):
            return row
        time.sleep(1.0)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


def _check_trees(url: str, run_id: int, width: int) -> None:
    with session_scope(url) as s:
        jobs = s.scalars(select(m.Job).where(m.Job.run_id == run_id)).all()
        assert jobs and all(j.status == "done" for j in jobs)
        for job in jobs:
            nodes = s.scalars(select(m.Node).where(m.Node.job_id == job.id)).all()
            ids = {n.id for n in nodes}
            assert all(n.parent_id in ids for n in nodes if n.depth > 0)
            assert 1 <= sum(n.terminal for n in nodes) <= width
            depths = set(s.scalars(select(m.SelectionStep.depth).where(m.SelectionStep.job_id == job.id)))
            assert depths == {n.depth for n in nodes}


def test_postgres_redis_and_a_separate_worker(
    pg_url: str, redis_server: RedisHandle, tiny_model: Path, tmp_path: Path
) -> None:
    env = {
        "ETSQ_DATABASE_URL": pg_url,
        "ETSQ_BROKER_URL": redis_server.url,
        "ETSQ_QUEUE": f"q{tmp_path.name[-8:]}",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"],
        env={**__import__("os").environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "w.log", "wb"),
    )
    try:
        proc = etsq("submit", "gsm8k", *tiny_submit_args(tiny_model, width=4, limit=3), env=env)
        assert proc.returncode == 0, proc.stderr
        run_id = int(proc.stdout.strip())
        row = _wait_done(run_id, env)
        assert (row["problems_done"], row["problems_failed"]) == (3, 0), (tmp_path / "w.log").read_text()[
            -3000:
        ]
        _check_trees(pg_url, run_id, width=4)
        [agg] = etsq_json("aggregate", str(run_id), "--agg", "prod", env=env)
        assert (agg["n_problems"], agg["agg"], agg["vote"]) == (3, "prod", "weighted")
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_embedded_default_submit_wait(tiny_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"ETSQ_HOME": str(home)}
    try:
        proc = etsq(
            "submit",
            "gsm8k",
            *tiny_submit_args(tiny_model, method="bon", width=3, limit=2),
            "--wait",
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        run_id = int(proc.stdout.strip().splitlines()[0])
        [agg] = etsq_json("aggregate", env=env)
        assert (agg["run_id"], agg["n_problems"], agg["method"]) == (run_id, 2, "bon")
        _check_trees(f"sqlite:///{home / 'etsq.db'}", run_id, width=3)
        exported = etsq("export", str(run_id), env=env)
        assert exported.returncode == 0 and len(exported.stdout.strip().splitlines()) == 2
    finally:
        stop_local_redis(home)
