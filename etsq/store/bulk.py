"""Bulk writes of one depth's nodes: one statement per kind of write, whatever the width.

PostgreSQL: each column travels as one array (psycopg's binary format, `%b`: no text escaping) and
`unnest` turns the arrays back into rows, so the statement text is the same at every width (psycopg
prepares it once per connection) and a depth's 256 nodes are one round trip.
`INSERT ... RETURNING id, path` gives the new ids, matched back by path since RETURNING promises no
order.  The frontier's kept flags are one `UPDATE ... FROM unnest(...)`.
SQLite runs in-process, where executemany costs no round trips; new ids are assigned from the
table's largest id, which is safe because the caller's transaction already holds SQLite's single
write lock (see `insert_nodes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from etsq.store import schema as m

# One node row: the values of these columns, in this order.
NODE_COLUMNS = (
    "job_id",
    "parent_id",
    "depth",
    "path",
    "text",
    "step_tokens",
    "cum_tokens",
    "score",
    "terminal",
    "terminal_reason",
    "finish_reason",
    "answer",
)
_PG_TYPES = ("int", "bigint", "int", "text", "text", "int", "int", "float8", "bool", "text", "text", "text")

_PG_INSERT = "INSERT INTO nodes ({}) SELECT * FROM unnest({}) RETURNING id, path".format(
    ", ".join(NODE_COLUMNS), ", ".join(f"%b::{t}[]" for t in _PG_TYPES)
)
_PG_MARK = (
    "UPDATE nodes SET kept = v.kept, n_children = v.n_children, cluster = v.cluster "
    "FROM unnest(%b::bigint[], %b::bool[], %b::int[], %b::int[]) AS v(id, kept, n_children, cluster) "
    "WHERE nodes.id = v.id"
)

NodeRow = tuple[Any, ...]  # values in NODE_COLUMNS order
Mark = tuple[int, bool, int, int | None]  # (node id, kept, n_children, cluster)

_NODES = m.Base.metadata.tables["nodes"]
_SQLITE_MARK = (
    update(_NODES)
    .where(_NODES.c.id == bindparam("b_id"))
    .values(kept=bindparam("b_kept"), n_children=bindparam("b_n"), cluster=bindparam("b_cluster"))
)


def _postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def insert_nodes(conn: Connection, rows: Sequence[NodeRow]) -> list[int]:
    """Insert node rows (NODE_COLUMNS order) of one job; their new ids, in row order.

    On SQLite the caller must already have written in this transaction (DepthWriter updates the
    job row first): that holds the database's write lock, so the ids read from max(id) stay free.
    """
    if not rows:
        return []
    if _postgres(conn):
        columns = [list(col) for col in zip(*rows, strict=True)]
        by_path = {path: int(i) for i, path in conn.exec_driver_sql(_PG_INSERT, tuple(columns))}
        path_at = NODE_COLUMNS.index("path")
        return [by_path[row[path_at]] for row in rows]
    first = int(conn.execute(select(func.coalesce(func.max(_NODES.c.id), 0))).scalar_one()) + 1
    ids = list(range(first, first + len(rows)))
    conn.execute(
        insert(_NODES),
        [dict(zip(("id", *NODE_COLUMNS), (i, *row), strict=True)) for i, row in zip(ids, rows, strict=True)],
    )
    return ids


def mark_nodes(conn: Connection, marks: Sequence[Mark]) -> None:
    """Set kept / n_children / cluster of existing nodes, in one statement."""
    if not marks:
        return
    if _postgres(conn):
        conn.exec_driver_sql(_PG_MARK, tuple(list(col) for col in zip(*marks, strict=True)))
        return
    conn.execute(
        _SQLITE_MARK,
        [{"b_id": i, "b_kept": kept, "b_n": n, "b_cluster": cluster} for i, kept, n, cluster in marks],
    )
