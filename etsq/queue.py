"""The job queue from the client side: enqueue jobs, find live workers and their queues, resume."""

from __future__ import annotations

from typing import Any

from etsq.errors import BrokerUnavailable
from etsq.jobs import requeue_stale
from etsq.runs import queued_jobs
from etsq.settings import Settings

TASK_NAME = "etsq.search_job"


def enqueue(app: Any, jobs: list[tuple[int, str]]) -> None:
    """Send one task per (job id, queue); duplicates are harmless (a claim takes a job once)."""
    try:
        with app.producer_or_acquire() as producer:
            for job_id, queue in jobs:
                app.send_task(TASK_NAME, args=[job_id], queue=queue, producer=producer)
    except Exception as exc:  # kombu raises many connection error types
        raise BrokerUnavailable(f"cannot enqueue jobs: {exc}") from exc


def live_workers(app: Any, timeout: float = 1.5) -> list[str]:
    replies = app.control.ping(timeout=timeout) or []
    return sorted(name for reply in replies for name in reply)


def live_queues(app: Any, timeout: float = 1.5) -> list[str]:
    """Queues that live workers consume, sorted: where submit spreads a run's jobs."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    names = {q["name"] for queues in replies.values() for q in queues}
    return sorted(name for name in names if not name.endswith("pidbox"))


def target_queues(app: Any, requested: str | None, default: str) -> list[str]:
    """The queue asked for, else every queue with a live worker, else the default queue."""
    if requested:
        return [requested]
    return live_queues(app) or [default]


def resume(app: Any, settings: Settings, run_id: int) -> int:
    """Enqueue every job of the run that is waiting or whose worker died; returns the count."""
    url = settings.database_url
    requeue_stale(url, settings.stale_after_s, run_id)
    jobs = queued_jobs(url, run_id, settings.queue)
    enqueue(app, jobs)
    return len(jobs)
