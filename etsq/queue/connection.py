"""A connection to the queue: the broker found (and answering), and the Celery app, built on first
use.  Sending nothing (a resubmission whose jobs all wait already) costs no Celery import."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from etsq.settings import Settings

if TYPE_CHECKING:
    from etsq.queue.app import EtsqCelery


@dataclass(frozen=True)
class Connection:
    """A broker that answered, and the Celery app bound to it (built when first read)."""

    broker_url: str
    settings: Settings  # with broker_url set to the broker found
    embedded: bool  # the broker is etsq's embedded Redis

    @cached_property
    def app(self) -> EtsqCelery:
        from etsq.queue.app import create_app

        return create_app(self.settings)

    def describe(self) -> str:
        from etsq.queue.broker import redact_url

        where = redact_url(self.broker_url)
        return f"the embedded broker ({where})" if self.embedded else f"the broker {where}"


def connect(settings: Settings, queue: str | None = None) -> Connection:
    """The queue's connection; raises BrokerUnavailable (a one-line user error) if the broker is down."""
    from etsq.queue.broker import reachable_broker_url

    broker = reachable_broker_url(settings)
    bound = settings.with_(broker_url=broker, queue=queue)
    return Connection(broker, bound, embedded=settings.uses_embedded_broker)
