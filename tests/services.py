"""Test services: real Redis, PostgreSQL and model servers that the test harness starts and stops.

Tests never assume a server is already running.  Each ``start_*`` call spawns a
private server on a free 127.0.0.1 port as a foreground child process and
returns a handle whose ``stop()`` ends it (terminate, then kill after a
timeout).  Servers also die with the test process (PR_SET_PDEATHSIG), so a
crashed or killed pytest run does not leave them behind, and a data directory
left over from such a run is cleaned up on the next start.  (PDEATHSIG fires
when the *thread* that started the server exits: start servers from the main
thread, e.g. in a fixture, not from a worker thread.)

A PostgreSQL cluster lives in /dev/shm (tmpfs; else $TMPDIR) as
``etsq-pg-<hash of tmpdir>``, its data directory a copy of an initdb template
cached there as ``etsq-pg-template-*`` (built on first use), so a start costs
~0.2 s.  Only the log stays in the caller's tmpdir.

PostgreSQL refuses to run as root; when the tests run as root, initdb and the
postmaster run as an unprivileged account (``$ETSQ_TEST_PG_OSUSER``, else
``postgres``, else ``etsqtest``, created with useradd if missing).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
import redis
from psycopg import sql

from etsq.queue.broker import free_local_port, redis_server_binary

STOP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
PG_SUPERUSER = "etsq"
PG_DEFAULT_DB = "postgres"
_POLL_S = 0.02
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: dlopen after fork is unsafe
_PORT_TAKEN = re.compile(r"could not bind|Address already in use|could not create any TCP")

# Speed over durability against OS crashes, which tests never survive anyway.
# synchronous_commit stays on: with fsync off a commit costs only a write(2)
# (measured: no slower than off), and it keeps committed rows through kill(),
# which fault tests rely on; off lost the last ~75 of 3000 commits.
PG_FAST_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "max_connections": "100",
}


class ServiceError(RuntimeError):
    """A test server could not be found, started or stopped."""


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_LIVE: set[_Stoppable] = set()


@atexit.register
def _stop_all() -> None:
    # Last resort for handles a test forgot to stop.
    for handle in list(_LIVE):
        with contextlib.suppress(Exception):
            handle.stop()


# --------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class OsUser:
    """The account a server runs as (only needed when the tests run as root)."""

    name: str
    uid: int
    gid: int


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: have the kernel SIGKILL the server when the test process dies."""
    # Runs after the uid switch (which would clear the setting), so it sticks.
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _spawn(
    argv: list[str], log: Path, cwd: Path, user: OsUser | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group with output appended to ``log``."""
    parent = os.getpid()
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own group: Ctrl-C in pytest reaches only pytest, which then stops
            # the server in order; kill() can take the whole group down.
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
            env={**_server_env(user), **(env or {})},
            cwd=str(cwd),
            **_user_kwargs(user),
        )


def _user_kwargs(user: OsUser | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _server_env(user: OsUser | None) -> dict[str, str]:
    # PG* variables of the developer's shell must not redirect our servers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if user is not None:
        env["HOME"] = tempfile.gettempdir()
        env["USER"] = env["LOGNAME"] = user.name
    return env


def _end_process(proc: subprocess.Popen[bytes], first: signal.Signals) -> None:
    """Send ``first``; SIGKILL the process group if it has not exited in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(first)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(STOP_TIMEOUT_S)


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


# --------------------------------------------------------------------------
# Redis


@dataclass(eq=False)
class RedisHandle:
    """A private redis-server on 127.0.0.1, run in the foreground by the test process."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a timeout; idempotent."""
        _end_process(self.process, signal.SIGTERM)
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would (fault tests)."""
        _kill_group(self.process)

    def restart(self) -> None:
        """Start a fresh server on the same port (after kill() or stop())."""
        self.stop()
        self.process = _spawn_redis(self.port, self.directory)
        _wait_redis(self)
        _LIVE.add(self)

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(tmpdir: Path) -> RedisHandle:
    """Start a throwaway redis-server (no persistence) under ``tmpdir``."""
    port = free_local_port()
    directory = Path(tmpdir) / f"redis-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    handle = RedisHandle(port, directory, _spawn_redis(port, directory))
    _LIVE.add(handle)
    try:
        _wait_redis(handle)
    except BaseException:
        handle.stop()
        raise
    return handle


def _spawn_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--logfile", "",
    ]  # fmt: skip
    return _spawn(argv, directory / "redis.log", directory)


def _wait_redis(handle: RedisHandle) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise ServiceError(f"redis-server exited early:\n{_log_tail(handle.log)}")
        client = handle.client(socket_connect_timeout=1, socket_timeout=1)
        with contextlib.suppress(redis.RedisError, OSError), client:
            if client.ping():
                return
        time.sleep(_POLL_S)
    raise ServiceError(f"redis-server not ready in {START_TIMEOUT_S} s:\n{_log_tail(handle.log)}")


# --------------------------------------------------------------------------
# PostgreSQL: binaries and the OS account


def postgres_bindir() -> Path:
    """Directory with ``initdb`` and ``postgres``: Debian's, else pgserver's, else PATH's."""
    for candidate in _bindir_candidates():
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    raise ServiceError(
        "PostgreSQL server binaries not found: `apt-get install postgresql` "
        "(or `pip install pgserver`), or set ETSQ_PG_BINDIR to a directory with initdb"
    )


def _bindir_candidates() -> list[Path]:
    candidates = [Path(os.environ["ETSQ_PG_BINDIR"])] if "ETSQ_PG_BINDIR" in os.environ else []
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=_major_version, reverse=True)
    candidates += _pgserver_bindirs()
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    return candidates


