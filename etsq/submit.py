"""Submitting runs: validate, store each run and its jobs, enqueue them; and waiting for a run.

`submit` serves both `etsq submit` (one spec) and `etsq sweep` (many): every spec's problems are
loaded and checked before anything is written, a run is found by its configuration hash (so
submitting it again enqueues only its unfinished jobs), and a new run whose jobs cannot be enqueued
is deleted again, so a refused submission leaves nothing behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from types import TracebackType

from etsq.broker import reachable_broker_url
from etsq.celery_app import EtsqCelery, create_app
from etsq.datasets import Problem
from etsq.errors import EtsqError, UserError
from etsq.localworker import start_local_worker, stop_local_worker
from etsq.queue import enqueue, live_workers, resume, target_queues
from etsq.runs import RunSpec, create_run, delete_run, load_problems, progress, queued_jobs, statuses
from etsq.settings import Settings


@dataclass(frozen=True)
class Connection:
    """A Celery app bound to a broker that answered."""

    app: EtsqCelery
    broker_url: str
    settings: Settings  # with broker_url set to the broker found
    embedded: bool  # the broker is etsq's embedded Redis


def connect(settings: Settings, queue: str | None = None) -> Connection:
    """The queue's app; raises BrokerUnavailable (a one-line user error) if the broker is down."""
    broker = reachable_broker_url(settings)
    bound = settings.with_(broker_url=broker, queue=queue)
    return Connection(create_app(bound), broker, bound, embedded=settings.uses_embedded_broker)


@dataclass(frozen=True)
class Submitted:
    """One run of a submission: its id, whether it is new, and how many jobs were enqueued."""

    spec: RunSpec
    run_id: int
    created: bool
    jobs_enqueued: int


@dataclass(frozen=True)
class Submission:
    runs: list[Submitted]
    connection: Connection


def submit(settings: Settings, specs: list[RunSpec], queue: str | None = None) -> Submission:
    """Store and enqueue every spec's run; nothing is written unless every spec is valid."""
    problems = [load_problems(settings, spec) for spec in specs]
    conn = connect(settings)
    queues = target_queues(conn.app, queue, settings.queue)
    runs = [
        _store_and_enqueue(conn, spec, probs, queues) for spec, probs in zip(specs, problems, strict=True)
    ]
    return Submission(runs, conn)


def _store_and_enqueue(
    conn: Connection, spec: RunSpec, problems: list[Problem], queues: list[str]
) -> Submitted:
    """Store the run (or find it) and enqueue its jobs: all of a new run, the unfinished of an old one."""
    url = conn.settings.database_url
    run_id, created = create_run(url, spec, problems, queues)
    if not created:
        return Submitted(spec, run_id, False, resume(conn.app, conn.settings, run_id))
    jobs = queued_jobs(url, run_id, conn.settings.queue)
    try:
        enqueue(conn.app, jobs)
    except EtsqError:
        delete_run(url, run_id)
        raise
    return Submitted(spec, run_id, True, len(jobs))


def resume_run(settings: Settings, run_id: int) -> int:
    """Enqueue a run's unfinished jobs again; returns how many (UserError for an unknown run)."""
    statuses(settings.database_url, [run_id])  # a clear error for an unknown run
    return resume(connect(settings).app, settings, run_id)


@dataclass(frozen=True)
class Progress:
    finished: int
    failed: int
    total: int


class RunWaiter:
    """Follows a run until every job finished, running a local worker if nobody else serves it.

    A local worker is started only on the embedded broker with no live worker: a user with their
    own broker has their own workers, and a second one would compete for their GPUs.
    """

    def __init__(self, conn: Connection, run_id: int, interval_s: float = 1.0) -> None:
        self.conn, self.run_id, self.interval_s = conn, run_id, interval_s
        self.worker: Popen[bytes] | None = None
        self.worker_log: Path | None = None

    def __enter__(self) -> RunWaiter:
        settings = self.conn.settings
        if self.conn.embedded and not live_workers(self.conn.app):
            self.worker_log = settings.home / "logs" / f"worker-run{self.run_id}.log"
            self.worker = start_local_worker(settings, self.conn.broker_url, self.worker_log)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.worker is not None:
            stop_local_worker(self.worker)

    def poll(self) -> Progress:
        if self.worker is not None and self.worker.poll() is not None:
            raise UserError(
                f"the local worker exited with status {self.worker.returncode}; see {self.worker_log}"
            )
        return Progress(*progress(self.conn.settings.database_url, self.run_id))

    def follow(self) -> Iterator[Progress]:
        """The run's progress now, then every `interval_s` until every job is finished."""
        current = self.poll()
        yield current
        while current.finished < current.total:
            time.sleep(self.interval_s)
            current = self.poll()
            yield current
