"""Offline evaluation: re-aggregate stored step scores and vote over stored leaves, per run."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from etsq.aggregate import Leaf, grade_problem
from etsq.db import models as m
from etsq.db.session import ensure_schema, session_scope
from etsq.runs import run_ids
from etsq.statuses import JobStatus

NodeTuple = tuple[int, int | None, float | None, bool, str | None]  # id, parent, score, terminal, answer


def leaves_of(nodes: list[NodeTuple]) -> list[Leaf]:
    """Each terminal node's answer and its path's step scores (root excluded), root first."""
    by_id = {n[0]: n for n in nodes}
    out: list[Leaf] = []
    for node_id, _, _, terminal, answer in nodes:
        if terminal:
            out.append(Leaf(answer=answer, scores=tuple(reversed(_path_scores(by_id, node_id)))))
    return out


def _path_scores(by_id: dict[int, NodeTuple], node_id: int | None) -> list[float]:
    scores: list[float] = []
    while node_id is not None:
        _, parent, score, _, _ = by_id[node_id]
        if parent is not None and score is not None:
            scores.append(score)
        node_id = parent
    return scores


def _run_nodes(s: Session, run_id: int) -> dict[int, list[NodeTuple]]:
    q = (
        select(m.Node.job_id, m.Node.id, m.Node.parent_id, m.Node.score, m.Node.terminal, m.Node.answer)
        .join(m.Job, m.Job.id == m.Node.job_id)
        .where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE)
    )
    grouped: dict[int, list[NodeTuple]] = defaultdict(list)
    for job_id, *rest in s.execute(q):
        grouped[job_id].append(tuple(rest))  # type: ignore[arg-type]
    return grouped


def evaluate_run(s: Session, run_id: int, aggs: list[str], votes: list[str]) -> list[dict[str, Any]]:
    """One row per (agg, vote); the run's nodes are read and its leaves built once for all of them."""
    run = s.get_one(m.Run, run_id)
    jobs = s.scalars(select(m.Job).where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE)).all()
    nodes = _run_nodes(s, run_id)
    leaves = [(leaves_of(nodes[j.id]), j.problem.answer) for j in jobs]
    failed = s.scalars(select(m.Job.id).where(m.Job.run_id == run_id, m.Job.status == JobStatus.FAILED)).all()
    base = {"run_id": run.id, "dataset": run.dataset, "method": run.method, "width": run.width}
    return [_grade(base, leaves, agg, vote, len(failed)) for agg in aggs for vote in votes]


def _grade(
    base: dict[str, Any], leaves: list[tuple[list[Leaf], str]], agg: str, vote: str, failed: int
) -> dict[str, Any]:
    correct = sum(grade_problem(problem_leaves, gold, agg, vote)[1] for problem_leaves, gold in leaves)
    n = len(leaves)
    return {
        **base,
        "agg": agg,
        "vote": vote,
        "n_problems": n,
        "n_correct": int(correct),
        "accuracy": correct / n if n else 0.0,
        "n_failed": failed,
    }


def evaluate(url: str, wanted: list[int] | None, aggs: list[str], votes: list[str]) -> list[dict[str, Any]]:
    ensure_schema(url)
    with session_scope(url) as s:
        return [row for rid in run_ids(s, wanted) for row in evaluate_run(s, rid, aggs, votes)]
