"""The janitor: a thread in every worker that queues again the jobs of workers that died.

A running job's worker refreshes its heartbeat; a job whose heartbeat is older than
ETSQ_STALE_AFTER_S goes back to 'queued' and is enqueued again, so a worker killed with -9
loses nothing and needs no command to recover.  It closes a run whose jobs all finished but that
was left open (its last two jobs finished at once).  The janitor also keeps its worker's registration
(`etsq.store.workers`) fresh: registered at start, seen at each sweep, removed when it stops.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
from typing import Any

from sqlalchemy.exc import OperationalError

from etsq.errors import BrokerUnavailable
from etsq.queue.messages import enqueue, live_queues
from etsq.settings import Settings
from etsq.store.jobs import close_finished_runs, fault_line, requeue_stale
from etsq.store.session import Store
from etsq.store.workers import register_worker, touch_worker, unregister_worker

log = logging.getLogger(__name__)


class Janitor(threading.Thread):
    """Sweeps every ETSQ_JANITOR_S seconds until stopped."""

    def __init__(
        self, app: Any, settings: Settings, store: Store | None = None, worker: str | None = None
    ) -> None:
        super().__init__(name="etsq-janitor", daemon=True)
        self.app, self.settings, self.worker = app, settings, worker
        self.store = store or Store.open(settings.database_url)  # the worker's one Store
        self.stopped = threading.Event()

    def run(self) -> None:
        self._registration(register=True)
        if self.worker is not None:
            atexit.register(self._registration, register=False)
        while True:
            self.sweep()
            if self.stopped.wait(self.settings.janitor_s):
                return

    def _registration(self, register: bool) -> None:
        if self.worker is None:
            return
        queue = self.app.conf.task_default_queue or self.settings.queue
        try:
            with self.store.session() as s:
                if register:
                    register_worker(s, self.worker, queue, os.getpid())
                else:
                    unregister_worker(s, self.worker)
        except OperationalError as exc:  # presence is a hint; the queue works without it
            log.warning("worker registration failed: %s", fault_line(exc))
        except Exception:  # a bug: logged with its traceback, and the worker serves on without presence
            log.warning("worker registration failed", exc_info=True)

    def sweep(self) -> None:
        try:
            if self.worker is not None:
                with self.store.session() as s:
                    touch_worker(s, self.worker)
            with self.store.session() as s:
                stale = requeue_stale(s, self.settings.stale_after_s)
            with self.store.session() as s:
                close_finished_runs(s)  # a run whose last two jobs finished at once was left open
            if stale:
                jobs = self._route(stale)
                log.warning(
                    "reclaimed %d jobs whose lease expired (by the database's clock), re-enqueued first: %s",
                    len(jobs),
                    ", ".join(f"{job_id}->{queue}" for job_id, queue in jobs),
                )
                enqueue(self.app, jobs, first=True)  # ahead of the backlog: they hold committed depths
        except (OperationalError, BrokerUnavailable) as exc:  # the next sweep tries again
            # One line per sweep while the store is away; no traceback storm.
            log.warning(
                "janitor sweep failed, retrying in %g s: %s", self.settings.janitor_s, fault_line(exc)
            )
        except Exception:  # a bug: logged with its traceback; the thread lives on to sweep again
            log.warning("janitor sweep failed", exc_info=True)

    def _route(self, stale: list[tuple[int, str | None]]) -> list[tuple[int, str]]:
        """Each job to its own queue if a live worker reads it, else round-robin over the queues
        live workers read (a dead box's queue would hold the job until that box came back)."""
        default = self.app.conf.task_default_queue
        try:
            live = live_queues(self.app)
        except BrokerUnavailable:
            live = []
        spare = itertools.cycle(live) if live else None
        return [
            (job_id, queue or default)
            if spare is None or (queue or default) in live
            else (job_id, next(spare))
            for job_id, queue in stale
        ]
