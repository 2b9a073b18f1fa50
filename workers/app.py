"""The Celery application: broker from ETSQ_BROKER_URL (or the embedded Redis), reliable delivery."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from etsq.settings import Settings

# A job may run for a long time; Redis redelivers unacked messages after this many seconds,
# so it must exceed the job time limit or a running job would be handed out twice.
JOB_TIME_LIMIT = int(os.environ.get("ETSQ_JOB_TIME_LIMIT", "7200"))


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("etsq", include=["workers.tasks"])
    app.conf.update(
        broker_url=settings.resolve_broker_url(),
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_time_limit=JOB_TIME_LIMIT + 60,
        task_soft_time_limit=JOB_TIME_LIMIT,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": JOB_TIME_LIMIT + 300},
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = make_app()


@signals.worker_shutting_down.connect
def _stop_after_current_depth(**_: Any) -> None:
    # Warm shutdown (SIGTERM): the job in hand commits its depth, then goes back to the queue.
    from etsq.jobs import STOP

    STOP.set()


@signals.worker_ready.connect
def _start_janitor(sender: Any = None, **_: Any) -> None:
    from etsq.queue import Janitor

    worker_app = getattr(sender, "app", None) or app  # the app `etsq worker` built, with its queue
    interval = float(os.environ.get("ETSQ_JANITOR_S", "30"))
    Janitor(
        worker_app, Settings.from_env().database_url, worker_app.conf.task_default_queue, interval
    ).start()
