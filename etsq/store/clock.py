"""The database's clock: every lease decision (claim, heartbeat, staleness) reads the database's
time, never a worker's, so a box whose clock is off can neither steal a live worker's job (its
"now" would call a fresh heartbeat stale) nor keep a dead worker's job for ever (its heartbeats
would lie in the future).

`db_now()` is the server's current time as a SQL expression, `db_now(-s)` that time `s` seconds
earlier: `statement_timestamp()` on PostgreSQL, SQLite's `strftime(..., 'now')` in the text form
SQLAlchemy stores SQLite datetimes in (so stored and computed times compare as text).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class db_now(FunctionElement[Any]):  # reads as a function in statements
    """The database server's current UTC time, shifted by `offset_s` seconds."""

    type = DateTime(timezone=True)
    inherit_cache = False

    def __init__(self, offset_s: float = 0.0) -> None:
        super().__init__()
        self.offset_s = float(offset_s)


@compiles(db_now)
def _default(element: db_now, compiler: Any, **kw: Any) -> str:  # PostgreSQL and others
    if not element.offset_s:
        return "statement_timestamp()"
    return f"(statement_timestamp() + make_interval(secs => {element.offset_s!r}))"


@compiles(db_now, "sqlite")
def _sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    # '%f' is seconds with milliseconds (SS.SSS); '000' pads to SQLAlchemy's six fraction digits.
    shift = f", '{element.offset_s:+.6f} seconds'" if element.offset_s else ""
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now'{shift})"
