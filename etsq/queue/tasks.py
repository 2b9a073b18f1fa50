"""The one Celery task: search a job, given its id.  Idempotent (a claim takes a job once);
transient faults retry with backoff, then the job is recorded as failed with the reason."""

from __future__ import annotations

import logging
from typing import Any

from etsq.errors import TransientError
from etsq.queue.messages import TASK_NAME
from etsq.settings import Settings

__all__ = ["TASK_NAME", "backoff_s", "search_job"]

log = logging.getLogger(__name__)


def backoff_s(settings: Settings, retries: int) -> float:
    """Pause before retry number `retries` + 1: ETSQ_RETRY_BACKOFF_S doubling, at most a minute."""
    return min(60.0, settings.retry_backoff_s * 2.0**retries)


def search_job(task: Any, job_id: int) -> str:
    """The task body (`task` is the bound Celery task; its app carries the Settings)."""
    # Imported here: a command that only sends tasks builds the app but never loads the search.
    from sqlalchemy.exc import OperationalError

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
            try:
                with Store.open(settings.database_url).session() as s:
                    fail_job(s, job_id, reason)
            except OperationalError as lost:  # the store is away too: retry later, not a traceback
                return _retry(task, job_id, TransientError(str(lost.orig)), 60.0)
            return "failed"
        return _retry(task, job_id, exc, backoff_s(settings, task.request.retries))


def _retry(task: Any, job_id: int, exc: Exception, countdown: float) -> str:
    """Retry the job later; when the broker cannot take the retry's message (this box is cut off),
    say so in one line and let the job's lease expire: a janitor requeues it (no traceback)."""
    from celery.exceptions import Reject

    try:
        raise task.retry(exc=exc, countdown=countdown) from exc
    except Reject as lost:
        why = lost.args[0] if lost.args else lost
        log.warning("job %s: its retry could not be queued (%s); a janitor requeues it once its lease "
                    "expires, or `etsq resume` does", job_id, why)  # fmt: skip
        return "released"