def _major_version(bindir: Path) -> float:
    try:
        return float(bindir.parent.name)
    except ValueError:
        return 0.0


def _pgserver_bindirs() -> list[Path]:
    # find_spec avoids importing pgserver, which would do more than we need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "pginstall" / "bin" for loc in spec.submodule_search_locations]


def postgres_os_user() -> OsUser | None:
    """Account to run PostgreSQL as: None when not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("ETSQ_TEST_PG_OSUSER") or _existing_user("postgres") or "etsqtest"
    if _existing_user(name) is None:
        _create_user(name)
    entry = pwd.getpwnam(name)
    return OsUser(name, entry.pw_uid, entry.pw_gid)


def _existing_user(name: str) -> str | None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def _create_user(name: str) -> None:
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    # A parallel test worker may have created it first; only absence is fatal.
    if result.returncode != 0 and _existing_user(name) is None:
        raise ServiceError(f"cannot create OS user {name!r} for PostgreSQL: {result.stderr.strip()}")


# --------------------------------------------------------------------------
# PostgreSQL: the server


@dataclass(eq=False)
class PostgresHandle:
    """A private PostgreSQL cluster on 127.0.0.1 with trust auth for superuser ``etsq``."""

    port: int
    root: Path
    log: Path
    bindir: Path
    os_user: OsUser | None
    process: subprocess.Popen[bytes]
    settings: dict[str, str] = field(default_factory=lambda: dict(PG_FAST_SETTINGS))
    superuser: str = PG_SUPERUSER
    dbname: str = PG_DEFAULT_DB
    startup_s: float = 0.0

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of database ``dbname`` on this server."""
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        """A plain autocommit psycopg connection (for admin statements)."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.superuser,
            dbname=dbname or self.dbname,
            connect_timeout=2,
            autocommit=True,
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy URL."""
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its sessions first."""
        with self.connect() as conn:
            statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(statement.format(sql.Identifier(name)))

    def stop(self) -> None:
        """Fast shutdown (drops client sessions), SIGKILL after a timeout, delete data; idempotent."""
        # SIGTERM would be a "smart" shutdown that waits for every pooled
        # client connection to close; SIGINT disconnects them.
        _end_process(self.process, signal.SIGINT)
        _LIVE.discard(self)
        shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would; data is kept."""
        _kill_group(self.process)

    def restart(self) -> None:
        """Start the server again on the same port and data (crash recovery after kill())."""
        if self.process.poll() is None:
            _end_process(self.process, signal.SIGINT)
        self.process = _spawn_postgres(self)
        _wait_postgres(self)
        _LIVE.add(self)

    def __enter__(self) -> PostgresHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(tmpdir: Path, settings: Mapping[str, str] | None = None) -> PostgresHandle:
    """initdb a fresh cluster for ``tmpdir`` and start it on a free 127.0.0.1 port.

    ``settings`` override PG_FAST_SETTINGS (``-c key=value`` server options).
    """
    started = time.monotonic()
    handle = _new_cluster(Path(tmpdir))
    handle.settings.update(settings or {})
    _LIVE.add(handle)
    try:
        _start_on_free_port(handle)
    except BaseException:
        handle.stop()
        raise
    handle.startup_s = time.monotonic() - started
    return handle


