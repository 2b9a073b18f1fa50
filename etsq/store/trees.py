"""A job's search tree in the database: loaded to resume, and stored one depth per transaction.

A depth's commit writes the new nodes, the kept/pruned marks of the frontier, the selection row, the
job's depth and its search time in one transaction, so a job killed at any moment resumes from its
last committed depth with the tree exactly as it was.  A job's search time (`jobs.search_s`) is the
sum of its depths' wall times, each from the end of the previous depth's writes (or from the writer's
start, after the models are loaded) to the end of its own (`selection_steps.wall_ms`, of which the
writes are `commit_ms`): a resumed job does not count its pause, and loading models is not charged
to a job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.orm import Session

from etsq.datasets import Problem
from etsq.errors import PermanentError
from etsq.search.loop import DepthCommit
from etsq.search.tree import Node, Tree
from etsq.store import schema as m
from etsq.store.bulk import Mark, NodeRow, insert_nodes, mark_nodes
from etsq.store.clock import db_now
from etsq.store.depth_pg import Decided, DepthWrite, commit_depth
from etsq.store.jobs import LeaseFenced, ShutdownRequested, close_run_if_done, finish_values
from etsq.store.runs import problem_row, run_row, store_run
from etsq.store.session import Store
from etsq.store.statuses import JobStatus

_JOBS = m.Base.metadata.tables["jobs"]


def load_tree(s: Session, job_id: int) -> tuple[Tree, int] | None:
    """The job's stored tree and the depth to resume at; None when nothing is stored."""
    rows = s.scalars(select(m.Node).where(m.Node.job_id == job_id).order_by(m.Node.depth, m.Node.id)).all()
    if not rows:
        return None
    root = rows[0]
    tree = Tree(root.text, root.step_tokens)
    _fill(tree.root, root)
    by_db_id = {root.id: 0}
    for row in sorted(rows[1:], key=lambda r: (r.depth, _path_key(r.path))):
        parent = tree.nodes[by_db_id[row.parent_id]]  # type: ignore[index]
        node = tree.add_child(parent.idx, row.text, row.step_tokens)
        if node.path != row.path:
            raise PermanentError(
                f"job {job_id}: stored node {row.path} does not match its rebuilt path {node.path}"
            )
        _fill(node, row)
        by_db_id[row.id] = node.idx
    return tree, max(r.depth for r in rows)


def _path_key(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in path.split("."))


def _fill(node: Node, row: m.Node) -> None:
    node.score, node.terminal, node.terminal_reason = row.score, row.terminal, row.terminal_reason
    node.finish_reason, node.answer, node.db_id = row.finish_reason, row.answer, row.id
    node.kept, node.n_children, node.cluster = row.kept, row.n_children, row.cluster


def _node_row(job_id: int, tree: Tree, node: Node) -> NodeRow:
    parent = tree.nodes[node.parent].db_id if node.parent is not None else None
    return NodeRow(
        job_id=job_id,
        parent_id=parent,
        depth=node.depth,
        path=node.path,
        text=node.text,
        step_tokens=node.tokens,
        cum_tokens=node.cum_tokens,
        score=node.score,
        terminal=node.terminal,
        terminal_reason=node.terminal_reason,
        finish_reason=node.finish_reason,
        answer=node.answer,
    )


def _selection_row(job_id: int, rec: DepthCommit) -> dict[str, Any]:
    info, server = rec.selection.info, rec.server
    return {
        "job_id": job_id,
        "depth": rec.depth,
        "remaining": rec.remaining,
        "frontier_size": len(rec.frontier),
        "kept_size": len(rec.selection.kept),
        "children": sum(rec.selection.counts.values()),
        "kv_before": rec.kv_before,
        "kv_after": rec.kv_after,
        "select_ms": rec.select_ms,
        "expand_ms": rec.expand_ms,
        "score_ms": rec.score_ms,
        "n_clusters": info.get("n_clusters"),
        "ilp_vars": info.get("ilp_vars"),
        "ilp_constraints": info.get("ilp_constraints"),
        "ilp_objective": info.get("ilp_objective"),
        "solver": info.get("solver"),
        "solve_ms": info.get("solve_ms"),
        "server_kv_tokens": server.get("kv_tokens"),
        "server_kv_usage": server.get("kv_usage"),
        "server_cache_hit_rate": server.get("cache_hit_rate"),
        "cached_prompt_tokens": server.get("cached_prompt_tokens"),
        "prompt_tokens": server.get("prompt_tokens"),
        "info": _info(info, rec),
    }


