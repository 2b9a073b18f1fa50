"""A job's state: claimed with a lease, kept alive by heartbeats, released, requeued, finished.

A job goes queued -> running (claim) -> done | failed | cancelled, or back to queued (release,
a stale heartbeat).  Its tree is stored depth by depth by `etsq.store.trees`; the depth commit
that finishes a job stamps it through `finish_values`, like every other way a job ends, and a run
is stamped finished in one place, `close_run_if_done` (whose rule PostgreSQL's one-statement depth
commit carries inside it, etsq.store.depth_pg).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, exists, func, null, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from etsq.errors import EtsqError
from etsq.search.config import SearchConfig
from etsq.store import schema as m
from etsq.store.clock import db_now
from etsq.store.session import Store, rows_affected
from etsq.store.statuses import FINISHED, JobStatus

log = logging.getLogger(__name__)


def fault_line(exc: BaseException) -> str:
    """A database fault in one line, for a log that retries it (no traceback per attempt)."""
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return text[:300] or type(exc).__name__


class JobInterrupted(EtsqError):
    """The search stopped between two depths; what was committed stays."""


class LeaseLost(JobInterrupted):
    """Another worker reclaimed the job, or it was cancelled: stop without writing."""


class LeaseFenced(LeaseLost):
    """A depth commit was refused inside its transaction: the job's lease generation moved on."""


class ShutdownRequested(JobInterrupted):
    """The worker is shutting down: the job goes back to the queue after this depth."""


@dataclass
class Claim:
    """What a worker needs from the database to search one job."""

    job_id: int
    run_id: int
    question: str
    key: str
    config: dict[str, Any]
    policy_model: str
    prm_model: str
    lease: str
    generation: int = 0  # the lease's generation: the fencing token every depth commit checks


def _stale(stale_after_s: float) -> ColumnElement[bool]:
    """A running job whose heartbeat is older than `stale_after_s` by the database's clock (never a
    worker's, `etsq.store.clock`): its worker is presumed dead."""
    return or_(m.Job.heartbeat_at.is_(None), m.Job.heartbeat_at < db_now(-stale_after_s))


def _claimable(stale_after_s: float) -> ColumnElement[bool]:
    running_but_stale = and_(m.Job.status == JobStatus.RUNNING, _stale(stale_after_s))
    return or_(m.Job.status == JobStatus.QUEUED, running_but_stale)


