"""Leases are judged by the database's clock: a worker whose clock is 10 minutes off neither steals
live jobs nor loses dead ones; a commit under a superseded lease generation is fenced."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from etsq.search.tree import Tree
from etsq.store import schema as m
from etsq.store.jobs import LeaseFenced, claim_job, heartbeat, requeue_stale
from etsq.store.session import Store, session_scope
from etsq.store.trees import DepthWriter
from tests.helpers import store_run, tiny_config
from tests.test_jobs import _depth_zero, _nodes

SKEW = timedelta(minutes=10)
_REAL_UTCNOW = m.utcnow


def _skew(monkeypatch: pytest.MonkeyPatch, delta: timedelta) -> None:
    """This process's time source (every timestamp etsq takes from the worker) `delta` off."""
    monkeypatch.setattr(m, "utcnow", lambda: _REAL_UTCNOW() + delta)


@pytest.mark.parametrize("delta", [-SKEW, SKEW], ids=["slow", "fast"])
def test_a_skewed_worker_neither_steals_nor_loses_jobs(
    db_url: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, delta: timedelta
) -> None:
    store = Store.open(db_url)
    _, [live, dead] = store_run(db_url, tiny_model, tiny_config(), limit=2)

    # The skewed worker holds `live` and beats; a worker with a true clock must not take it.
    _skew(monkeypatch, delta)
    claim = claim_job(store, live, stale_after_s=120, worker="skewed")
    assert claim is not None and heartbeat(store, live, claim.lease)
    monkeypatch.setattr(m, "utcnow", _REAL_UTCNOW)
    assert claim_job(store, live, stale_after_s=120, worker="true") is None
    with store.session() as s:
        assert requeue_stale(s, 120) == []

    # A true-clock worker holds `dead`; the skewed worker's janitor and claims must not take it either.
    other = claim_job(store, dead, stale_after_s=120, worker="true")
    assert other is not None
    _skew(monkeypatch, delta)
    assert claim_job(store, dead, stale_after_s=120, worker="skewed") is None
    with store.session() as s:
        assert requeue_stale(s, 120) == []

    # Both workers die: each job goes stale after stale_after_s by the database's clock, whoever looks.
    time.sleep(1.6)
    with store.session() as s:
        assert sorted(j for j, _ in requeue_stale(s, 1.0)) == sorted([live, dead])
    monkeypatch.setattr(m, "utcnow", _REAL_UTCNOW)
    assert claim_job(store, live, stale_after_s=1.0, worker="true") is not None


def test_a_commit_under_a_superseded_generation_is_fenced(db_url: str, tiny_model: Path) -> None:
    store = Store.open(db_url)
    _, [job_id] = store_run(db_url, tiny_model, tiny_config(), limit=1)
    first = claim_job(store, job_id, stale_after_s=0.5, worker="box2")
    assert first is not None and first.generation == 1
    time.sleep(1.0)  # box2 is cut off: its lease expires and box1 takes the job
    second = claim_job(store, job_id, stale_after_s=0.5, worker="box1")
    assert second is not None and second.generation == 2
    tree = Tree("prompt", 5)
    # Even with the current lease id, generation 1 is fenced inside the commit's transaction.
    stale_writer = DepthWriter(store, job_id, second.lease, generation=first.generation)
    with pytest.raises(LeaseFenced, match=r"generation 1 is stale .*generation 2, worker box1"):
        stale_writer(tree, _depth_zero(tree, ["a\n\n", "b\n\n"]))
    assert _nodes(db_url, job_id) == []
    tree = Tree("prompt", 5)
    DepthWriter(store, job_id, second.lease, generation=second.generation)(tree, _depth_zero(tree, ["a\n\n"]))
    with session_scope(db_url) as s:
        job = s.get_one(m.Job, job_id)
        assert (job.depth, job.lease_gen, job.worker) == (1, 2, "box1")


def test_the_janitor_closes_a_run_whose_last_jobs_finished_at_once(db_url: str, tiny_model: Path) -> None:
    """Two jobs finishing together each see the other open and leave the run open; a janitor's
    sweep closes it at its last job's finish time, and leaves runs with an open job alone."""
    from sqlalchemy import update

    from etsq.queue.janitor import Janitor
    from etsq.settings import Settings
    from etsq.store.jobs import finish_values
    from etsq.store.statuses import JobStatus

    store = Store.open(db_url)
    left_open, jobs = store_run(db_url, tiny_model, tiny_config(), limit=2)
    still_running, _ = store_run(db_url, tiny_model, tiny_config(seed=1), limit=2)
    with store.session() as s:  # both jobs done, the run unstamped: what the race leaves
        s.execute(update(m.Job).where(m.Job.id.in_(jobs)).values(**finish_values(JobStatus.DONE, None)))
        last = max(s.scalars(select(m.Job.finished_at).where(m.Job.id.in_(jobs))))
    Janitor(None, Settings.from_env().with_(database_url=db_url), store).sweep()
    with store.session() as s:
        assert s.get_one(m.Run, left_open).finished_at == last
        assert s.get_one(m.Run, still_running).finished_at is None
