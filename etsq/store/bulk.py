"""Bulk writes of one depth's nodes, and of a new run's jobs: one statement per kind of write,
whatever the width or the number of problems.

PostgreSQL: each column travels as one array (psycopg's binary format, `%b`: no text escaping) and
`unnest` turns the arrays back into rows, so the statement text is the same at every width (psycopg
prepares it once per connection) and a depth's 256 nodes are one round trip.
`INSERT ... RETURNING id, path` gives the new ids, matched back by path since RETURNING promises no
order.  The frontier's kept flags are one `UPDATE ... FROM unnest(...)`, a run's jobs one
`INSERT ... SELECT ... FROM unnest(...)` (psycopg's executemany sends one INSERT per row, pipelined:
1.4 of the 4.5 s that storing and enqueueing a 40-run sweep over MATH500 took).
SQLite runs in-process, where executemany costs no round trips; new ids are assigned from the
table's largest id, which is safe because the caller's transaction already holds SQLite's single
write lock (see `insert_nodes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, func, insert, select, update

from etsq.store import schema as m
from etsq.store.statuses import JobStatus


class NodeRow(NamedTuple):
    """One node as stored: every column a depth's insert writes (the database assigns `id`)."""

    job_id: int
    parent_id: int | None
    depth: int
    path: str
    text: str
    step_tokens: int
    cum_tokens: int
    score: float | None
    terminal: bool
    terminal_reason: str | None
    finish_reason: str | None
    answer: str | None


class Mark(NamedTuple):
    """A frontier node's selection outcome, written onto its stored row."""

    id: int
    kept: bool
    n_children: int
    cluster: int | None


NODE_COLUMNS: tuple[str, ...] = NodeRow._fields
# Postgres array types of NodeRow's fields, in field order.
NODE_PG_TYPES = (
    *("int", "bigint", "int", "text", "text", "int", "int"),
    *("float8", "bool", "text", "text", "text"),
)

_PG_INSERT = "INSERT INTO nodes ({}) SELECT * FROM unnest({}) RETURNING id, path".format(
    ", ".join(NODE_COLUMNS), ", ".join(f"%b::{t}[]" for t in NODE_PG_TYPES)
)
_PG_MARK = (
    "UPDATE nodes SET kept = v.kept, n_children = v.n_children, cluster = v.cluster "
    "FROM unnest(%b::bigint[], %b::bool[], %b::int[], %b::int[]) AS v(id, kept, n_children, cluster) "
    "WHERE nodes.id = v.id"
)


# A new job: queued, never attempted, no depth committed (the ORM defaults `m.Job` declares).
_PG_JOBS = (
    "INSERT INTO jobs (run_id, problem_id, queue, status, attempts, depth, created_at) "
    "SELECT %b::int, v.problem_id, v.queue, %b::text, 0, 0, %b::timestamptz "
    "FROM unnest(%b::int[], %b::text[]) AS v(problem_id, queue)"
)


_NODES = m.Base.metadata.tables["nodes"]
_JOBS = m.Base.metadata.tables["jobs"]
_SQLITE_MARK = (
    update(_NODES)
    .where(_NODES.c.id == bindparam("b_id"))
    .values(kept=bindparam("b_kept"), n_children=bindparam("b_n"), cluster=bindparam("b_cluster"))
)


def _postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def insert_nodes(conn: Connection, rows: Sequence[NodeRow]) -> list[int]:
    """Insert one job's node rows; their new ids, in row order.

    On SQLite the caller must already have written in this transaction (DepthWriter updates the
    job row first): that holds the database's write lock, so the ids read from max(id) stay free.
    """
    if not rows:
        return []
    if _postgres(conn):
        columns = [list(col) for col in zip(*rows, strict=True)]
        by_path = {path: int(i) for i, path in conn.exec_driver_sql(_PG_INSERT, tuple(columns))}
        return [by_path[row.path] for row in rows]
    first = int(conn.execute(select(func.coalesce(func.max(_NODES.c.id), 0))).scalar_one()) + 1
    ids = list(range(first, first + len(rows)))
    conn.execute(
        insert(_NODES),
        [{"id": i, **row._asdict()} for i, row in zip(ids, rows, strict=True)],
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
        [{"b_id": k.id, "b_kept": k.kept, "b_n": k.n_children, "b_cluster": k.cluster} for k in marks],
    )


def insert_jobs(conn: Connection, run_id: int, problem_ids: Sequence[int], queues: Sequence[str]) -> None:
    """A new run's queued jobs, one per problem, the i-th sent to `queues[i]`, in one statement."""
    if not problem_ids:
        return
    if _postgres(conn):
        args = (run_id, JobStatus.QUEUED.value, m.utcnow(), list(problem_ids), list(queues))
        conn.exec_driver_sql(_PG_JOBS, args)
        return
    rows = [{"run_id": run_id, "problem_id": p, "queue": q} for p, q in zip(problem_ids, queues, strict=True)]
    conn.execute(insert(_JOBS), rows)  # the other columns take the ORM's defaults
