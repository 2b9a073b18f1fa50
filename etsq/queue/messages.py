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
from uuid import uuid4

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
# Messages per LPUSH: one command carries a few hundred KB.
PUBLISH_BATCH = 1000


def enqueue(app: Any, jobs: list[tuple[int, str]], first: bool = False) -> None:
    """Send one task per (job id, queue); duplicates are harmless (a claim takes a job once).

    `first` puts the jobs at the head of their queues, ahead of every message waiting there, in
    the order given: what a janitor does with reclaimed jobs, which hold committed depths and
    whose runs wait on them, instead of queueing them behind a sweep's backlog.

    Each message is the one `app.send_task(TASK_NAME, args=[job_id], queue=queue)` leaves in Redis
    (tests compare them), built from one template (`Envelopes`) and pushed `PUBLISH_BATCH` at a time
    by one LPUSH over one connection.  Sending each through Celery and kombu (routing, serialising,
    a pipeline's bookkeeping) cost 2.6 s of a 20,000-job sweep, against its 5 s budget."""
    if not jobs:
        return
    try:
        with app.producer_or_acquire() as producer:
            _declare(app, producer, {queue for _, queue in jobs})
            with producer.channel.conn_or_acquire() as client:
                batches = _batches(jobs, Envelopes(app))
                for queue, payloads in reversed(list(batches)) if first else batches:
                    _push(client, queue, payloads, first)
    except Exception as exc:
        if not broker_fault(exc):
            raise  # a bug: its traceback
        raise BrokerUnavailable(f"cannot enqueue jobs: {_one_line(exc)}") from exc


def _push(client: redis.Redis, queue: str, payloads: list[str], first: bool) -> None:
    # Kombu's consumers BRPOP, taking the right end first: LPUSH queues at the tail, RPUSH at the head.
    if first:
        client.rpush(queue, *reversed(payloads))
    else:
        client.lpush(queue, *payloads)  # in order: a worker pops the oldest first


def _declare(app: Any, producer: Any, queues: set[str]) -> None:
    # What `send_task` declares with every message, once per queue (kombu caches it).
    from kombu.common import maybe_declare

    for name in sorted(queues):
        maybe_declare(app.amqp.queues[name], producer.channel)


def _batches(jobs: list[tuple[int, str]], envelope: Envelopes) -> Iterator[tuple[str, list[str]]]:
    """(queue, up to `PUBLISH_BATCH` messages), each queue's jobs in their order."""
    by_queue: dict[str, list[int]] = {}
    for job_id, queue in jobs:
        by_queue.setdefault(queue, []).append(job_id)
    for queue, ids in by_queue.items():
        for start in range(0, len(ids), PUBLISH_BATCH):
            yield queue, [envelope(job_id, queue) for job_id in ids[start : start + PUBLISH_BATCH]]


class Envelopes:
    """The search task's message for one job, as kombu's Redis transport stores it: Celery's
    protocol-2 headers, properties and JSON body, base64-encoded, in kombu's envelope.

    Celery builds the message once (`task_message`); each job's copy gets its own task id, argument
    and delivery tag.  What kombu adds is what it adds to a `send_task` on the default exchange:
    persistent delivery, priority 0, routed by the queue's name."""

    def __init__(self, app: Any) -> None:
        template = task_message(app, 0)
        self.headers: dict[str, Any] = template.headers
        self.properties: dict[str, Any] = template.properties
        self.embed: dict[str, Any] = template.body[2]  # callbacks, errbacks, chain, chord: none

    def __call__(self, job_id: int, queue: str) -> str:
        task_id = str(uuid4())
        body = json.dumps([[job_id], {}, self.embed]).encode()
        return json.dumps(
            {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {**self.headers, "id": task_id, "root_id": task_id, "argsrepr": f"[{job_id}]"},
                "properties": {
                    **self.properties,
                    "correlation_id": task_id,
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": str(uuid4()),
                },
            }
        )


def task_message(app: Any, job_id: int) -> Any:
    """The Celery protocol-2 message of the search task for one job, field for field what
    `app.send_task(TASK_NAME, args=[job_id])` builds (tests compare them)."""
    return app.amqp.create_task_message(
        str(uuid4()),  # the task id, as Celery's own `uuid()` makes it
        TASK_NAME,
        [job_id],
        {},
        reply_to=app.thread_oid,
        ignore_result=None,  # what send_task passes when the caller sets no ignore_result
        argsrepr=f"[{job_id}]",
        kwargsrepr="{}",
    )


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


def resume(
    conn: Connection,
    store: Store,
    run_id: int,
    own_queue: str | None = None,
    waiting: WaitingJobs | None = None,
) -> Resumed:
    """Enqueue every job of the run that is waiting or whose worker died, unless its message waits.

    `own_queue`: route the run's waiting jobs there and send every one (`--wait`'s local worker
    consumes it; a message left in another queue is a harmless duplicate).  Without it, jobs left on
    an earlier `--wait`'s own queue go back to the shared queues.  `waiting`: the queues' messages as
    read for an earlier run of the same submission.  The Celery app is built only when there is
    something to send."""
    settings = conn.settings
    with store.session() as s:
        requeue_stale(s, settings.stale_after_s, run_id)
        route_jobs(s, run_id, own_queue, run_queue(settings, run_id))
        jobs = queued_jobs(s, run_id, settings.queue)
    if own_queue is not None:
        if jobs:
            enqueue(conn.app, jobs)
        return Resumed(len(jobs), 0)
    waiting = waiting or WaitingJobs(conn.broker_url)
    found = waiting.among({queue for _, queue in jobs})
    missing = [(job_id, queue) for job_id, queue in jobs if job_id not in found]
    if missing:
        enqueue(conn.app, missing)
        waiting.sent(missing)
    return Resumed(len(missing), len(jobs) - len(missing))


class WaitingJobs:
    """The ids of the jobs whose message waits, per queue, each queue read once: a sweep submitted
    again resumes its runs one after another, on the same queues (40 reads of a 20,000-message
    queue took longer than the rest of the sweep)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self._by_queue: dict[str, set[int]] = {}

    def among(self, queues: set[str]) -> set[int]:
        """The waiting job ids of `queues`, read now for those not read before."""
        for queue in sorted(queues - self._by_queue.keys()):
            self._by_queue[queue] = waiting_job_ids(self.broker_url, [queue])
        return set().union(*(self._by_queue[queue] for queue in queues))

    def sent(self, jobs: list[tuple[int, str]]) -> None:
        """Count messages sent since the read, so that a run resumed twice is sent nothing twice."""
        for job_id, queue in jobs:
            if queue in self._by_queue:
                self._by_queue[queue].add(job_id)


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
