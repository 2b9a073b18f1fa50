"""A depth's commit on PostgreSQL as one statement: one round trip to the database, however wide.

Each write of the depth is a data-modifying CTE of one statement (issue 21: a depth's commit was eight
round trips, which a LAN's latency multiplies):
- `fence` updates the job row: it takes the row lock, checks the lease, its generation (the fencing
  token, `jobs.lease_gen`) and that the job is running, and records the depth, the heartbeat and the
  search time (and, at the final depth, the job's end).  Every other write joins `fence`, so a
  fenced commit (no row) writes nothing;
- `new` is the depth's new nodes as arrays (etsq.store.bulk's binary `unnest`); `root` inserts the
  root when it is new (the first depth), `kids` the others, whose parent is that root when their row
  names none (it had no id when the rows were built);
- `marked` writes the kept/pruned marks of stored frontier nodes.  A node stored by this statement
  (the root at depth 0) carries its mark in its insert instead: a CTE cannot see its siblings' rows;
- `step` inserts the selection row; `closed` stamps the run finished at the final depth once no other
  job of it is open (the rule of `etsq.store.jobs.close_run_if_done`).
One statement is atomic by itself, so it is sent on an autocommit connection: with psycopg a BEGIN and
a COMMIT would be a round trip each.  Its text depends only on whether the depth is final, so psycopg
prepares it once per connection (one extra round trip, once).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import JSON, Connection
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from etsq.store import schema as m
from etsq.store.bulk import NODE_COLUMNS, NODE_PG_TYPES, Mark, NodeRow
from etsq.store.clock import db_now
from etsq.store.statuses import FINISHED, JobStatus

# A node's selection outcome when it is decided in the commit that stores it: kept, n_children, cluster.
Decided = tuple[bool, int, int | None]

_PG = PGDialect_psycopg()  # type: ignore[no-untyped-call]  # SQLAlchemy leaves __init__ untyped
_STEP_COLUMNS = m.Base.metadata.tables["selection_steps"].c
_NEW = (*NODE_COLUMNS, "kept", "n_children", "cluster")
_NEW_TYPES = (*NODE_PG_TYPES, "bool", "int", "int")
_MARK_TYPES = ("bigint", "bool", "int", "int")


@dataclass(frozen=True)
class DepthWrite:
    """Everything one depth's commit writes, and the lease it is written under."""

    job_id: int
    lease: str
    generation: int | None  # the claim's fencing token; None checks the lease alone
    depth: int  # jobs.depth once committed
    wall_s: float  # the depth's wall time, added to jobs.search_s
    finish: dict[str, Any]  # the job's end (etsq.store.jobs.finish_values) at the final depth, else empty
    closed_at: datetime  # runs.finished_at, should the final depth close the run
    nodes: Sequence[NodeRow]  # the new nodes, the root (when new) first
    decided: Sequence[Decided | None]  # per new node, its mark when this depth decided on it
    marks: Sequence[Mark]  # the marks of frontier nodes stored at earlier depths
    step: dict[str, Any]  # the selection row


def commit_depth(conn: Connection, write: DepthWrite) -> list[int] | None:
    """Write the depth in one statement (`conn` in autocommit): the new nodes' ids in row order, or
    None when the lease or its generation is no longer the job's (then nothing was written)."""
    sql = _statement(tuple(write.finish), tuple(write.step))
    run_id, ids, paths = conn.exec_driver_sql(sql, _params(write)).one()
    if run_id is None:
        return None
    # RETURNING promises no order: ids are matched back by path, unique within the job.
    by_path = dict(zip(paths or [], ids or [], strict=True))
    return [int(by_path[row.path]) for row in write.nodes]


def _params(write: DepthWrite) -> dict[str, Any]:
    new = [(*row, *(d or (None, None, None))) for row, d in zip(write.nodes, write.decided, strict=True)]
    params: dict[str, Any] = {
        "job_id": write.job_id,
        "lease": write.lease,
        "generation": write.generation,
        "depth": write.depth,
        "wall_s": write.wall_s,
        "closed_at": write.closed_at,
        **{f"finish_{k}": v for k, v in write.finish.items()},
        **_arrays("new", _NEW, new),
        **_arrays("mark", Mark._fields, write.marks),
    }
    for name, value in write.step.items():
        is_json = isinstance(_STEP_COLUMNS[name].type, JSON)
        params[f"step_{name}"] = json.dumps(value) if is_json else value
    return params