def _new_cluster(tmpdir: Path) -> PostgresHandle:
    user = postgres_os_user()
    root = _cluster_root(tmpdir)
    _guard_not_live(root)
    _sweep_orphans(root.parent)
    _clear_leftover(root)
    root.mkdir(mode=0o700)
    (root / "owner.pid").write_text(f"{os.getpid()}\n")
    if user is not None:
        os.chown(root, user.uid, user.gid)
    tmpdir.mkdir(parents=True, exist_ok=True)
    log = tmpdir / f"postgres-{root.name}.log"
    bindir = postgres_bindir()
    handle = PostgresHandle(0, root, log, bindir, user, _NOT_STARTED)
    _initdb(handle)
    return handle


def _cluster_root(tmpdir: Path) -> Path:
    # Not inside tmpdir: pytest's tmp dirs are 0700 root-only, which the
    # postgres account cannot traverse.  Named after tmpdir so a rerun with
    # the same tmpdir finds (and clears) a crashed run's leftovers.
    digest = hashlib.sha1(f"{tmpdir.resolve()}:{os.geteuid()}".encode()).hexdigest()[:12]
    return _cluster_base() / f"etsq-pg-{digest}"


def _cluster_base() -> Path:
    # tmpfs: creating a cluster's ~1000 files there took 0.05 s against 0.8 s
    # on this machine's disk (ext4 with discard).
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def _sweep_orphans(base: Path) -> None:
    """Clear cluster dirs whose test process died without stopping them (e.g. SIGKILL)."""
    for root in base.glob("etsq-pg-*"):
        owner = _owner_pid(root)
        if owner is not None and not _is_running(owner):
            with contextlib.suppress(ServiceError, OSError):
                _clear_leftover(root)


def _owner_pid(root: Path) -> int | None:
    """Pid of the test process that made ``root``; None while it is being made."""
    with contextlib.suppress(OSError, ValueError):
        if root.name.endswith(".partial"):  # a template build: <name>.<pid>.partial
            return int(root.name.split(".")[-2])
        if not root.name.startswith("etsq-pg-template-"):  # templates are shared
            return int((root / "owner.pid").read_text())
    return None


def _guard_not_live(root: Path) -> None:
    for handle in _LIVE:
        if isinstance(handle, PostgresHandle) and handle.root == root:
            raise ServiceError(f"a PostgreSQL from this test process already uses {root}")


