"""The Celery application, made by a factory: reliable delivery, one task, the worker's signals.

`create_app(settings)` builds an app bound to those settings; `create_app()` (what `celery -A
workers.app` imports) binds `Settings.from_env()` on first use.  Nothing happens at import or at
construction: the broker URL, which may start the embedded Redis, is resolved only when Celery
first reads its configuration (`add_defaults` with a callable is Celery's lazy-config hook).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals

from etsq.queue import tasks
from etsq.queue.janitor import Janitor
from etsq.settings import Settings

TASK_NAME = tasks.TASK_NAME


class EtsqCelery(Celery):
    """A Celery app that carries the etsq `Settings` its tasks run with."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__("etsq", set_as_current=False)
        self._settings = settings
        self._settings_lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        with self._settings_lock:
            if self._settings is None:
                self._settings = Settings.from_env()
            return self._settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """The app's configuration: acks after the job, one job prefetched, time limits from settings."""
    from etsq.queue.broker import resolve_broker_url

    limit = settings.job_time_limit_s
    return {
        "broker_url": resolve_broker_url(settings),
        "task_default_queue": settings.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_time_limit": limit + 60,
        "task_soft_time_limit": limit,
        "broker_connection_retry_on_startup": True,
        # A lost broker is retried for ever (a restarted embedded Redis comes back on its port):
        # kombu waits 2 s, then 2 s longer each time, at most 30 s, and checks for a shutdown each
        # second meanwhile (`etsq worker` also turns off heartbeat events, whose retries do not).
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        # Redis redelivers unacked messages after this many seconds, so it must exceed the job
        # time limit or a running job would be handed out twice.
        "broker_transport_options": {"visibility_timeout": limit + 300},
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def create_app(settings: Settings | None = None) -> EtsqCelery:
    """A configured app; with no settings, they are read from the environment on first use."""
    app = EtsqCelery(settings)
    app.add_defaults(lambda: celery_config(app.settings))
    app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)(
        tasks.search_job
    )
    signals.worker_shutting_down.connect(_stop_after_current_depth, weak=False, dispatch_uid="etsq-stop")
    signals.worker_ready.connect(_start_janitor, weak=False, dispatch_uid="etsq-janitor")
    return app


def _stop_after_current_depth(**_: Any) -> None:
    # Warm shutdown (SIGTERM): the job in hand commits its depth, then goes back to the queue.
    from etsq.queue.execute import STOP

    STOP.set()


def _start_janitor(sender: Any = None, **_: Any) -> None:
    # The worker registers itself (etsq.store.workers) and its janitor keeps the registration fresh.
    app = getattr(sender, "app", None)
    if isinstance(app, EtsqCelery):
        Janitor(app, app.settings, worker=getattr(sender, "hostname", None)).start()
