"""Talking to the job queue from the client side: enqueue jobs, find live workers, run one locally."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from etsq.broker import check_broker
from etsq.errors import BrokerUnavailable
from etsq.settings import Settings

TASK_NAME = "etsq.search_job"

log = logging.getLogger(__name__)


def celery_app(settings: Settings) -> Any:
    from workers.app import make_app

    return make_app(settings)


def broker_url(settings: Settings) -> str:
    """The reachable broker URL; raises BrokerUnavailable (a one-line user error) otherwise."""
    url = settings.resolve_broker_url()
    check_broker(url)
    return url


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
    return sorted(
        {q["name"] for queues in replies.values() for q in queues if not q["name"].endswith("pidbox")}
    )


def target_queues(app: Any, requested: str | None, default: str) -> list[str]:
    """The queue asked for, else every queue with a live worker, else the default queue."""
    if requested:
        return [requested]
    return live_queues(app) or [default]


def resume(app: Any, url: str, run_id: int, default_queue: str) -> int:
    """Enqueue every job of the run that is waiting or whose worker died; returns the count."""
    from etsq.jobs import requeue_stale
    from etsq.runs import queued_jobs

    requeue_stale(url, run_id)
    jobs = queued_jobs(url, run_id, default_queue)
    enqueue(app, jobs)
    return len(jobs)


class Janitor(threading.Thread):
    """Runs in every worker: jobs whose worker stopped beating are queued again."""

    def __init__(self, app: Any, url: str, default_queue: str, interval: float) -> None:
        super().__init__(name="etsq-janitor", daemon=True)
        self.app, self.url, self.default_queue, self.interval = app, url, default_queue, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            self.sweep()
            if self.stopped.wait(self.interval):
                return

    def sweep(self) -> None:
        from etsq.jobs import requeue_stale

        try:
            stale = requeue_stale(self.url)
            if stale:
                log.warning("re-enqueueing %d jobs of dead workers: %s", len(stale), [j for j, _ in stale])
                enqueue(self.app, [(job_id, queue or self.default_queue) for job_id, queue in stale])
        except Exception:
            log.warning("janitor sweep failed", exc_info=True)


def worker_env(settings: Settings, broker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ETSQ_HOME=str(settings.home), ETSQ_DATABASE_URL=settings.database_url, ETSQ_BROKER_URL=broker)
    env.update(ETSQ_QUEUE=settings.queue)
    return env


def start_local_worker(settings: Settings, broker: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker in a child process, logging to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=worker_env(settings, broker), stdout=log, stderr=subprocess.STDOUT)


def stop_local_worker(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Warm shutdown (SIGTERM lets the current task finish), then kill if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