def _info(info: dict[str, Any], rec: DepthCommit) -> dict[str, Any]:
    """The select step's scalar details, plus the PRM server's own figures (prefixed `prm_`)."""
    out = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool)) or v is None}
    out.update({f"prm_{k}": v for k, v in rec.prm_server.items() if isinstance(v, (int, float)) or v is None})
    if rec.server.get("requests") is not None:
        out["server_requests"] = rec.server["requests"]
    return out


class DepthWriter:
    """The commit callback: persists one DepthCommit atomically, in one round trip on PostgreSQL.

    PostgreSQL: one statement (etsq.store.depth_pg) on an autocommit connection, so with the pool's
    ping a depth costs two round trips.  SQLite (in-process, where a round trip costs nothing): one
    transaction of Core statements, the job row updated first (which takes the write lock and checks
    the lease), then the nodes' insert and the marks' UPDATE (etsq.store.bulk) and the selection row.
    """

    def __init__(
        self,
        store: Store,
        job_id: int,
        lease: str,
        stop: threading.Event | None = None,
        generation: int | None = None,
    ) -> None:
        self.store, self.job_id, self.lease = store, job_id, lease
        self.generation = generation  # the claim's fencing token (jobs.lease_gen)
        self.stop = stop or threading.Event()  # set: stop after the depth in hand (worker shutdown)
        self.since = time.perf_counter()  # the depth in hand's wall time is counted from here

    def __call__(self, tree: Tree, rec: DepthCommit) -> None:
        self.since = self._commit(tree, rec)
        if self.stop.is_set() and not rec.final:
            raise ShutdownRequested(f"job {self.job_id}: worker shutting down after depth {rec.depth}")

    def _commit(self, tree: Tree, rec: DepthCommit) -> float:
        """Write the depth; returns the moment its wall time was taken (the next depth's start).

        The depth's wall time runs from the previous depth's mark to the end of its own writes as
        the worker sees them, so `jobs.search_s` (their sum) counts each commit, and the selection
        row holds that share as `commit_ms` beside `wall_ms`; what follows the mark (PostgreSQL's
        one statement, SQLite's last writes and COMMIT) goes to the next depth's time.
        """
        started = time.perf_counter()
        if self.store.engine.dialect.name == "postgresql":
            return self._commit_statement(tree, rec, started)
        return self._commit_transaction(tree, rec, started)

    def _commit_statement(self, tree: Tree, rec: DepthCommit, started: float) -> float:
        """PostgreSQL: the whole depth in one statement (etsq.store.depth_pg)."""
        new = ([tree.root] if tree.root.db_id is None else []) + [tree.nodes[i] for i in rec.new_nodes]
        write = self._depth_write(tree, rec, new)
        # The pool's ping (a stale connection is replaced, not failed) is the commit's other round trip.
        with self.store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")  # one statement is atomic by itself
            mark = time.perf_counter()
            times = self._times(started, mark)
            ids = commit_depth(conn, replace(write, wall_s=mark - self.since, step={**write.step, **times}))
            if ids is None:
                raise self._fenced(conn, rec)
        for node, db_id in zip(new, ids, strict=True):
            node.db_id = db_id
        return mark

    def _depth_write(self, tree: Tree, rec: DepthCommit, new: list[Node]) -> DepthWrite:
        """The depth's writes, its wall time not yet taken."""
        decided = _decisions(rec)
        return DepthWrite(
            job_id=self.job_id,
            lease=self.lease,
            generation=self.generation,
            depth=_next_depth(rec),
            wall_s=0.0,
            finish=finish_values(JobStatus.DONE) if rec.final else {},
            closed_at=m.utcnow(),
            nodes=[_node_row(self.job_id, tree, n) for n in new],
            decided=[decided.get(n.idx) for n in new],
            marks=[_mark(tree, i, d) for i, d in decided.items() if tree.nodes[i].db_id is not None],
            step=_selection_row(self.job_id, rec),
        )

    def _times(self, started: float, mark: float) -> dict[str, float]:
        """The selection row's share of the commit and the depth's wall time, in milliseconds."""
        return {"commit_ms": (mark - started) * 1000, "wall_ms": (mark - self.since) * 1000}

    def _commit_transaction(self, tree: Tree, rec: DepthCommit, started: float) -> float:
        """SQLite: the depth in one transaction of several statements."""
        with self.store.begin() as conn:
            run_id = self._advance_job(conn, rec)
            if tree.root.db_id is None:
                self._insert(conn, tree, [tree.root])
            mark_nodes(conn, [_mark(tree, i, d) for i, d in _decisions(rec).items()])
            self._insert(conn, tree, [tree.nodes[i] for i in rec.new_nodes])
            mark = time.perf_counter()
            conn.execute(
                insert(_SELECTION_STEPS), {**_selection_row(self.job_id, rec), **self._times(started, mark)}
            )
            searched = func.coalesce(_JOBS.c.search_s, 0.0) + (mark - self.since)
            conn.execute(update(_JOBS).where(_JOBS.c.id == self.job_id).values(search_s=searched))
            if rec.final:
                close_run_if_done(conn, run_id)
        return mark

    def _advance_job(self, conn: Connection, rec: DepthCommit) -> int:
        """Lock the job row, check the lease and its generation (the fencing token) and record the
        depth, in one UPDATE; the run's id.  A worker whose lease was taken over (reclaimed while
        it was cut off) gets `LeaseFenced` inside this transaction, which then writes nothing."""
        values: dict[str, Any] = {"depth": _next_depth(rec), "heartbeat_at": db_now()}
        if rec.final:
            values.update(finish_values(JobStatus.DONE))
        held = [_JOBS.c.id == self.job_id, _JOBS.c.lease == self.lease, _JOBS.c.status == JobStatus.RUNNING]
        if self.generation is not None:
            held.append(_JOBS.c.lease_gen == self.generation)
        stmt = update(_JOBS).where(*held).values(**values).returning(_JOBS.c.run_id)
        run_id = conn.execute(stmt).scalar_one_or_none()
        if run_id is None:
            raise self._fenced(conn, rec)
        return int(run_id)

    def _fenced(self, conn: Connection, rec: DepthCommit) -> LeaseFenced:
        """The error of a commit the job row refused, naming who holds the job now."""
        now = conn.execute(
            select(_JOBS.c.status, _JOBS.c.lease_gen, _JOBS.c.worker).where(_JOBS.c.id == self.job_id)
        ).first()
        status, gen, worker = now if now is not None else (None, None, None)
        return LeaseFenced(
            f"job {self.job_id} is no longer ours: depth {rec.depth} commit fenced, lease generation "
            f"{self.generation} is stale (the job is {status}, generation {gen}, worker {worker})"
        )

    def _insert(self, conn: Connection, tree: Tree, nodes: list[Node]) -> None:
        ids = insert_nodes(conn, [_node_row(self.job_id, tree, n) for n in nodes])
        for node, db_id in zip(nodes, ids, strict=True):
            node.db_id = db_id


