"""Talking to the job queue from the client side: enqueue jobs, find live workers, run one locally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from etsq.broker import check_broker
from etsq.errors import BrokerUnavailable
from etsq.settings import Settings

TASK_NAME = "etsq.search_job"


def celery_app(settings: Settings) -> Any:
    from workers.app import make_app

    return make_app(settings)


def broker_url(settings: Settings) -> str:
    """The reachable broker URL; raises BrokerUnavailable (a one-line user error) otherwise."""
    url = settings.resolve_broker_url()
    check_broker(url)
    return url


def enqueue(app: Any, job_ids: list[int], queue: str) -> None:
    try:
        with app.producer_or_acquire() as producer:
            for job_id in job_ids:
                app.send_task(TASK_NAME, args=[job_id], queue=queue, producer=producer)
    except Exception as exc:  # kombu raises many connection error types
        raise BrokerUnavailable(f"cannot enqueue jobs: {exc}") from exc


def live_workers(app: Any, timeout: float = 1.5) -> list[str]:
    replies = app.control.ping(timeout=timeout) or []
    return sorted(name for reply in replies for name in reply)


def worker_env(settings: Settings, broker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ETSQ_HOME=str(settings.home), ETSQ_DATABASE_URL=settings.database_url, ETSQ_BROKER_URL=broker)
    env.update(ETSQ_QUEUE=settings.queue)
    return env


def start_local_worker(settings: Settings, broker: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker in a child process, logging to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cli", "worker", "--pool", "solo", "--loglevel", "INFO"]
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
