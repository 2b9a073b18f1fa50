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
from dataclasses import dataclass
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
    """The commit callback: persists one DepthCommit in one transaction.

    Core statements only (no ORM objects): the job row is updated first, which takes its row lock
    and checks the lease in one statement; then the new nodes are one multi-row insert and the
    frontier's marks one UPDATE (etsq.store.bulk), the selection row one insert.
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

        The depth's wall time runs from the previous depth's mark to the end of its own writes, so
        `jobs.search_s` (their sum) counts each commit's writes, and the selection row holds them as
        `commit_ms` beside `wall_ms`; the transaction's final flush goes to the next depth's time.
        """
        started = time.perf_counter()
        with self.store.begin() as conn:
            run_id = self._advance_job(conn, rec)
            if tree.root.db_id is None:
                self._insert(conn, tree, [tree.root])
            mark_nodes(conn, _marks(tree, rec))
            self._insert(conn, tree, [tree.nodes[i] for i in rec.new_nodes])
            mark = time.perf_counter()
            row = _selection_row(self.job_id, rec)
            row.update(commit_ms=(mark - started) * 1000, wall_ms=(mark - self.since) * 1000)
            conn.execute(insert(_SELECTION_STEPS), row)
            searched = func.coalesce(_JOBS.c.search_s, 0.0) + (mark - self.since)
            conn.execute(update(_JOBS).where(_JOBS.c.id == self.job_id).values(search_s=searched))
            if rec.final:
                close_run_if_done(conn, run_id)
        return mark

    def _advance_job(self, conn: Connection, rec: DepthCommit) -> int:
        """Lock the job row, check the lease and its generation (the fencing token) and record the
        depth, in one UPDATE; the run's id.  A worker whose lease was taken over (reclaimed while
        it was cut off) gets `LeaseFenced` inside this transaction, which then writes nothing."""
        values: dict[str, Any] = {
            "depth": rec.depth + (0 if rec.final else 1),
            "heartbeat_at": db_now(),
        }
        if rec.final:
            values.update(finish_values(JobStatus.DONE))
        held = [_JOBS.c.id == self.job_id, _JOBS.c.lease == self.lease, _JOBS.c.status == JobStatus.RUNNING]
        if self.generation is not None:
            held.append(_JOBS.c.lease_gen == self.generation)
        stmt = update(_JOBS).where(*held).values(**values).returning(_JOBS.c.run_id)
        run_id = conn.execute(stmt).scalar_one_or_none()
        if run_id is None:
            now = conn.execute(
                select(_JOBS.c.status, _JOBS.c.lease_gen, _JOBS.c.worker).where(_JOBS.c.id == self.job_id)
            ).first()
            status, gen, worker = now if now is not None else (None, None, None)
            raise LeaseFenced(
                f"job {self.job_id} is no longer ours: depth {rec.depth} commit fenced, lease generation "
                f"{self.generation} is stale (the job is {status}, generation {gen}, worker {worker})"
            )
        return int(run_id)

    def _insert(self, conn: Connection, tree: Tree, nodes: list[Node]) -> None:
        ids = insert_nodes(conn, [_node_row(self.job_id, tree, n) for n in nodes])
        for node, db_id in zip(nodes, ids, strict=True):
            node.db_id = db_id


_SELECTION_STEPS = m.Base.metadata.tables["selection_steps"]


def _marks(tree: Tree, rec: DepthCommit) -> list[Mark]:
    """(id, kept, n_children, cluster) of every frontier node the selection decided on."""
    marks: list[Mark] = []
    for i, n in rec.selection.counts.items():
        db_id = tree.nodes[i].db_id
        assert db_id is not None, "frontier nodes are stored at an earlier depth"
        marks.append(Mark(db_id, n > 0, n, rec.selection.clusters.get(i)))
    return marks


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
