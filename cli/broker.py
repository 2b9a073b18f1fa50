"""`etsq broker status|stop`: the Redis broker etsq uses, and stopping the embedded one."""

from __future__ import annotations

from typing import Any

import click

from cli.app import pass_settings, print_json
from etsq.settings import Settings


@click.group()
def broker() -> None:
    """The broker: show it, or stop the embedded Redis etsq started under ETSQ_HOME.

    \b
    Examples:
      etsq broker status
      etsq broker status --json
      etsq broker stop           # the queue is kept on disk; the next command starts it again
    """


@broker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_settings
def broker_status(settings: Settings, as_json: bool) -> None:
    """Where the broker is, whether it answers, and the messages waiting per queue; starts nothing.

    \b
    Example:
      etsq broker status --json
    """
    from etsq.queue.broker import broker_status as status_of

    status = status_of(settings)
    if as_json:
        print_json(status)
    else:
        click.echo(_describe(status))


def _describe(status: dict[str, Any]) -> str:
    kind = "embedded Redis" if status["embedded"] else "broker"
    where = status["url"] or "(never started)"
    if not status["running"]:
        return f"{kind} {where}: {status['error']}"
    pid = f", pid {status['pid']}" if status.get("pid") else ""
    queued = ", ".join(f"{name} {n}" for name, n in status["queued"].items()) or "none"
    return f"{kind} {where}: running{pid}; messages waiting: {queued}"


@broker.command("stop")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_settings
def broker_stop(settings: Settings, as_json: bool) -> None:
    """Stop the embedded Redis (after writing its queue to disk); workers reconnect when it restarts.

    \b
    Example:
      etsq broker stop
    """
    from etsq.queue.broker import stop_broker

    stopped = stop_broker(settings)
    if as_json:
        print_json({"stopped": stopped})
    else:
        click.echo("embedded Redis stopped" if stopped else "embedded Redis was not running")
