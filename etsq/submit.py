"""Submitting runs: validate, store each run and its jobs, enqueue them; and waiting for a run.

`submit` serves both `etsq submit` (one spec) and `etsq sweep` (many): every spec's problems are
loaded and checked, and the model servers each spec names are checked to answer (as a worker checks
them at start), before the broker is touched or anything is written.  A run is found by its
identity (its problems' content hash and its configuration), so submitting it again enqueues only
its unfinished jobs; a new run whose jobs cannot be enqueued is deleted again, so a refused
submission leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from types import TracebackType

from etsq import validation
from etsq.datasets import Dataset
from etsq.errors import PermanentError, TransientError, UserError
from etsq.models.backends import check_servers
from etsq.models.config import ModelConfig
from etsq.queue.connection import Connection, connect
from etsq.queue.local import start_local_worker, stop_local_worker
from etsq.queue.messages import Resumed, WaitingJobs, enqueue, resume, run_queue, target_queues
from etsq.settings import Settings
from etsq.store.runs import (
    RunSpec,
    cancelled_jobs,
    create_run,
    delete_run,
    find_run,
    load_problems,
    other_runs_waiting,
    progress,
    queued_jobs,
    route_jobs,
    statuses,
    uncancel_run,
    unfinished_run_ids,
)
from etsq.store.session import Store
from etsq.store.workers import live_workers

# A submit-time server check fails fast: two attempts, and no request may take minutes.
CHECK_ATTEMPTS = 2
CHECK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Submitted:
    """One run of a submission: its id, whether it is new, and how many jobs were enqueued."""

    spec: RunSpec
    run_id: int
    created: bool
    jobs_enqueued: int
    problems: int
    cancelled: int = 0  # jobs a cancel paused (a resubmission leaves them; `etsq resume` continues)


@dataclass(frozen=True)
class Submission:
    runs: list[Submitted]
    connection: Connection
    listening: bool  # a live worker is registered (or holds a running job)
    own_queue: bool = False  # `--wait` on the embedded default: the run's jobs wait on its own queue


def prepare(settings: Settings, specs: list[RunSpec], check: bool = True) -> list[Dataset]:
    """Every spec's problems, with its model servers checked (unless `check` is False).

    Raises a UserError before anything is written or the broker is started.
    """
    loaded: dict[str, Dataset] = {}
    data = [load_problems(settings, spec, loaded) for spec in specs]
    if check:
        for models in _distinct(spec.models for spec in specs):
            check_model_servers(models, settings)
    return data


def _distinct(models: Iterator[ModelConfig]) -> list[ModelConfig]:
    seen: list[ModelConfig] = []
    for cfg in models:
        if cfg not in seen:
            seen.append(cfg)
    return seen


def check_model_servers(models: ModelConfig, settings: Settings) -> None:
    """The check a worker runs at start, for a run's own servers; a UserError if one fails."""
    if not models.is_remote:
        return
    timeout = min(settings.http_timeout_s, CHECK_TIMEOUT_S)
    quick = settings.with_(http_retries=CHECK_ATTEMPTS, http_timeout_s=timeout)
    hint = "submit with --no-check-servers to store the run before its servers are up"
    try:
        check_servers(models, quick)
    except UserError as exc:
        raise UserError(f"{exc}; or {hint}") from exc
    except (TransientError, PermanentError) as exc:
        raise UserError(f"{exc}; {hint}") from exc


def submit(
    settings: Settings,
    store: Store,
    specs: list[RunSpec],
    queue: str | None = None,
    check_servers: bool = True,
    wait: bool = False,
) -> Submission:
    """Store and enqueue every spec's run; nothing is written unless every spec is valid.

    `wait` (one spec) on the embedded broker with no live worker: the run's jobs go to its own
    queue (`run_queue`), which the local worker of `RunWaiter` consumes, so it runs this run first."""
    validation.queue_name("--queue", queue)
    data = prepare(settings, specs, check_servers)
    conn = connect(settings)
    listening = is_listening(store, settings)
    own = wait and conn.embedded and queue is None and not listening and len(specs) == 1
    queues = target_queues(store, conn.settings, queue)
    waiting = WaitingJobs(conn.broker_url)  # read once for all the runs that exist already
    runs = [
        _store_and_enqueue(conn, store, spec, d, queues, own, waiting)
        for spec, d in zip(specs, data, strict=True)
    ]
    return Submission(runs, conn, listening, own)


def is_listening(store: Store, settings: Settings) -> bool:
    """Whether a worker is alive, from the database: its registration, or a running job's heartbeat."""
    with store.session() as s:
        return bool(live_workers(s, settings.stale_after_s))


def _store_and_enqueue(
    conn: Connection,
    store: Store,
    spec: RunSpec,
    data: Dataset,
    queues: list[str],
    own: bool,
    waiting: WaitingJobs,
) -> Submitted:
    """Store the run (or find it) and enqueue its jobs: all of a new run, the unfinished of an old one."""
    run_id, created = create_run(store, spec, data, queues)
    own_queue = run_queue(conn.settings, run_id) if own else None
    if not created:
        enqueued = resume(conn, store, run_id, own_queue, waiting).enqueued
        with store.session() as s:
            paused = cancelled_jobs(s, run_id)
        return Submitted(spec, run_id, False, enqueued, len(data), paused)
    with store.session() as s:
        if own_queue is not None:
            route_jobs(s, run_id, own_queue, own_queue)
        jobs = queued_jobs(s, run_id, conn.settings.queue)
    try:
        enqueue(conn.app, jobs)
    except Exception:  # a refusing broker, or a bug: either way no run is left without its messages
        with store.session() as s:
            delete_run(s, run_id)
        raise
    return Submitted(spec, run_id, True, len(jobs), len(data))


