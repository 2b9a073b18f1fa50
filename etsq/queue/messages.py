"""The job queue from the client side: enqueue jobs, find live workers and their queues, resume.

Resume sends a message only for the jobs that have none waiting: it reads the queues' Redis lists
(kombu keeps each queue as a list of JSON messages, one list per priority step) and skips the jobs
found there.  After a flushed Redis the lists are empty and every unfinished job is sent again; a
restarted Redis that kept its append-only file still holds its messages and gets no duplicates.
A duplicate that slips through a race is harmless anyway: a claim takes a job once.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from etsq.errors import BrokerUnavailable
from etsq.queue.broker import broker_fault
from etsq.queue.connection import Connection
from etsq.settings import Settings
from etsq.store.jobs import requeue_stale
from etsq.store.runs import queued_jobs, route_jobs
from etsq.store.session import Store
from etsq.store.workers import live_queues as stored_live_queues
from etsq.store.workers import run_queue_name

TASK_NAME = "etsq.search_job"
_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + sep + priority names a priority list
_CHUNK = 1000


def enqueue(app: Any, jobs: list[tuple[int, str]]) -> None:
    """Send one task per (job id, queue); duplicates are harmless (a claim takes a job once)."""
    if not jobs:
        return
    try:
        with app.producer_or_acquire() as producer:
            for job_id, queue in jobs:
                app.send_task(TASK_NAME, args=[job_id], queue=queue, producer=producer)
    except Exception as exc:
        if not broker_fault(exc):
            raise  # a bug: its traceback
        raise BrokerUnavailable(f"cannot enqueue jobs: {_one_line(exc)}") from exc


def live_workers(app: Any, timeout: float = 1.5) -> list[str]:
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception as exc:  # a broker that answers PING may still refuse the broadcast
        if not broker_fault(exc):
            raise  # a bug: its traceback
        raise BrokerUnavailable(f"cannot ask the broker for live workers: {_one_line(exc)}") from exc
    return sorted(name for reply in replies for name in reply)


def live_queues(app: Any, timeout: float = 1.5) -> list[str]:
    """Queues that live workers consume, sorted: where submit spreads a run's jobs."""
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:
        if not broker_fault(exc):
            raise  # a bug: its traceback
        raise BrokerUnavailable(f"cannot ask the broker for live workers: {_one_line(exc)}") from exc
    names = {q["name"] for queues in replies.values() for q in queues}
    return sorted(name for name in names if not name.endswith("pidbox"))


def target_queues(store: Store, settings: Settings, requested: str | None) -> list[str]:
    """The queue asked for, else every queue a live worker (from the database) consumes, else the
    default queue.  No broker round trip: a busy worker is found by its registration."""
    if requested:
        return [requested]
    with store.session() as s:
        return stored_live_queues(s, settings.stale_after_s) or [settings.queue]


def run_queue(settings: Settings, run_id: int) -> str:
    """The queue of one run's jobs while `--wait` serves them with its own local worker."""
    return run_queue_name(settings.queue, run_id)


@dataclass(frozen=True)
class Resumed:
    """What a resume did: jobs sent now, and jobs skipped because a message already waits."""

    enqueued: int
    already_waiting: int


def resume(conn: Connection, store: Store, run_id: int, own_queue: str | None = None) -> Resumed:
    """Enqueue every job of the run that is waiting or whose worker died, unless its message waits.

    `own_queue`: route the run's waiting jobs there and send every one (`--wait`'s local worker
    consumes it; a message left in another queue is a harmless duplicate).  Without it, jobs left on
    an earlier `--wait`'s own queue go back to the shared queues.  The Celery app is built only
    when there is something to send."""
    settings = conn.settings
    with store.session() as s:
        requeue_stale(s, settings.stale_after_s, run_id)
        route_jobs(s, run_id, own_queue, run_queue(settings, run_id))
        jobs = queued_jobs(s, run_id, settings.queue)
    if own_queue is not None:
        if jobs:
            enqueue(conn.app, jobs)
        return Resumed(len(jobs), 0)
    waiting = waiting_job_ids(conn.broker_url, {queue for _, queue in jobs})
    missing = [(job_id, queue) for job_id, queue in jobs if job_id not in waiting]
    if missing:
        enqueue(conn.app, missing)
    return Resumed(len(missing), len(jobs) - len(missing))


def waiting_job_ids(broker_url: str, queues: Iterable[str]) -> set[int]:
    """Ids of the jobs whose search message waits (not yet delivered) in one of `queues`."""
    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=10, socket_connect_timeout=5)
    except ValueError as exc:  # a malformed URL
        raise BrokerUnavailable(f"cannot read the queue: {_one_line(exc)}") from exc
    try:
        return {job_id for queue in queues for job_id in _queued_ids(client, queue)}
    except Exception as exc:
        if not broker_fault(exc):
            raise  # a bug: its traceback
        raise BrokerUnavailable(f"cannot read the queue: {_one_line(exc)}") from exc
    finally:
        client.close()


def _queued_ids(client: redis.Redis, queue: str) -> Iterator[int]:
    for key in [queue, *(f"{queue}{_PRIORITY_SEP}{p}" for p in range(1, 10))]:
        start = 0
        while chunk := client.lrange(key, start, start + _CHUNK - 1):
            for raw in chunk:
                job_id = message_job_id(raw)
                if job_id is not None:
                    yield job_id
            start += _CHUNK


def message_job_id(raw: bytes | str) -> int | None:
    """The job id of one kombu message of the search task (Celery protocol 2), else None."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return int(args[0]) if args and not isinstance(args[0], bool) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None  # another producer's message: not ours to count


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
