"""Tests of the test services: real Redis and PostgreSQL servers started by the harness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy as sa

from tests.services import (
    _LIVE,
    PostgresHandle,
    RedisHandle,
    ServiceError,
    postgres_bindir,
    postgres_os_user,
    start_postgres,
    start_redis,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisHandle]:
    handle = start_redis(tmp_path)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresHandle]:
    handle = start_postgres(tmp_path_factory.mktemp("pg"))
    yield handle
    handle.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_closed(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _port_open(port):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------
# Redis


def test_redis_set_get_and_flushall(own_redis: RedisHandle) -> None:
    assert own_redis.url == f"redis://127.0.0.1:{own_redis.port}/0"
    with own_redis.client() as client:
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        own_redis.flushall()
        assert client.get("greeting") is None


def test_redis_stop_frees_port_and_is_idempotent(tmp_path: Path) -> None:
    handle = start_redis(tmp_path)
    assert _port_open(handle.port)
    handle.stop()
    handle.stop()
    assert handle.process.returncode is not None
    assert not _port_open(handle.port)


def test_redis_kill_then_restart_on_same_url(own_redis: RedisHandle) -> None:
    url = own_redis.url
    own_redis.kill()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    own_redis.restart()
    assert own_redis.url == url
    assert redis.Redis.from_url(url).ping() is True


# --------------------------------------------------------------------------
# PostgreSQL


def test_postgres_bindir_has_server_binaries() -> None:
    bindir = postgres_bindir()
    assert (bindir / "initdb").is_file()
    assert (bindir / "postgres").is_file()


def test_postgres_runs_unprivileged(own_postgres: PostgresHandle) -> None:
    uid = own_postgres.datadir.stat().st_uid
    assert uid != 0 or os.geteuid() != 0
    if os.geteuid() == 0:
        user = postgres_os_user()
        assert user is not None and uid == user.uid


def test_postgres_sqlalchemy_roundtrip(own_postgres: PostgresHandle) -> None:
    assert own_postgres.url.startswith(f"postgresql+psycopg://etsq@127.0.0.1:{own_postgres.port}/")
    engine = sa.create_engine(own_postgres.url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE roundtrip (id serial PRIMARY KEY, name text)"))
            conn.execute(sa.text("INSERT INTO roundtrip (name) VALUES ('a'), ('b')"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name FROM roundtrip ORDER BY id")).scalars().all()
        assert rows == ["a", "b"]
    finally:
        engine.dispose()


def test_create_database_is_isolated(own_postgres: PostgresHandle) -> None:
    url = own_postgres.create_database("etsq_isolated")
    assert url == own_postgres.url_for("etsq_isolated")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE only_here (x int)"))
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "etsq_isolated"
        with own_postgres.connect() as admin:
            found = admin.execute("SELECT to_regclass('only_here')").fetchone()
        assert found == (None,)
    finally:
        engine.dispose()
        own_postgres.drop_database("etsq_isolated")


def test_create_database_twice_fails(own_postgres: PostgresHandle) -> None:
    own_postgres.create_database("etsq_twice")
    try:
        with pytest.raises(psycopg.errors.DuplicateDatabase):
            own_postgres.create_database("etsq_twice")
    finally:
        own_postgres.drop_database("etsq_twice")


def test_postgres_kill_restart_keeps_committed_rows(tmp_path: Path) -> None:
    with start_postgres(tmp_path) as handle:
        with handle.connect() as conn:
            conn.execute("CREATE TABLE durable (x int)")
            conn.execute("INSERT INTO durable VALUES (42)")
        handle.kill()
        with pytest.raises(psycopg.OperationalError):
            handle.connect().close()
        handle.restart()
        with handle.connect() as conn:
            assert conn.execute("SELECT x FROM durable").fetchall() == [(42,)]
    assert not handle.root.exists()
    assert handle.process.returncode is not None


def test_postgres_stop_removes_data_and_frees_port(tmp_path: Path) -> None:
    handle = start_postgres(tmp_path)
    idle = handle.connect()  # an open client session must not hold up stop()
    started = time.monotonic()
    handle.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    idle.close()
    assert not handle.root.exists()
    assert not _port_open(handle.port)


def test_second_postgres_on_same_tmpdir_is_refused(own_postgres: PostgresHandle) -> None:
    tmpdir = own_postgres.log.parent
    with pytest.raises(ServiceError, match="already uses"):
        start_postgres(tmpdir)
    with own_postgres.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------
# A crashed test process


_CRASHING_HARNESS = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from tests.services import start_postgres, start_redis
    tmp = Path(sys.argv[1])
    r = start_redis(tmp)
    p = start_postgres(tmp)
    print(r.port, p.port, p.root, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_servers_die_with_crashed_harness_and_leftovers_are_cleared(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_HARNESS, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -9, result.stderr
    redis_port, pg_port, root = result.stdout.split()
    assert _wait_closed(int(redis_port))
    assert _wait_closed(int(pg_port))
    assert (Path(root) / "data" / "postmaster.pid").exists()  # the crashed run's leftovers
    with start_postgres(tmp_path / "elsewhere") as handle:
        assert not Path(root).exists()  # swept: its owner process is dead
        with handle.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_restart_on_a_crashed_runs_tmpdir(tmp_path: Path) -> None:
    first = start_postgres(tmp_path)
    first.kill()  # as a crash would: data dir and stale postmaster.pid remain
    _LIVE.discard(first)  # ...and forget it, as a crashed process would
    assert (first.datadir / "postmaster.pid").exists()
    with start_postgres(tmp_path) as second:
        assert second.root == first.root
        with second.connect() as conn:
            assert conn.execute("SELECT to_regclass('pg_class')").fetchone() == ("pg_class",)
