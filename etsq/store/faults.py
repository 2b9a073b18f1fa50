"""Which database errors are the user's to fix, and which are etsq's bugs.

A user's database fault is operational: the server cannot be reached or refuses the login, the file
cannot be opened, it is locked past the busy timeout, the disk is full, the file or the server is
read-only, permission is denied, or the file is not a (sound) database.  The CLI shows it as one
`etsq: error: database: ...` line.  Everything else (an `IntegrityError`, a `ProgrammingError`, a
`DataError`, SQLite's "no such table" or a syntax error, which it also raises as `OperationalError`)
is a bug in etsq and keeps its traceback.

The drivers say which by code, not by exception class alone: SQLite's result code
(`sqlite3.Error.sqlite_errorcode`) and PostgreSQL's SQLSTATE (`psycopg.Error.sqlstate`, None for a
connection that failed before the server answered).
"""

from __future__ import annotations

import sqlite3

import psycopg
from sqlalchemy.exc import DBAPIError, NoSuchModuleError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# SQLite primary result codes (sqlite.org/rescode.html): PERM 3, BUSY 5, LOCKED 6, READONLY 8,
# IOERR 10, CORRUPT 11, FULL 13, CANTOPEN 14, NOTADB 26.
_SQLITE_CODES = frozenset({3, 5, 6, 8, 10, 11, 13, 14, 26})

# PostgreSQL SQLSTATE classes (postgresql.org/docs/current/errcodes-appendix.html): 08 connection
# exception, 28 invalid authorization, 3D invalid catalog name (no such database), 53 insufficient
# resources (disk full, out of memory, too many connections), 57 operator intervention (shutdown,
# cannot connect now), 58 system error (I/O error).
_PG_CLASSES = frozenset({"08", "28", "3D", "53", "57", "58"})
# ... and single states: permission denied, a read-only (standby) transaction, lock not available.
_PG_STATES = frozenset({"42501", "25006", "55P03"})


def user_fault(exc: BaseException) -> bool:
    """Whether `exc`, raised by SQLAlchemy, is an operational fault the user can fix (see above)."""
    if isinstance(exc, (PoolTimeout, NoSuchModuleError)):  # pool exhausted; a URL naming no dialect
        return True
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_CODES
    if isinstance(orig, psycopg.Error):
        if orig.sqlstate is None:  # no answer from the server: refused, unreachable, timed out
            return isinstance(orig, psycopg.OperationalError)
        return orig.sqlstate[:2] in _PG_CLASSES or orig.sqlstate in _PG_STATES
    return False