_SELECTION_STEPS = m.Base.metadata.tables["selection_steps"]


def _next_depth(rec: DepthCommit) -> int:
    """jobs.depth once the depth is committed: the depth to resume at (the last one, when final)."""
    return rec.depth + (0 if rec.final else 1)


def _decisions(rec: DepthCommit) -> dict[int, Decided]:
    """(kept, n_children, cluster) of every frontier node the selection decided on, by node index."""
    sel = rec.selection
    return {i: (n > 0, n, sel.clusters.get(i)) for i, n in sel.counts.items()}


def _mark(tree: Tree, idx: int, decided: Decided) -> Mark:
    db_id = tree.nodes[idx].db_id
    assert db_id is not None, "frontier nodes are stored at an earlier depth, or the root just before"
    return Mark(db_id, *decided)


# --------------------------------------------------------------------------- finished trees, stored whole


@dataclass(frozen=True)
class GivenNode:
    """A node of a tree that arrives whole (an imported run): `parent` is its parent's position in
    the problem's list of nodes, which lists parents before their children."""

    parent: int | None
    depth: int
    path: str
    text: str
    score: float | None
    terminal: bool
    answer: str | None
    children: int  # how many nodes name this one as parent


@dataclass(frozen=True)
class FinishedProblem:
    """One problem of a finished run and its whole tree."""

    problem: Problem
    nodes: Sequence[GivenNode]


