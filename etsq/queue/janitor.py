"""The janitor: a thread in every worker that queues again the jobs of workers that died.

A running job's worker refreshes its heartbeat; a job whose heartbeat is older than
ETSQ_STALE_AFTER_S goes back to 'queued' and is enqueued again, so a worker killed with -9
loses nothing and needs no command to recover.  The janitor also keeps its worker's registration
(`etsq.store.workers`) fresh: registered at start, seen at each sweep, removed when it stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from etsq.queue.messages import enqueue
from etsq.settings import Settings
from etsq.store.jobs import requeue_stale
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
        except Exception:  # presence is a hint; the queue works without it
            log.warning("worker registration failed", exc_info=True)

    def sweep(self) -> None:
        try:
            if self.worker is not None:
                with self.store.session() as s:
                    touch_worker(s, self.worker)
            with self.store.session() as s:
                stale = requeue_stale(s, self.settings.stale_after_s)
            if stale:
                log.warning("re-enqueueing %d jobs of dead workers: %s", len(stale), [j for j, _ in stale])
                default = self.app.conf.task_default_queue
                enqueue(self.app, [(job_id, queue or default) for job_id, queue in stale])
        except Exception:  # the next sweep tries again
            log.warning("janitor sweep failed", exc_info=True)
