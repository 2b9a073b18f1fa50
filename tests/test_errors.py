"""Errors that point at the right place: a fault of the user's database or broker is one `etsq: error:`
line and exit status 2; a bug (an IntegrityError, a ProgrammingError, a wrong Redis command) keeps its
traceback and exits 1.  Each fault is a real exception of its driver, made here by causing it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import kombu.exceptions
import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from cli.main import cli as etsq_group
from etsq.errors import BrokerUnavailable
from etsq.procs import free_local_port
from etsq.queue.broker import broker_fault
from etsq.queue.messages import waiting_job_ids
from etsq.store.faults import user_fault
from tests.helpers import cli, one_error_line
from tests.services import RedisHandle


def _table(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x BLOB)")
        conn.execute("INSERT INTO t VALUES (1, x'00')")


def _raised(run: Callable[[], object]) -> Exception:
    try:
        run()
    except Exception as exc:
        return exc
    raise AssertionError("no error was raised")


def _write(url: str, sql: str) -> Exception:
    def run() -> None:
        with create_engine(url).begin() as conn:
            conn.exec_driver_sql(sql)

    return _raised(run)


def _locked(tmp: Path) -> Exception:
    _table(tmp / "f.db")
    holder = sqlite3.connect(tmp / "f.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{tmp / 'f.db'}", connect_args={"timeout": 0})
    try:
        return _raised(lambda: engine.connect().exec_driver_sql("SELECT * FROM t").all())
    finally:
        holder.close()


def _disk_full(tmp: Path) -> Exception:
    _table(tmp / "f.db")
    engine = create_engine(f"sqlite:///{tmp / 'f.db'}")

    def fill() -> None:
        with engine.begin() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()
            conn.exec_driver_sql(f"PRAGMA max_page_count={pages}")
            conn.exec_driver_sql("INSERT INTO t VALUES (2, zeroblob(1000000))")

    return _raised(fill)


def _read_only(tmp: Path) -> Exception:
    _table(tmp / "f.db")
    return _write(f"sqlite:///file:{tmp / 'f.db'}?mode=ro&uri=true", "INSERT INTO t VALUES (2, NULL)")


def _cannot_open(tmp: Path) -> Exception:
    return _raised(lambda: create_engine(f"sqlite:///{tmp / 'no' / 'such' / 'f.db'}").connect())


def _integrity(tmp: Path) -> Exception:
    _table(tmp / "f.db")
    return _write(f"sqlite:///{tmp / 'f.db'}", "INSERT INTO t VALUES (1, NULL)")


def _no_such_table(tmp: Path) -> Exception:
    _table(tmp / "f.db")  # sqlite3 raises this bug as an OperationalError
    engine = create_engine(f"sqlite:///{tmp / 'f.db'}")
    return _raised(lambda: engine.connect().exec_driver_sql("SELECT * FROM jobz").all())


def _programming(tmp: Path) -> Exception:
    _table(tmp / "f.db")
    engine = create_engine(f"sqlite:///{tmp / 'f.db'}")
    return _raised(lambda: engine.connect().exec_driver_sql("SELECT ?", ("a", "b")).all())


USER_FAULTS = {
    "locked": (_locked, "database is locked"),
    "disk full": (_disk_full, "database or disk is full"),
    "read-only": (_read_only, "readonly database"),
    "cannot open": (_cannot_open, "unable to open database file"),
}
BUGS = {
    "integrity": (_integrity, IntegrityError),
    "no such table": (_no_such_table, OperationalError),
    "programming": (_programming, ProgrammingError),
}


def _status_raising(monkeypatch: pytest.MonkeyPatch, exc: Exception, tmp: Path) -> Result:
    def fail(*_: object) -> None:
        raise exc

    monkeypatch.setattr("etsq.store.runs.statuses", fail)
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp / 'etsq.store'}", "ETSQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    return CliRunner().invoke(etsq_group, ["status"], env=env, catch_exceptions=True)


@pytest.mark.parametrize("fault", sorted(USER_FAULTS))
def test_an_operational_database_fault_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    make, says = USER_FAULTS[fault]
    exc = make(tmp_path)
    assert user_fault(exc), exc
    line = one_error_line(_status_raising(monkeypatch, exc, tmp_path))
    assert line.startswith("etsq: error: database: ") and says in line


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_database_bug_keeps_its_traceback_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: str
) -> None:
    make, kind = BUGS[bug]
    exc = make(tmp_path)
    assert isinstance(exc, kind) and not user_fault(exc), exc
    result = _status_raising(monkeypatch, exc, tmp_path)
    assert result.exit_code == 1 and result.exception is exc
    assert "etsq: error" not in result.stderr


def test_a_read_only_database_is_one_line(tmp_path: Path) -> None:
    """No stand-in: a write to a database opened read-only."""
    url = f"sqlite:///{tmp_path / 'e.db'}"
    data = Path(__file__).parent / "data" / "reference_small.json"
    imported = cli(
        "import",
        str(data),
        "--dataset",
        "mine",
        "--method",
        "ets",
        "--width",
        "4",
        env={"ETSQ_DATABASE_URL": url},
    )
    assert imported.exit_code == 0, imported.stderr
    env = {"ETSQ_DATABASE_URL": f"sqlite:///file:{tmp_path / 'e.db'}?mode=ro&uri=true"}
    assert "attempt to write a readonly database" in one_error_line(cli("cancel", "1", env=env))


def test_a_closed_postgres_port_is_one_line(tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": f"postgresql+psycopg://etsq@127.0.0.1:{free_local_port()}/etsq"}
    line = one_error_line(cli("status", env=env))
    assert line.startswith("etsq: error: database: connection failed") and "refused" in line


# --------------------------------------------------------------------------- the broker


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        redis.TimeoutError("Timeout reading from socket"),
        redis.exceptions.AuthenticationError("invalid username-password pair"),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis.ResponseError(
            "Error running script (call to f_ef7a): @user_script:2: @user_script: 2: "
            "-NOREPLICAS Not enough good replicas to write."
        ),
        kombu.exceptions.OperationalError("[Errno 111] Connection refused"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
    ids=repr,
)
def test_broker_and_network_faults_are_the_users(exc: Exception) -> None:
    assert broker_fault(exc)


@pytest.mark.parametrize(
    "exc",
    [
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.ResponseError("ERR unknown command 'LRANG'"),
        kombu.exceptions.EncodeError("Object of type set is not JSON serializable"),
        TypeError("send_task() got an unexpected keyword argument"),
        KeyError("queue"),
        PermissionError(13, "Permission denied"),
    ],
    ids=repr,
)
def test_other_kombu_and_redis_errors_are_bugs(exc: Exception) -> None:
    assert not broker_fault(exc)


def test_a_closed_broker_port_is_unavailable_and_a_wrong_key_type_is_a_bug(redis_server: RedisHandle) -> None:
    with pytest.raises(BrokerUnavailable, match="cannot read the queue"):
        waiting_job_ids(f"redis://127.0.0.1:{free_local_port()}/0", ["etsq"])
    with redis_server.client() as client:
        client.set("not-a-list", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        waiting_job_ids(redis_server.url, ["not-a-list"])


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (redis.ConnectionError("Error 111 connecting: Connection refused."), 2),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), 1),
    ],
    ids=["broker fault", "bug"],
)
def test_an_enqueue_that_fails_leaves_no_run(
    tmp_path: Path, redis_server: RedisHandle, monkeypatch: pytest.MonkeyPatch, exc: Exception, code: int
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise exc

    monkeypatch.setattr("redis.Redis.lpush", fail)  # what every message goes through
    env = {
        "ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'etsq.store'}",
        "ETSQ_BROKER_URL": redis_server.url,
        "ETSQ_QUEUE": f"q-{tmp_path.name[-20:]}",
    }
    args = ["submit", "gsm8k", "--backend", "sim", "--limit", "2"]
    result = CliRunner().invoke(etsq_group, args, env=env, catch_exceptions=True)
    if code == 2:
        assert "cannot enqueue jobs" in one_error_line(result)
    else:
        assert result.exit_code == 1 and result.exception is exc
    with sqlite3.connect(tmp_path / "etsq.store") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
