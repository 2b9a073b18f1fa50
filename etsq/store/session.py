"""The store seam: one `Store` per database per process, its sessions, and the schema brought to the
newest Alembic revision once.

The command edge (`cli/`, the worker entry) opens the Store from `Settings.database_url`; everything
below it takes the Store (functions that run their own transactions: a claim, a depth commit) or a
`Session` from `store.session()` (functions a caller may compose into one transaction).  Opening a
Store touches nothing: the first session or transaction brings the schema up to date, so a command
that refuses its input before it reads the database creates no database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from functools import cache, cached_property
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Connection, CursorResult, Engine, Executable, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from etsq.errors import UserError

# Postgres advisory-lock key so concurrent `etsq` processes migrate one at a time.
_MIGRATION_LOCK_KEY = 0x657473710001


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets `etsq status` read while a worker writes; busy_timeout waits instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _check_sqlite_file(database: str) -> None:
    """A UserError naming the file unless the SQLite database can be created and written there."""
    path = Path(database).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = (
            "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        )
        raise UserError(f"database {path}: cannot create the directory {path.parent}: {why}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"database {path}: the directory {path.parent} is not writable")
    if path.exists() and (not path.is_file() or not os.access(path, os.R_OK | os.W_OK)):
        raise UserError(f"database {path}: not a readable and writable file")


@cache
def get_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"ETSQ_DATABASE_URL={url!r}: not a database URL") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            _check_sqlite_file(parsed.database)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Store:
    """One database: its Engine, its sessions, and its schema, brought up to date once per process.

    `Store.open(url)` returns this process's Store of `url` (one Engine and connection pool per
    database, shared by every thread).  Nothing is connected or created until the first `session()`
    or `begin()`, which first applies any pending migration (under the migration lock); later ones
    do not check again.
    """

    _open: ClassVar[dict[str, Store]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        self.url = url
        self._schema_lock = threading.Lock()
        self._schema_checked = False

    @classmethod
    def open(cls, url: str) -> Store:
        """This process's Store of `url`."""
        with cls._open_lock:
            store = cls._open.get(url)
            if store is None:
                store = cls._open[url] = cls(url)
            return store

    def exists(self) -> bool:
        """False when the database is a SQLite file not created yet (a server database is taken to
        exist): what a command that must write nothing (`sweep --dry-run`) asks before reading."""
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            return True  # its first session says what is wrong with the URL
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return True
        return str(parsed.database).startswith("file:") or Path(str(parsed.database)).expanduser().exists()

    def ensure_schema(self) -> None:
        """Apply pending migrations, once per process: what every command does before its first read."""
        with self._schema_lock:
            if not self._schema_checked:
                upgrade(self.url)
                self._schema_checked = True

    @property
    def engine(self) -> Engine:
        """The Engine, with the schema up to date."""
        self.ensure_schema()
        return get_engine(self.url)

    @cached_property
    def _sessions(self) -> sessionmaker[Session]:
        return sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AbstractContextManager[Session]:
        """A session whose work is committed on success and rolled back on any error."""
        self.ensure_schema()
        return _scope(self._sessions)

    def begin(self) -> AbstractContextManager[Connection]:
        """A Core connection in a transaction: committed on success, rolled back on any error."""
        return self.engine.begin()

    @classmethod
    def _forget_schema(cls, url: str) -> None:
        """The schema of `url` changed under this process (`upgrade` to another revision)."""
        with cls._open_lock:
            store = cls._open.get(url)
        if store is not None:
            store._schema_checked = False


@contextlib.contextmanager
def _scope(sessions: sessionmaker[Session]) -> Iterator[Session]:
    session = sessions()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def session_scope(url: str) -> AbstractContextManager[Session]:
    """A session on `url` with no schema check: for tools and tests that look at a database at any
    revision (migrations).  Code under the command edge uses a `Store`."""
    return _scope(sessionmaker(get_engine(url), expire_on_commit=False))


def rows_affected(s: Session, stmt: Executable) -> int:
    """Execute an UPDATE or DELETE and return how many rows it changed."""
    result = s.execute(stmt)
    assert isinstance(result, CursorResult), "UPDATE and DELETE return a cursor result"
    return int(result.rowcount or 0)


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).parent


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _head_revision(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


_REVISION = re.compile(r'^(down_)?revision(?:: [^=]+)? = "([^"]*)"', re.MULTILINE)


def _quick_head() -> str | None:
    """The head revision from the migration files' text (a linear chain: the one revision no file
    names as its down_revision), without importing Alembic; None when the files say otherwise."""
    revisions, downs = set(), set()
    for path in (migrations_dir() / "versions").glob("*.py"):
        found = {bool(down): value for down, value in _REVISION.findall(path.read_text())}
        if False not in found:
            return None
        revisions.add(found[False])
        downs.add(found.get(True))
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def _quick_current(url: str) -> str | None:
    """The database's revision by one SELECT; None when it has no version table (or no database)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # the slow path says what is wrong with it
    local = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if local and not Path(str(parsed.database)).expanduser().exists():
        return None
    try:
        with get_engine(url).connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except DBAPIError:
        return None
    return None if row is None else str(row[0])


def is_up_to_date(url: str) -> bool:
    """Whether the database is at the head revision: one SELECT and the migrations' text first (a
    command's start-up must not import Alembic), Alembic itself only when they disagree."""
    head = _quick_head()
    if head is not None and _quick_current(url) == head:
        return True
    return current_revision(url) == _head_revision(url)


@contextlib.contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        lock_path = Path(str(parsed.database) + ".migrate.lock")
        with open(lock_path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
        return
    if parsed.get_backend_name() == "postgresql":
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        return
    yield


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`; a no-op when the schema is current.

    A revision this etsq does not know (a typo, or a database a newer etsq migrated) is a UserError.
    """
    if not revision.strip():
        raise UserError("the revision to upgrade to is empty; give one, or head")
    if revision == "head" and is_up_to_date(url):
        return
    from alembic import command
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    if revision != "head":
        Store._forget_schema(url)
    _check_current_known(url)
    with _migration_lock(url):
        try:
            command.upgrade(alembic_config(url), revision)
        except (CommandError, RevisionError) as exc:
            raise UserError(f"database upgrade to {revision!r}: {' '.join(str(exc).split())}") from None


def _check_current_known(url: str) -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(url))
    current = current_revision(url)
    if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
        raise UserError(
            f"the database is at revision {current!r}, which this etsq does not know: a newer etsq "
            f"migrated it; upgrade etsq (this one knows revisions up to {scripts.get_current_head()})"
        )
