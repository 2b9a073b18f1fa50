"""Serving jobs: what `etsq worker` does before and while it runs a Celery worker.

A worker may be pinned to one GPU (queue `gpuN`, `CUDA_VISIBLE_DEVICES=N`) and may bring its own
model servers, which serve every run that names a backend but no URL; those servers are checked
before the worker takes a job, so a worker pointed at a dead or wrong server stops at once with one
line instead of failing every job.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from etsq import validation
from etsq.errors import ConfigError
from etsq.models.backends import REMOTE_BACKENDS, check_servers, remote_choices
from etsq.models.config import ModelConfig
from etsq.procs import keep_freed_memory
from etsq.queue.connection import connect
from etsq.settings import Settings
from etsq.store.session import Store

# Problems searched at once: servers need many requests in flight to batch well, while in-process
# models already use every core (and the GPU) for one.
SERVER_CONCURRENCY = 8
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class WorkerOptions:
    """`etsq worker`'s options."""

    gpu: str | None = None
    queue: str | None = None
    concurrency: int | None = None
    loglevel: str = "INFO"
    backend: str | None = None
    policy_url: str | None = None
    prm_url: str | None = None
    prm_family: str = "judge"

    def __post_init__(self) -> None:
        validation.queue_name("--queue", self.queue)
        validation.number("concurrency", self.concurrency)
        if self.gpu is not None and not (self.gpu.isascii() and self.gpu.isdigit()):
            raise ConfigError(f"--gpu must be one GPU index (0, 1, ...), got {self.gpu!r}")
        if self.gpu is not None:
            validation.number("gpu", int(self.gpu))
        validation.choice("--loglevel", self.loglevel.upper(), LOG_LEVELS)

    @property
    def queue_name(self) -> str | None:
        return self.queue or (f"gpu{self.gpu}" if self.gpu is not None else None)


def worker_settings(settings: Settings, opts: WorkerOptions, report: Callable[[str], None]) -> Settings:
    """The settings the worker's tasks run with; its own servers are checked first (and reported)."""
    bound = settings.with_(queue=opts.queue_name, gpu=opts.gpu)
    if not opts.policy_url:
        if opts.backend or opts.prm_url:
            raise ConfigError("--backend and --prm-url need --policy-url")
        return bound
    if opts.backend not in REMOTE_BACKENDS:
        raise ConfigError(f"--policy-url needs {remote_choices()}")
    validation.server_url("--policy-url", opts.policy_url)
    validation.server_url("--prm-url", opts.prm_url)
    bound = bound.with_(policy_url=opts.policy_url, prm_url=opts.prm_url or opts.policy_url)
    models = ModelConfig.create(opts.backend, prm_family=opts.prm_family)
    for line in check_servers(models, bound):
        report(line)
    return bound


def celery_worker_argv(settings: Settings, opts: WorkerOptions) -> list[str]:
    """The `celery worker` arguments: thread pool for concurrency > 1, else one job in-process."""
    concurrency = opts.concurrency or (SERVER_CONCURRENCY if settings.policy_url else 1)
    pool = "threads" if concurrency > 1 else "solo"
    # A unique node name per worker: control replies (ping, active queues) are keyed by it.
    name = f"etsq-{settings.queue}-{os.getpid()}@%h"
    return [
        "worker",
        f"--queues={settings.queue}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--hostname={name}",
        f"--loglevel={opts.loglevel}",
        "--without-gossip",
        "--without-mingle",
        # Heartbeat events are published with unbounded retries from the main loop: with the broker
        # down, that loop never returns to notice a SIGTERM.  Liveness here is `control.ping`.
        "--without-heartbeat",
    ]


def serve(settings: Settings, store: Store, opts: WorkerOptions, report: Callable[[str], None]) -> None:
    """Run a Celery worker until it is shut down (SIGTERM: the job in hand commits, then requeues).

    `store` is the database of `settings`: its schema is brought up to date before anything else, and
    the worker's jobs (`etsq.queue.execute.run_job`) share it, in this process."""
    from etsq.queue import execute  # noqa: F401  # the search, loaded before the first job

    store.ensure_schema()
    keep_freed_memory()  # selects reuse their arrays' pages instead of faulting them in each depth
    bound = worker_settings(settings, opts, report)
    if opts.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = opts.gpu  # read by CUDA itself, in this process
    conn = connect(bound, bound.queue)
    conn.app.worker_main(celery_worker_argv(conn.settings, opts))