def claim_job(
    store: Store, job_id: int, stale_after_s: float, worker: str | None = None, gpu: str | None = None
) -> Claim | None:
    """Take the job with a fresh lease of the next generation; None when it is finished, missing,
    or held by a live worker.  Times are the database's (`etsq.store.clock`)."""
    lease = str(uuid.uuid4())
    with store.session() as s:
        generation = s.execute(
            update(m.Job)
            .where(m.Job.id == job_id, _claimable(stale_after_s))
            .values(
                status=JobStatus.RUNNING,
                attempts=m.Job.attempts + 1,
                worker=worker or socket.gethostname(),
                gpu=gpu,
                lease=lease,
                lease_gen=m.Job.lease_gen + 1,
                heartbeat_at=db_now(),
                error=None,
                started_at=func.coalesce(m.Job.started_at, db_now()),
            )
            .returning(m.Job.lease_gen)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if generation is None:
            return None
        job = s.get_one(m.Job, job_id)
        run, problem = job.run, job.problem
        return Claim(
            job_id,
            run.id,
            problem.question,
            f"{problem.dataset}/{problem.problem_id}",
            run.config,
            run.policy_model,
            run.prm_model,
            lease,
            int(generation),
        )


def heartbeat(store: Store, job_id: int, lease: str) -> bool:
    """Refresh the job's heartbeat; False when the lease was lost (reclaimed or cancelled)."""
    with store.session() as s:
        stmt = (
            update(m.Job)
            .where(m.Job.id == job_id, m.Job.lease == lease, m.Job.status == JobStatus.RUNNING)
            .values(heartbeat_at=db_now())
        )
        return rows_affected(s, stmt) > 0


def release_job(s: Session, job_id: int, lease: str) -> None:
    """Hand a running job back to the queue (retry, shutdown): its committed depths stay."""
    s.execute(
        update(m.Job)
        .where(m.Job.id == job_id, m.Job.lease == lease, m.Job.status == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, lease=None, heartbeat_at=None)
    )


def requeue_stale(
    s: Session, stale_after_s: float, run_id: int | None = None
) -> list[tuple[int, str | None]]:
    """Jobs whose worker stopped beating go back to 'queued'; (id, queue) returned to enqueue, in
    id order (a run's problems in their order)."""
    cond = [m.Job.status == JobStatus.RUNNING, _stale(stale_after_s)]
    if run_id is not None:
        cond.append(m.Job.run_id == run_id)
    found = s.execute(select(m.Job.id, m.Job.queue).where(*cond).order_by(m.Job.id))
    rows = [(job_id, queue) for job_id, queue in found]
    if rows:
        ids = [job_id for job_id, _ in rows]
        s.execute(update(m.Job).where(m.Job.id.in_(ids), *cond).values(status=JobStatus.QUEUED, lease=None))
    return rows


def expired_leases(
    s: Session, stale_after_s: float, run_ids: list[int] | None = None
) -> list[dict[str, Any]]:
    """Running jobs whose holder's lease expired (heartbeat older than `stale_after_s` by the
    database's clock): who holds each and for how long it has not beaten.  A janitor requeues them."""
    cond = [m.Job.status == JobStatus.RUNNING, _stale(stale_after_s)]
    if run_ids is not None:
        cond.append(m.Job.run_id.in_(run_ids))
    # Seconds since the last beat, by the database's clock (PostgreSQL; SQLite leaves it out).
    age = func.extract("epoch", db_now() - m.Job.heartbeat_at) if _is_pg(s) else null()
    cols = [m.Job.id, m.Job.run_id, m.Job.worker, m.Job.lease_gen, age]
    rows = s.execute(select(*cols).where(*cond).order_by(m.Job.id))
    return [
        {
            "job_id": r[0],
            "run_id": r[1],
            "worker": r[2],
            "generation": r[3],
            "silent_s": None if r[4] is None else round(float(r[4]), 1),
        }
        for r in rows
    ]


def _is_pg(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


_JOBS = m.Base.metadata.tables["jobs"]
_RUNS = m.Base.metadata.tables["runs"]


def finish_values(status: JobStatus, error: str | None = None) -> dict[str, Any]:
    """The column values that end a job (done, failed or cancelled): the one place they are stamped."""
    assert status in FINISHED, status
    return {"status": status, "error": error, "finished_at": m.utcnow(), "lease": None}


def close_run_if_done(conn: Connection, run_id: int) -> None:
    """Stamp the run finished once none of its jobs is open: the one place runs.finished_at is set
    (PostgreSQL's depth commit applies the same rule inside its one statement, etsq.store.depth_pg)."""
    open_jobs = conn.execute(
        select(func.count())
        .select_from(_JOBS)
        .where(_JOBS.c.run_id == run_id, _JOBS.c.status.not_in(FINISHED))
    ).scalar_one()
    if not open_jobs:
        conn.execute(update(_RUNS).where(_RUNS.c.id == run_id).values(finished_at=m.utcnow()))


def close_finished_runs(s: Session) -> int:
    """Stamp each run left open with no open job, at its last job's finish: how many were closed.

    Two jobs of a run that finish at the same moment each count the other as still open inside
    their own transaction (`close_run_if_done`, PostgreSQL's one-statement depth commit), so neither
    stamps the run.  The janitor's sweep calls this and closes such a run within one sweep."""
    of_run = _JOBS.c.run_id == _RUNS.c.id
    last = select(func.max(_JOBS.c.finished_at)).where(of_run).scalar_subquery()
    return rows_affected(
        s,
        update(_RUNS)
        .where(
            _RUNS.c.finished_at.is_(None),
            exists().where(of_run),
            ~exists().where(of_run, _JOBS.c.status.not_in(FINISHED)),
        )
        .values(finished_at=func.coalesce(last, m.utcnow())),
    )


def _finish(s: Session, job: m.Job, status: JobStatus, error: str | None = None) -> None:
    s.execute(update(m.Job).where(m.Job.id == job.id).values(**finish_values(status, error)))
    close_run_if_done(s.connection(), job.run_id)


def fail_job(s: Session, job_id: int, reason: str, lease: str | None = None) -> None:
    """Record a permanent failure (unless another worker holds the job now); the run goes on."""
    job = s.get(m.Job, job_id)
    if job is None or job.status in FINISHED or (lease is not None and job.lease not in (lease, None)):
        return
    _finish(s, job, JobStatus.FAILED, reason[:4000])


class Heartbeat:
    """A background thread that keeps a running job's heartbeat fresh between depth commits."""

    def __init__(self, store: Store, job_id: int, lease: str, every_s: float) -> None:
        self.args, self.every_s = (store, job_id, lease), every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                if not heartbeat(*self.args):
                    return
            except OperationalError as exc:  # a missed beat is harmless; the next one retries
                log.warning("heartbeat of job %s failed, retrying: %s", self.args[1], fault_line(exc))
            except Exception:  # a bug: logged with its traceback; the search goes on, the lease may lapse
                log.warning("heartbeat of job %s failed", self.args[1], exc_info=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def search_config(claim: Claim) -> SearchConfig:
    return SearchConfig.from_dict(claim.config["search"])


def job_seconds(search_s: float | None, started: datetime | None, finished: datetime | None) -> float | None:
    """The time a job was searched (`jobs.search_s`); for jobs stored before it was measured, the
    span from its first claim to its end (which counts pauses and model loading)."""
    if search_s is not None:
        return search_s
    if started is None or finished is None:
        return None
    return (finished - started).total_seconds()
