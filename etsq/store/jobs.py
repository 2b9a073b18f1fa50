"""Executing one job (one problem of a run): claim it, search, commit each depth atomically.

A depth's commit writes the new nodes, the kept/pruned marks of the frontier, the selection
row and the job's depth in one transaction, so a job killed at any moment resumes from its
last committed depth with the tree exactly as it was.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from etsq.errors import EtsqError, PermanentError
from etsq.search.config import SearchConfig
from etsq.search.loop import DepthCommit, Searcher
from etsq.search.tree import Node, Tree
from etsq.store import schema as m
from etsq.store.bulk import Mark, NodeRow, insert_nodes, mark_nodes
from etsq.store.session import get_engine, rows_affected, session_scope
from etsq.store.statuses import FINISHED, JobStatus

log = logging.getLogger(__name__)

# Set when the worker is asked to shut down: the job in hand stops after its current depth.
STOP = threading.Event()


class JobInterrupted(EtsqError):
    """The search stopped between two depths; what was committed stays."""


class LeaseLost(JobInterrupted):
    """Another worker reclaimed the job, or it was cancelled: stop without writing."""


class ShutdownRequested(JobInterrupted):
    """The worker is shutting down: the job goes back to the queue after this depth."""


@dataclass
class Claim:
    """What a worker needs from the database to search one job."""

    job_id: int
    run_id: int
    question: str
    key: str
    config: dict[str, Any]
    policy_model: str
    prm_model: str
    lease: str


def _stale(now: datetime, stale_after_s: float) -> ColumnElement[bool]:
    """A running job whose heartbeat is older than `stale_after_s`: its worker is presumed dead."""
    cutoff = now - timedelta(seconds=stale_after_s)
    return or_(m.Job.heartbeat_at.is_(None), m.Job.heartbeat_at < cutoff)


def _claimable(now: datetime, stale_after_s: float) -> ColumnElement[bool]:
    running_but_stale = and_(m.Job.status == JobStatus.RUNNING, _stale(now, stale_after_s))
    return or_(m.Job.status == JobStatus.QUEUED, running_but_stale)


def claim_job(
    url: str, job_id: int, stale_after_s: float, worker: str | None = None, gpu: str | None = None
) -> Claim | None:
    """Take the job with a fresh lease; None when it is finished, missing, or held by a live worker."""
    lease, now = str(uuid.uuid4()), m.utcnow()
    with session_scope(url) as s:
        taken = rows_affected(
            s,
            update(m.Job)
            .where(m.Job.id == job_id, _claimable(now, stale_after_s))
            .values(
                status=JobStatus.RUNNING,
                attempts=m.Job.attempts + 1,
                worker=worker or socket.gethostname(),
                gpu=gpu,
                lease=lease,
                heartbeat_at=now,
                error=None,
                started_at=func.coalesce(m.Job.started_at, now),
            ),
        )
        if not taken:
            return None
        job = s.get_one(m.Job, job_id)
        run, problem = job.run, job.problem
        return Claim(
            job_id,
            run.id,
            problem.question,
            f"{problem.dataset}/{problem.problem_id}",
            run.config,
            run.policy_model,
            run.prm_model,
            lease,
        )


def heartbeat(url: str, job_id: int, lease: str) -> bool:
    """Refresh the job's heartbeat; False when the lease was lost (reclaimed or cancelled)."""
    with session_scope(url) as s:
        stmt = (
            update(m.Job)
            .where(m.Job.id == job_id, m.Job.lease == lease, m.Job.status == JobStatus.RUNNING)
            .values(heartbeat_at=m.utcnow())
        )
        return rows_affected(s, stmt) > 0


def release_job(url: str, job_id: int, lease: str) -> None:
    """Hand a running job back to the queue (retry, shutdown): its committed depths stay."""
    with session_scope(url) as s:
        s.execute(
            update(m.Job)
            .where(m.Job.id == job_id, m.Job.lease == lease, m.Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, lease=None, heartbeat_at=None)
        )