def _arrays(prefix: str, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, list[Any]]:
    """One list per column (empty lists when there are no rows), named `<prefix>_<column>`."""
    columns = [list(col) for col in zip(*rows, strict=True)] or [[] for _ in names]
    return {f"{prefix}_{name}": col for name, col in zip(names, columns, strict=True)}


def _unnest(prefix: str, names: Sequence[str], types: Sequence[str]) -> str:
    arrays = ", ".join(f"%({prefix}_{n})b::{t}[]" for n, t in zip(names, types, strict=True))
    return f"unnest({arrays}) AS {prefix}({', '.join(names)})"


@cache
def _statement(finish: tuple[str, ...], step: tuple[str, ...]) -> str:
    """The commit's statement: `finish` names the job's end columns (empty before the final depth),
    `step` the selection row's columns."""
    ctes = [_fence(finish), *_nodes(), _marked(), _step(step)]
    if finish:
        ctes.append(_closed())
    # One row back: the job's run (NULL: fenced) and the stored nodes' ids and paths.
    answer = (
        "SELECT (SELECT run_id FROM fence), array_agg(n.id), array_agg(n.path) "
        "FROM (SELECT id, path FROM root UNION ALL SELECT id, path FROM kids) AS n"
    )
    return "WITH " + ",\n".join(ctes) + "\n" + answer


def _fence(finish: tuple[str, ...]) -> str:
    now = db_now().compile(dialect=_PG)  # the database's clock, as every lease decision reads it
    sets = ["depth = %(depth)s", f"heartbeat_at = {now}", "search_s = coalesce(search_s, 0) + %(wall_s)s"]
    sets += [f"{name} = %(finish_{name})s" for name in finish]
    return (
        f"fence AS (UPDATE jobs SET {', '.join(sets)} "
        f"WHERE id = %(job_id)s AND lease = %(lease)s AND status = '{JobStatus.RUNNING.value}' "
        "AND (%(generation)s::int IS NULL OR lease_gen = %(generation)s::int) RETURNING run_id)"
    )


def _nodes() -> list[str]:
    columns = ", ".join(_NEW)
    # A child of a root stored by this statement names no parent yet: it gets the root's new id.
    kid_values = ", ".join(
        "coalesce(new.parent_id, (SELECT id FROM root))" if c == "parent_id" else f"new.{c}" for c in _NEW
    )
    return [
        f"new AS (SELECT * FROM {_unnest('new', _NEW, _NEW_TYPES)})",
        f"root AS (INSERT INTO nodes ({columns}) SELECT new.* FROM new, fence WHERE new.depth = 0 "
        "RETURNING id, path)",
        f"kids AS (INSERT INTO nodes ({columns}) SELECT {kid_values} FROM new, fence WHERE new.depth > 0 "
        "RETURNING id, path)",
    ]


def _marked() -> str:
    return (
        "marked AS (UPDATE nodes SET kept = mark.kept, n_children = mark.n_children, cluster = mark.cluster "
        f"FROM {_unnest('mark', Mark._fields, _MARK_TYPES)}, fence WHERE nodes.id = mark.id)"
    )


def _step(step: tuple[str, ...]) -> str:
    # Typed by the column: a parameter in a SELECT list has no type of its own to assign from.
    values = ", ".join(f"%(step_{name})s::{_STEP_COLUMNS[name].type.compile(dialect=_PG)}" for name in step)
    return f"step AS (INSERT INTO selection_steps ({', '.join(step)}) SELECT {values} FROM fence)"


def _closed() -> str:
    finished = ", ".join(f"'{status.value}'" for status in sorted(FINISHED))
    # This job is finished by `fence`, whose row the statement's other parts do not see: left out here.
    return (
        "closed AS (UPDATE runs SET finished_at = %(closed_at)s FROM fence WHERE runs.id = fence.run_id "
        "AND NOT EXISTS (SELECT FROM jobs AS other WHERE other.run_id = fence.run_id "
        f"AND other.id <> %(job_id)s AND other.status NOT IN ({finished})))"
    )
