"""The one Celery task: search a job, given its id.  Idempotent (a claim takes a job once);
transient faults retry with backoff, then the job is recorded as failed with the reason."""

from __future__ import annotations

from typing import Any

from etsq.errors import TransientError
from etsq.queue.messages import TASK_NAME
from etsq.settings import Settings

__all__ = ["TASK_NAME", "backoff_s", "search_job"]


def backoff_s(settings: Settings, retries: int) -> float:
    """Pause before retry number `retries` + 1: ETSQ_RETRY_BACKOFF_S doubling, at most a minute."""
    return min(60.0, settings.retry_backoff_s * 2.0**retries)


def search_job(task: Any, job_id: int) -> str:
    """The task body (`task` is the bound Celery task; its app carries the Settings)."""
    # Imported here: a command that only sends tasks builds the app but never loads the search.
    from etsq.queue.execute import run_job
    from etsq.store.jobs import ShutdownRequested, fail_job
    from etsq.store.session import Store

    settings: Settings = task.app.settings
    try:
        return run_job(job_id, settings, worker=task.request.hostname)
    except ShutdownRequested:
        # The committed depths stay; a new message lets any worker resume from them.
        queue = (task.request.delivery_info or {}).get("routing_key") or task.app.conf.task_default_queue
        task.app.send_task(TASK_NAME, args=[job_id], queue=queue)
        return "requeued"
    except TransientError as exc:
        if task.request.retries >= settings.job_retries:
            reason = f"gave up after {task.request.retries} retries: {exc}"
            with Store.open(settings.database_url).session() as s:
                fail_job(s, job_id, reason)
            return "failed"
        raise task.retry(exc=exc, countdown=backoff_s(settings, task.request.retries)) from exc
