"""A job's search tree in the database: loaded to resume, and stored one depth per transaction.

A depth's commit writes the new nodes, the kept/pruned marks of the frontier, the selection row, the
job's depth and its search time in one transaction, so a job killed at any moment resumes from its
last committed depth with the tree exactly as it was.  The worker writes a depth on a thread of
its own while the search goes on to the next (`DepthWriter(background=True)`).  A job's search time
(`jobs.search_s`) is the sum of its depths' wall times, each from the moment the previous depth was
handed to the writer (or from the writer's start, after the models are loaded) to the moment its own
was (`selection_steps.wall_ms`; `commit_ms` is the writer's time up to its last statement): a resumed
job does not count its pause, and loading models is not charged to a job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class HandedDepth:
    """One depth as the search handed it over: its record, its new nodes (the root first, when new)
    and their rows, whose parents' ids are filled in when written (a parent stored by the depth
    before may still be in flight when its children are handed over), and the moment of handing."""

    rec: DepthCommit
    new: list[Node]
    rows: list[NodeRow]
    handed: float


class DepthWriter:
    """The commit callback: persists one DepthCommit atomically, in one round trip on PostgreSQL.

    PostgreSQL: one statement (etsq.store.depth_pg) on an autocommit connection, so with the pool's
    ping a depth costs two round trips.  SQLite (in-process, where a round trip costs nothing): one
    transaction of Core statements, the job row updated first (which takes the write lock and checks
    the lease), then the nodes' insert and the marks' UPDATE (etsq.store.bulk) and the selection row.

    `background=True` (the worker's) writes each depth on a writer thread (`writer_pool`) while the
    search goes on to select and expand the next one, so the servers do not wait for the database.  One
    depth is in flight at most: handing over a depth first waits for the one before (and raises its
    error: LeaseFenced, a database fault), so depths are stored in order and a job's stored depth
    is at most one behind its search.  The final depth, and the one a shutdown stops after, are
    written before the call returns.  Use it as a context manager: leaving it waits for the depth in
    flight, so a job is never handed back (or failed) while its writer still writes.
    """

    def __init__(
        self,
        store: Store,
        job_id: int,
        lease: str,
        stop: threading.Event | None = None,
        generation: int | None = None,
        background: bool = False,
    ) -> None:
        self.store, self.job_id, self.lease = store, job_id, lease
        self.generation = generation  # the claim's fencing token (jobs.lease_gen)
        self.stop = stop or threading.Event()  # set: stop after the depth in hand (worker shutdown)
        self.since = time.perf_counter()  # the depth in hand's wall time is counted from here
        self._pool = writer_pool(store) if background else None
        self._writing: Future[None] | None = None
        self._root_handed = False

    def __call__(self, tree: Tree, rec: DepthCommit) -> None:
        self.wait()
        handed = self._hand(tree, rec)
        stopping = self.stop.is_set() and not rec.final
        if self._pool is None or rec.final or stopping:
            self._write(tree, handed)
        else:
            self._writing = self._pool.submit(self._write, tree, handed)
        if stopping:
            raise ShutdownRequested(f"job {self.job_id}: worker shutting down after depth {rec.depth}")

    def wait(self) -> None:
        """Wait for the depth in flight, if any; its error, if it failed, is raised here."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def __enter__(self) -> DepthWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.wait()
        except Exception:
            if exc is None:
                raise
            # The search's own error is the one to report; the depth's write failed as well.
            log.warning("job %s: the depth in flight was not stored either", self.job_id, exc_info=True)

    def _hand(self, tree: Tree, rec: DepthCommit) -> HandedDepth:
        """The depth's rows, taken on the search's thread: the search goes on to mark and expand
        the next depth's nodes in the same tree while this one is written."""
        handed = time.perf_counter()
        new = [tree.nodes[i] for i in rec.new_nodes]
        if tree.root.db_id is None and not self._root_handed:
            new.insert(0, tree.root)
            self._root_handed = True
        return HandedDepth(rec, new, [_node_row(self.job_id, tree, n) for n in new], handed)

    def _write(self, tree: Tree, depth: HandedDepth) -> None:
        """Write the depth: its wall time runs from the previous depth's handing over to its own,
        so `jobs.search_s` (their sum) counts what the search waited for, a write included, and the
        selection row holds `wall_ms` and `commit_ms`, the writer's time up to its last statement."""
        started = time.perf_counter()
        if self.store.engine.dialect.name == "postgresql":
            self._commit_statement(tree, depth, started)
        else:
            self._commit_transaction(tree, depth, started)
        self.since = depth.handed

    def _commit_statement(self, tree: Tree, depth: HandedDepth, started: float) -> None:
        """PostgreSQL: the whole depth in one statement (etsq.store.depth_pg)."""
        write = self._depth_write(tree, depth)
        # The pool's ping (a stale connection is replaced, not failed) is the commit's other round trip.
        with self.store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")  # one statement is atomic by itself
            times = self._times(started, time.perf_counter(), depth)
            ids = commit_depth(conn, replace(write, step={**write.step, **times}))
            if ids is None:
                raise self._fenced(conn, depth.rec)
        for node, db_id in zip(depth.new, ids, strict=True):
            node.db_id = db_id

    def _depth_write(self, tree: Tree, depth: HandedDepth) -> DepthWrite:
        rec = depth.rec
        decided = _decisions(rec)
        stored = {n.idx for n in depth.new}
        return DepthWrite(
            job_id=self.job_id,
            lease=self.lease,
            generation=self.generation,
            depth=_next_depth(rec),
            wall_s=depth.handed - self.since,
            finish=finish_values(JobStatus.DONE) if rec.final else {},
            closed_at=m.utcnow(),
            nodes=[_with_parent(tree, n, row) for n, row in zip(depth.new, depth.rows, strict=True)],
            decided=[decided.get(n.idx) for n in depth.new],
            marks=[_mark(tree, i, d) for i, d in decided.items() if i not in stored],
            step=_selection_row(self.job_id, rec),
        )

    def _times(self, started: float, mark: float, depth: HandedDepth) -> dict[str, float]:
        """The selection row's share of the commit and the depth's wall time, in milliseconds."""
        return {"commit_ms": (mark - started) * 1000, "wall_ms": (depth.handed - self.since) * 1000}

    def _commit_transaction(self, tree: Tree, depth: HandedDepth, started: float) -> None:
        """SQLite: the depth in one transaction of several statements."""
        rec, new, rows = depth.rec, depth.new, depth.rows
        with self.store.begin() as conn:
            run_id = self._advance_job(conn, rec)
            root_new = bool(new) and new[0] is tree.root
            if root_new:
                tree.root.db_id = insert_nodes(conn, rows[:1])[0]
            mark_nodes(conn, [_mark(tree, i, d) for i, d in _decisions(rec).items()])
            kids = [_with_parent(tree, n, r) for n, r in zip(new[root_new:], rows[root_new:], strict=True)]
            for node, db_id in zip(new[root_new:], insert_nodes(conn, kids), strict=True):
                node.db_id = db_id
            times = self._times(started, time.perf_counter(), depth)
            conn.execute(insert(_SELECTION_STEPS), {**_selection_row(self.job_id, rec), **times})
            searched = func.coalesce(_JOBS.c.search_s, 0.0) + (depth.handed - self.since)
            conn.execute(update(_JOBS).where(_JOBS.c.id == self.job_id).values(search_s=searched))
            if rec.final:
                close_run_if_done(conn, run_id)

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


_POOLS: dict[str, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
POSTGRES_WRITERS = 8  # threads writing depths to one PostgreSQL database, shared by a worker's jobs
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of its parent's threads


def writer_pool(store: Store) -> ThreadPoolExecutor:
    """The threads that write depths to `store`, shared by every job of the process.  SQLite gets
    one: it takes one writer at a time, and writers waiting for its lock sleep in its busy handler's
    backoff instead of queueing.  Each job has one depth in flight at most, so any number of
    threads writes each job's depths in order."""
    with _POOLS_LOCK:
        pool = _POOLS.get(store.url)
        if pool is None:
            size = 1 if store.engine.dialect.name == "sqlite" else POSTGRES_WRITERS
            pool = _POOLS[store.url] = ThreadPoolExecutor(size, thread_name_prefix="etsq-depths")
        return pool


def _with_parent(tree: Tree, node: Node, row: NodeRow) -> NodeRow:
    """The row with its parent's id as stored by now (None for the root, and for a child of a root
    that this same depth stores)."""
    return row if node.parent is None else row._replace(parent_id=tree.nodes[node.parent].db_id)


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
