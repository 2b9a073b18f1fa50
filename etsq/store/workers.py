"""Worker presence from the database: a worker's own registration, and running jobs' heartbeats.

A worker registers when it is ready, refreshes `seen_at` at every janitor sweep (each
ETSQ_JANITOR_S) and removes itself at shutdown; a worker killed with -9 stops being seen and counts
as gone after ETSQ_STALE_AFTER_S.  A running job whose heartbeat is fresh is evidence too: its
worker is busy but alive, whatever a broker ping says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from etsq.store import schema as m
from etsq.store.statuses import JobStatus

_RUN_QUEUE = re.compile(r"\.run\d+$")


def run_queue_name(queue: str, run_id: int) -> str:
    """The queue of one run's jobs while `--wait` serves them with its own local worker."""
    return f"{queue}.run{run_id}"


def serves_one_run(queue: str | None) -> bool:
    """Whether `queue` is a run's own queue: its worker (a `--wait`'s) serves no other run."""
    return queue is not None and bool(_RUN_QUEUE.search(queue))


@dataclass(frozen=True)
class LiveWorker:
    name: str
    queue: str | None  # None: known only from a running job that names no queue


def register_worker(s: Session, name: str, queue: str, pid: int) -> None:
    now = m.utcnow()
    row = s.get(m.Worker, name)
    if row is None:
        s.add(m.Worker(name=name, queue=queue, pid=pid, started_at=now, seen_at=now))
    else:
        row.queue, row.pid, row.started_at, row.seen_at = queue, pid, now, now


def touch_worker(s: Session, name: str) -> None:
    s.execute(update(m.Worker).where(m.Worker.name == name).values(seen_at=m.utcnow()))


def unregister_worker(s: Session, name: str) -> None:
    s.execute(delete(m.Worker).where(m.Worker.name == name))


def live_workers(s: Session, stale_after_s: float, shared_only: bool = True) -> list[LiveWorker]:
    """Workers seen within `stale_after_s`, and those of running jobs with a fresh heartbeat;
    `shared_only`: not the local workers of `--wait`, which serve their own run's queue only."""
    cutoff = m.utcnow() - timedelta(seconds=stale_after_s)
    found = {
        name: LiveWorker(name, queue)
        for name, queue in s.execute(select(m.Worker.name, m.Worker.queue).where(m.Worker.seen_at >= cutoff))
    }
    busy = select(m.Job.worker, m.Job.queue).where(
        m.Job.status == JobStatus.RUNNING, m.Job.heartbeat_at >= cutoff, m.Job.worker.is_not(None)
    )
    for name, queue in s.execute(busy.distinct()):
        if name is not None:
            found.setdefault(name, LiveWorker(name, queue))
    live = [w for w in found.values() if not (shared_only and serves_one_run(w.queue))]
    return sorted(live, key=lambda w: w.name)


def live_queues(s: Session, stale_after_s: float) -> list[str]:
    """Queues that registered live workers consume, sorted: where submit spreads a run's jobs."""
    return sorted({w.queue for w in live_workers(s, stale_after_s) if w.queue})
