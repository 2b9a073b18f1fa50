"""The one Celery task: search a job, given its id. Idempotent; transient faults retry."""

from __future__ import annotations

from typing import Any

from etsq.errors import TransientError
from etsq.jobs import ShutdownRequested, fail_job
from etsq.queue import TASK_NAME
from etsq.settings import Settings
from etsq.worker import run_job
from workers.app import app

MAX_RETRIES = 5


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=MAX_RETRIES)
def search_job(self: Any, job_id: int) -> str:
    try:
        return run_job(job_id, worker=self.request.hostname)
    except ShutdownRequested:
        # The committed depths stay; a new message lets any worker resume from them.
        queue = (self.request.delivery_info or {}).get("routing_key") or self.app.conf.task_default_queue
        self.app.send_task(TASK_NAME, args=[job_id], queue=queue)
        return "requeued"
    except TransientError as exc:
        if self.request.retries >= MAX_RETRIES:
            fail_job(Settings.from_env().database_url, job_id, f"gave up after {MAX_RETRIES} retries: {exc}")
            return "failed"
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1)))
