"""The one Celery task: search a job, given its id. Idempotent; transient faults retry."""

from __future__ import annotations

import os
from typing import Any

from etsq.errors import TransientError
from etsq.jobs import ShutdownRequested, fail_job
from etsq.queue import TASK_NAME
from etsq.settings import Settings
from etsq.worker import run_job
from workers.app import app


def _max_retries() -> int:
    return int(os.environ.get("ETSQ_JOB_RETRIES", "5"))


def _backoff(retries: int) -> float:
    return min(60.0, float(os.environ.get("ETSQ_RETRY_BACKOFF_S", "2")) * 2**retries)


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def search_job(self: Any, job_id: int) -> str:
    try:
        return run_job(job_id, worker=self.request.hostname)
    except ShutdownRequested:
        # The committed depths stay; a new message lets any worker resume from them.
        queue = (self.request.delivery_info or {}).get("routing_key") or self.app.conf.task_default_queue
        self.app.send_task(TASK_NAME, args=[job_id], queue=queue)
        return "requeued"
    except TransientError as exc:
        if self.request.retries >= _max_retries():
            reason = f"gave up after {self.request.retries} retries: {exc}"
            fail_job(Settings.from_env().database_url, job_id, reason)
            return "failed"
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries))