def requeue_stale(url: str, stale_after_s: float, run_id: int | None = None) -> list[tuple[int, str | None]]:
    """Jobs whose worker stopped beating go back to 'queued'; (id, queue) returned to enqueue."""
    cond = [m.Job.status == JobStatus.RUNNING, _stale(m.utcnow(), stale_after_s)]
    if run_id is not None:
        cond.append(m.Job.run_id == run_id)
    with session_scope(url) as s:
        rows = [(job_id, queue) for job_id, queue in s.execute(select(m.Job.id, m.Job.queue).where(*cond))]
        if rows:
            ids = [job_id for job_id, _ in rows]
            s.execute(
                update(m.Job).where(m.Job.id.in_(ids), *cond).values(status=JobStatus.QUEUED, lease=None)
            )
        return rows


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
    return (
        job_id,
        parent,
        node.depth,
        node.path,
        node.text,
        node.tokens,
        node.cum_tokens,
        node.score,
        node.terminal,
        node.terminal_reason,
        node.finish_reason,
        node.answer,
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

    def __init__(self, url: str, job_id: int, lease: str) -> None:
        self.url, self.job_id, self.lease = url, job_id, lease

    def __call__(self, tree: Tree, rec: DepthCommit) -> None:
        self._commit(tree, rec)
        if STOP.is_set() and not rec.final:
            raise ShutdownRequested(f"job {self.job_id}: worker shutting down after depth {rec.depth}")

    def _commit(self, tree: Tree, rec: DepthCommit) -> None:
        with get_engine(self.url).begin() as conn:
            run_id = self._advance_job(conn, rec)
            if tree.root.db_id is None:
                self._insert(conn, tree, [tree.root])
            mark_nodes(conn, _marks(tree, rec))
            self._insert(conn, tree, [tree.nodes[i] for i in rec.new_nodes])
            conn.execute(insert(_SELECTION_STEPS), _selection_row(self.job_id, rec))
            if rec.final:
                _close_run_if_done(conn, run_id)

    def _advance_job(self, conn: Connection, rec: DepthCommit) -> int:
        """Lock the job row, check the lease and record the depth, in one UPDATE; the run's id."""
        now = m.utcnow()
        values: dict[str, Any] = {"depth": rec.depth + (0 if rec.final else 1), "heartbeat_at": now}
        if rec.final:
            values.update(status=JobStatus.DONE, error=None, finished_at=now, lease=None)
        stmt = (
            update(_JOBS)
            .where(
                _JOBS.c.id == self.job_id, _JOBS.c.lease == self.lease, _JOBS.c.status == JobStatus.RUNNING
            )
            .values(**values)
            .returning(_JOBS.c.run_id)
        )
        run_id = conn.execute(stmt).scalar_one_or_none()
        if run_id is None:
            status = conn.execute(select(_JOBS.c.status).where(_JOBS.c.id == self.job_id)).scalar()
            raise LeaseLost(f"job {self.job_id} is no longer ours (status {status})")
        return int(run_id)

    def _insert(self, conn: Connection, tree: Tree, nodes: list[Node]) -> None:
        ids = insert_nodes(conn, [_node_row(self.job_id, tree, n) for n in nodes])
        for node, db_id in zip(nodes, ids, strict=True):
            node.db_id = db_id


_JOBS = m.Base.metadata.tables["jobs"]
_SELECTION_STEPS = m.Base.metadata.tables["selection_steps"]


def _marks(tree: Tree, rec: DepthCommit) -> list[Mark]:
    """(id, kept, n_children, cluster) of every frontier node the selection decided on."""
    marks: list[Mark] = []
    for i, n in rec.selection.counts.items():
        db_id = tree.nodes[i].db_id
        assert db_id is not None, "frontier nodes are stored at an earlier depth"
        marks.append((db_id, n > 0, n, rec.selection.clusters.get(i)))
    return marks


def _close_run_if_done(conn: Connection, run_id: int) -> None:
    """Stamp the run finished once none of its jobs is open."""
    open_jobs = conn.execute(
        select(func.count())
        .select_from(_JOBS)
        .where(_JOBS.c.run_id == run_id, _JOBS.c.status.not_in(FINISHED))
    ).scalar_one()
    if not open_jobs:
        runs = m.Base.metadata.tables["runs"]
        conn.execute(update(runs).where(runs.c.id == run_id).values(finished_at=m.utcnow()))


def _finish(s: Session, job: m.Job, status: JobStatus, error: str | None = None) -> None:
    job.status, job.error, job.finished_at, job.lease = status, error, m.utcnow(), None
    s.flush()
    open_jobs = s.scalar(
        select(func.count())
        .select_from(m.Job)
        .where(m.Job.run_id == job.run_id, m.Job.status.not_in(FINISHED))
    )
    if not open_jobs:
        s.get_one(m.Run, job.run_id).finished_at = m.utcnow()


def fail_job(url: str, job_id: int, reason: str, lease: str | None = None) -> None:
    """Record a permanent failure (unless another worker holds the job now); the run goes on."""
    with session_scope(url) as s:
        job = s.get(m.Job, job_id)
        if job is None or job.status in FINISHED or (lease is not None and job.lease not in (lease, None)):
            return
        _finish(s, job, JobStatus.FAILED, reason[:4000])


def search_job(url: str, claim: Claim, searcher: Searcher, heartbeat_s: float) -> None:
    """Run (or resume) the claimed job's search to completion."""
    with session_scope(url) as s:
        stored = load_tree(s, claim.job_id)
    tree, depth = stored if stored else (searcher.new_tree(), 0)
    with Heartbeat(url, claim.job_id, claim.lease, heartbeat_s):
        searcher.run(tree, DepthWriter(url, claim.job_id, claim.lease), start_depth=depth)


class Heartbeat:
    """A background thread that keeps a running job's heartbeat fresh between depth commits."""

    def __init__(self, url: str, job_id: int, lease: str, every_s: float) -> None:
        self.args, self.every_s = (url, job_id, lease), every_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                if not heartbeat(*self.args):
                    return
            except Exception:  # a missed beat is harmless; the next one retries
                log.warning("heartbeat of job %s failed", self.args[1], exc_info=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)


def search_config(claim: Claim) -> SearchConfig:
    return SearchConfig.from_dict(claim.config["search"])