@dataclass(frozen=True)
class Planned:
    """A run a sweep would submit: its spec, how many problems, and the stored run if it exists."""

    spec: RunSpec
    problems: int
    run_id: int | None


def plan(
    settings: Settings,
    store: Store,
    specs: list[RunSpec],
    queue: str | None = None,
    check_servers: bool = True,
) -> list[Planned]:
    """What `submit` would do, without touching the broker or writing a run (`sweep --dry-run`)."""
    validation.queue_name("--queue", queue)
    data = prepare(settings, specs, check_servers)
    if not store.exists():  # no database yet: every run is new, and a dry run creates none
        return [Planned(spec, len(d), None) for spec, d in zip(specs, data, strict=True)]
    with store.session() as s:
        return [Planned(spec, len(d), find_run(s, spec, d)) for spec, d in zip(specs, data, strict=True)]


@dataclass(frozen=True)
class ResumedRun:
    resumed: Resumed
    connection: Connection
    listening: bool  # a live worker is registered (or holds a running job)
    uncancelled: int = 0  # cancelled jobs queued again (a cancel is a pause)
    own_queue: bool = False


def resume_run(settings: Settings, store: Store, run_id: int, wait: bool = False) -> ResumedRun:
    """Queue a run's cancelled jobs again and enqueue its unfinished jobs that have no message
    waiting (UserError for an unknown run).  `wait`: as for `submit`."""
    with store.session() as s:
        statuses(s, [run_id])  # a clear error for an unknown run, before the broker
    conn = connect(settings)
    listening = is_listening(store, conn.settings)
    own = wait and conn.embedded and not listening
    own_queue = run_queue(conn.settings, run_id) if own else None
    return _resume_one(conn, store, run_id, listening, own_queue)


def resume_runs(settings: Settings, store: Store, run_ids: list[int]) -> list[ResumedRun]:
    """`resume_run` of each run, over one connection, each queue read once for them all: 40 runs
    resumed one by one each read the messages the runs before them sent (quadratic)."""
    with store.session() as s:
        statuses(s, run_ids)
    conn = connect(settings)
    listening, waiting = is_listening(store, conn.settings), WaitingJobs(conn.broker_url)
    return [_resume_one(conn, store, run_id, listening, None, waiting) for run_id in run_ids]


def unfinished_runs(store: Store) -> list[int]:
    """The runs with a job not done or failed (cancelled ones included: a cancel is a pause)."""
    with store.session() as s:
        return unfinished_run_ids(s)


def _resume_one(
    conn: Connection,
    store: Store,
    run_id: int,
    listening: bool,
    own_queue: str | None,
    waiting: WaitingJobs | None = None,
) -> ResumedRun:
    with store.session() as s:
        uncancelled = uncancel_run(s, run_id)
    resumed = resume(conn, store, run_id, own_queue, waiting)
    return ResumedRun(resumed, conn, listening, uncancelled, own_queue is not None)


@dataclass(frozen=True)
class Progress:
    finished: int
    failed: int
    total: int


class RunWaiter:
    """Follows a run until every job finished, running a local worker if nobody else serves it.

    A local worker is started only when the submission put the run's jobs on their own queue (the
    embedded broker with no live worker): it consumes that queue alone, so it runs this run's jobs
    and no other's.  A user with their own broker has their own workers, and a second one would
    compete for their GPUs.  Interrupted (Ctrl-C), the local worker is asked to stop (the job in
    hand commits its depth and goes back to the queue) and is not waited for.
    """

    def __init__(
        self, conn: Connection, store: Store, run_id: int, own_queue: bool, interval_s: float = 0.5
    ) -> None:
        self.conn, self.store, self.run_id, self.interval_s = conn, store, run_id, interval_s
        self.own_queue = own_queue
        self.worker: Popen[bytes] | None = None
        self.worker_log: Path | None = None
        self.others_waiting = 0

    def __enter__(self) -> RunWaiter:
        settings = self.conn.settings
        if self.own_queue:
            with self.store.session() as s:
                self.others_waiting = other_runs_waiting(s, self.run_id)
            self.worker_log = settings.home / "logs" / f"worker-run{self.run_id}.log"
            queue = run_queue(settings, self.run_id)
            self.worker = start_local_worker(settings, self.conn.broker_url, self.worker_log, queue)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.worker is None:
            return
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        stop_local_worker(self.worker, timeout=0.5 if interrupted else 30.0, kill=not interrupted)

    def poll(self) -> Progress:
        if self.worker is not None and self.worker.poll() is not None:
            raise UserError(
                f"the local worker exited with status {self.worker.returncode}; see {self.worker_log}"
            )
        with self.store.session() as s:
            return Progress(*progress(s, self.run_id))

    def follow(self) -> Iterator[Progress]:
        """The run's progress now, then every `interval_s` until every job is finished.

        A Ctrl-C is taken between polls, never inside one: a KeyboardInterrupt raised within a
        database call may leave the connection pool's lock held, and the exit would hang on it
        (once in CI an interrupted --wait did not exit within 10 s)."""
        with _interrupt_between_polls() as interrupted:
            current = self.poll()
            yield current
            while current.finished < current.total:
                if interrupted.wait(self.interval_s):
                    raise KeyboardInterrupt
                current = self.poll()
                yield current


@contextlib.contextmanager
def _interrupt_between_polls() -> Iterator[threading.Event]:
    """An event that SIGINT sets, in place of the KeyboardInterrupt (main thread only)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