@dataclass(frozen=True)
class FinishedRun:
    """A run that arrives finished (`etsq import`): its identity config, row fields and problems."""

    config: dict[str, Any]
    dataset: str  # the run's dataset label
    method: str
    width: int
    models: str  # the policy and PRM model label
    model_info: dict[str, Any]
    problems: Sequence[FinishedProblem]
    clash: str  # the error's text when a problem's id is stored with another question or answer
    namespace: str | None = None  # where its problem rows live (None: under `dataset`, as built-ins)


def store_finished_run(store: Store, given: FinishedRun) -> tuple[int, bool]:
    """Store a finished run with its trees, through the same path as a submitted run
    (`etsq.store.runs.store_run`, `problem_row`): (id, True), or (the stored run's id, False) when
    a run of its identity exists.  One transaction: the run, its done jobs and every node."""

    def insert(s: Session, config: dict[str, Any]) -> m.Run:
        run = run_row(config, given.dataset, given.method, given.width, seed=0)
        run.policy_model = run.prm_model = given.models
        run.model_info, run.finished_at = given.model_info, m.utcnow()
        for item in given.problems:
            row = problem_row(s, given.namespace or given.dataset, item.problem, clash=given.clash)
            depth = max(n.depth for n in item.nodes)
            run.jobs.append(m.Job(problem=row, status=JobStatus.DONE, depth=depth, finished_at=m.utcnow()))
        s.add(run)
        s.flush()
        conn = s.connection()
        for job, item in zip(run.jobs, given.problems, strict=True):
            _insert_whole(conn, job.id, item.nodes)
        return run

    return store_run(store, given.config, insert, given.dataset)


def _insert_whole(conn: Connection, job_id: int, nodes: Sequence[GivenNode]) -> None:
    """Inner nodes depth by depth (parents first), then the leaves in list order, so that the leaves'
    ids keep their order in the list; inner nodes are marked kept with their child counts."""
    ids: dict[int, int] = {}
    inner = [i for i, n in enumerate(nodes) if not n.terminal]
    batches = [[i for i in inner if nodes[i].depth == d] for d in sorted({nodes[i].depth for i in inner})]
    for batch in [*batches, [i for i, n in enumerate(nodes) if n.terminal]]:
        rows = [_given_row(job_id, nodes[i], ids) for i in batch]
        ids.update(zip(batch, insert_nodes(conn, rows), strict=True))
    mark_nodes(conn, [Mark(ids[i], True, nodes[i].children, None) for i in inner])


def _given_row(job_id: int, node: GivenNode, ids: dict[int, int]) -> NodeRow:
    return NodeRow(
        job_id=job_id,
        parent_id=None if node.parent is None else ids[node.parent],
        depth=node.depth,
        path=node.path,
        text=node.text,
        # A tree that arrives whole carries no token counts (an import's run config has its own).
        step_tokens=0,
        cum_tokens=0,
        score=node.score,
        terminal=node.terminal,
        terminal_reason="answer" if node.terminal and node.answer else None,
        finish_reason=None,
        answer=node.answer,
    )
