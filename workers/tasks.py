"""The one Celery task: search a job, given its id. Idempotent; transient faults retry."""

from __future__ import annotations

from typing import Any

from etsq.errors import TransientError
from etsq.jobs import fail_job
from etsq.settings import Settings
from etsq.worker import run_job
from workers.app import app

MAX_RETRIES = 5


@app.task(name="etsq.search_job", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=MAX_RETRIES)
def search_job(self: Any, job_id: int) -> str:
    try:
        return run_job(job_id, worker=self.request.hostname)
    except TransientError as exc:
        if self.request.retries >= MAX_RETRIES:
            fail_job(Settings.from_env().database_url, job_id, f"gave up after {MAX_RETRIES} retries: {exc}")
            return "failed"
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1)))