def _clear_leftover(root: Path) -> None:
    """Kill a postmaster left running in ``root`` by a crashed run, then delete ``root``."""
    pid = _postmaster_pid(root / "data")
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # SIGQUIT is PostgreSQL's immediate shutdown: it also ends the backends.
            os.kill(pid, signal.SIGQUIT)
        _wait_pid_gone(pid, STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        raise ServiceError(f"cannot remove leftover PostgreSQL directory {root}")


def _postmaster_pid(datadir: Path) -> int | None:
    """Pid from postmaster.pid if that process is still a running postgres."""
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"postgres" in cmdline else None


def _wait_pid_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _is_running(pid):
        time.sleep(_POLL_S)


def _is_running(pid: int) -> bool:
    # A zombie (dead, waiting for a reaper) has an empty cmdline.
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


class _NotStarted:
    """Placeholder process before the first start; behaves as already exited."""

    pid = -1

    def poll(self) -> int:
        return 0


_NOT_STARTED: Any = _NotStarted()


def _initdb(handle: PostgresHandle) -> None:
    """Give ``handle`` a fresh data directory: a copy of a cached initdb template."""
    # initdb costs ~0.6-1.5 s here, a copy ~0.1 s; the template is built once
    # per machine (per PostgreSQL build and OS user) and reused by every run.
    template = _template(handle.bindir, handle.os_user)
    _run_as(["cp", "-a", str(template), str(handle.datadir)], handle.os_user, handle.root)


def _template(bindir: Path, user: OsUser | None) -> Path:
    uid = os.geteuid() if user is None else user.uid
    build = f"{bindir.resolve()}:{(bindir / 'postgres').stat().st_mtime_ns}:{PG_SUPERUSER}:wal1"
    digest = hashlib.sha1(build.encode()).hexdigest()[:12]
    template = _cluster_base() / f"etsq-pg-template-{digest}-{uid}"
    if not template.exists():
        _build_template(template, bindir, user)
    if template.stat().st_uid != uid:
        raise ServiceError(f"{template} is not owned by uid {uid}; remove it")
    return template


def _build_template(template: Path, bindir: Path, user: OsUser | None) -> None:
    # Build aside, then rename: the template path only ever names a complete
    # cluster, even with parallel test workers racing to build it.
    partial = template.with_name(f"{template.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    argv = [
        str(bindir / "initdb"),
        "-D", str(partial),
        "-U", PG_SUPERUSER,
        "--auth=trust",
        "--no-sync",
        "--encoding=UTF8",
        "--locale=C",
        # 1 MiB WAL segments instead of 16: less to copy per start.
        "--wal-segsize=1",
    ]  # fmt: skip
    _run_as(argv, user, Path(tempfile.gettempdir()))
    try:
        partial.rename(template)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another worker won the race


def _run_as(argv: list[str], user: OsUser | None, cwd: Path) -> None:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        cwd=str(cwd),
        env=_server_env(user),
        **_user_kwargs(user),
    )
    if result.returncode != 0:
        raise ServiceError(f"{Path(argv[0]).name} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def _start_on_free_port(handle: PostgresHandle, attempts: int = 3) -> None:
    # Another process may grab the port between our pick and the bind; retry.
    for attempt in range(attempts):
        handle.port = free_local_port()
        handle.process = _spawn_postgres(handle)
        try:
            _wait_postgres(handle)
            return
        except ServiceError:
            if attempt + 1 == attempts or not _PORT_TAKEN.search(_log_tail(handle.log, 5)):
                raise


def _spawn_postgres(handle: PostgresHandle) -> subprocess.Popen[bytes]:
    argv = [str(handle.bindir / "postgres"), "-D", str(handle.datadir), "-p", str(handle.port)]
    for key, value in handle.settings.items():
        argv += ["-c", f"{key}={value}"]
    return _spawn(argv, handle.log, handle.root, handle.os_user)


def _wait_postgres(handle: PostgresHandle) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise ServiceError(f"postgres exited early:\n{_log_tail(handle.log)}")
        with contextlib.suppress(psycopg.OperationalError):
            handle.connect().close()
            return
        time.sleep(_POLL_S)
    raise ServiceError(f"postgres not ready in {START_TIMEOUT_S} s:\n{_log_tail(handle.log)}")


# --------------------------------------------------------------------------
# HTTP model servers (the SGLang stand-in, vLLM)


@dataclass(eq=False)
class HttpServiceHandle:
    """An HTTP server process on 127.0.0.1 that is ready once ``health_path`` answers 200."""

    name: str
    argv: list[str]  # the command, with "{port}" where the port goes
    port: int
    directory: Path
    health_path: str
    start_timeout: float
    env: dict[str, str] = field(default_factory=dict)
    process: Any = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> None:
        started = time.monotonic()
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        self.process = _spawn(argv, self.log, self.directory, env=self.env)
        _LIVE.add(self)
        _wait_http(self)
        self.startup_s = time.monotonic() - started

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the process group after a timeout; idempotent."""
        if self.process is not None:
            _end_process(self.process, signal.SIGTERM)
            if self.process.poll() is not None:
                _kill_group(self.process)  # helpers the server started (vLLM's engine core)
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the server and everything it started, as a crash would (fault tests)."""
        _kill_group(self.process)

    def restart(self) -> None:
        """Start the server again on the same port (after kill() or stop())."""
        self.stop()
        self.start()

    def __enter__(self) -> HttpServiceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http_service(
    name: str,
    argv: list[str],
    tmpdir: Path,
    health_path: str = "/health",
    start_timeout: float = START_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> HttpServiceHandle:
    """Start ``argv`` ("{port}" replaced by a free port) and wait until its health check answers."""
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    handle = HttpServiceHandle(
        name, argv, free_local_port(), directory, health_path, start_timeout, dict(env or {})
    )
    try:
        handle.start()
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_http(handle: HttpServiceHandle) -> None:
    import httpx

    deadline = time.monotonic() + handle.start_timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise ServiceError(f"{handle.name} exited early:\n{_log_tail(handle.log, 30)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(handle.url + handle.health_path, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise ServiceError(f"{handle.name} not ready in {handle.start_timeout} s:\n{_log_tail(handle.log, 30)}")
