"""Worker presence from the database: a worker's own registration, and running jobs' heartbeats.

A worker registers when it is ready, refreshes `seen_at` at every janitor sweep (each
ETSQ_JANITOR_S) and removes itself at shutdown; a worker killed with -9 stops being seen and counts
as gone after ETSQ_STALE_AFTER_S.  A running job whose heartbeat is fresh is evidence too: its
worker is busy but alive, whatever a broker ping says.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from etsq.store import schema as m
from etsq.store.statuses import JobStatus


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


def live_workers(s: Session, stale_after_s: float) -> list[LiveWorker]:
    """Workers seen within `stale_after_s`, and those of running jobs with a fresh heartbeat."""
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
    return sorted(found.values(), key=lambda w: w.name)


def live_queues(s: Session, stale_after_s: float) -> list[str]:
    """Queues that registered live workers consume, sorted: where submit spreads a run's jobs."""
    return sorted({w.queue for w in live_workers(s, stale_after_s) if w.queue})
