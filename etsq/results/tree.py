"""The tree view: one problem's search tree as a single offline HTML page (no CDN, all inline).

Nodes show their score, kept / pruned, cluster colour and child count; leaves are marked by
whether their answer is equivalent to the ground truth; a click shows a node's step text.  The
page stays usable at W=256 (thousands of nodes): only expanded nodes are laid out, only those in
the viewport are in the DOM, and the view pans by dragging and zooms with the wheel.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from etsq.errors import UserError
from etsq.procs import atomic_write_text
from etsq.results.aggregate import grade_answer
from etsq.store import schema as m
from etsq.store.labels import run_backend, run_label
from etsq.store.runs import run_ids
from etsq.store.session import Store

_TEMPLATE = Path(__file__).with_name("tree.html")


def _job(s: Session, run_id: int, problem: str) -> m.Job:
    run_ids(s, [run_id])
    q = (
        select(m.Job)
        .join(m.Problem, m.Problem.id == m.Job.problem_id)
        .where(m.Job.run_id == run_id, m.Problem.problem_id == problem)
    )
    job = s.scalar(q)
    if job is None and problem.isdigit():  # an index: the run's problems in their stored order
        job = s.scalar(
            select(m.Job).where(m.Job.run_id == run_id).order_by(m.Job.id).offset(int(problem)).limit(1)
        )
    if job is None:
        known = s.scalars(
            select(m.Problem.problem_id)
            .join(m.Job, m.Job.problem_id == m.Problem.id)
            .where(m.Job.run_id == run_id)
            .order_by(m.Job.id)
            .limit(5)
        ).all()
        raise UserError(f"run {run_id} has no problem {problem!r}; its problems include {', '.join(known)}")
    return job


def _nodes(s: Session, job: m.Job) -> list[dict[str, Any]]:
    n = m.Node
    rows = s.execute(
        select(
            n.id, n.parent_id, n.depth, n.path, n.text, n.step_tokens, n.score, n.terminal,
            n.terminal_reason, n.answer, n.kept, n.n_children, n.cluster,
        )
        .where(n.job_id == job.id)
        .order_by(n.depth, n.id)
    ).all()  # fmt: skip
    if not rows:
        raise UserError(f"problem {job.problem.problem_id} of run {job.run_id} has no stored nodes yet")
    index = {row.id: i for i, row in enumerate(rows)}
    verdicts: dict[str, bool] = {}
    gold = job.problem.answer
    out = []
    for row in rows:
        correct = None
        if row.terminal and row.answer:
            if row.answer not in verdicts:
                verdicts[row.answer] = grade_answer(gold, row.answer).correct
            correct = verdicts[row.answer]
        out.append(
            {
                "p": -1 if row.parent_id is None else index[row.parent_id],
                "d": row.depth, "path": row.path, "x": row.text, "tk": row.step_tokens, "s": row.score,
                "t": bool(row.terminal), "r": row.terminal_reason, "a": row.answer, "ok": correct,
                "k": row.kept, "n": row.n_children, "c": row.cluster,
            }
        )  # fmt: skip
    return out


def tree_records(store: Store, run_id: int, problem: str) -> list[dict[str, Any]]:
    """One problem's nodes as plain records (root first): id (its position), parent, depth, text,
    tokens, score, terminal, answer, correct, kept, children, cluster."""
    with store.session() as s:
        nodes = _nodes(s, _job(s, run_id, problem))
    return [
        {"id": i, "parent": None if n["p"] < 0 else n["p"], "depth": n["d"], "path": n["path"],
         "text": n["x"], "tokens": n["tk"], "score": n["s"], "terminal": n["t"], "reason": n["r"],
         "answer": n["a"], "correct": n["ok"], "kept": n["k"], "children": n["n"], "cluster": n["c"]}
        for i, n in enumerate(nodes)
    ]  # fmt: skip


def tree_page(store: Store, run_id: int, problem: str) -> str:
    """The HTML page of `problem`'s tree in run `run_id`."""
    with store.session() as s:
        job = _job(s, run_id, problem)
        run = job.run
        label = run_label(run.config)
        title = f"run {run.id}: {label}, {run.dataset} / {job.problem.problem_id}"
        if run_backend(run.config) == "sim":
            title += " (sim backend: synthetic models)"
        data = {
            "title": title,
            "label": label,
            "gold": job.problem.answer,
            "status": str(job.status),
            "nodes": _nodes(s, job),
        }
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    template = _TEMPLATE.read_text(encoding="utf-8")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_tree(store: Store, run_id: int, problem: str, out: Path) -> None:
    """Write the page to `out` through a temporary sibling: no half-written file on failure."""
    atomic_write_text(out, tree_page(store, run_id, problem))


def problem_list(store: Store, run_id: int) -> list[dict[str, Any]]:
    """The run's problems in order: index (what `tree --problem` takes, as it takes the id), the
    dataset's id, the job's status and, for a finished problem, whether its answer (last / weighted)
    is correct; a failed one's error."""
    from etsq.results.evaluate import run_records, select_runs
    from etsq.results.table import RunFilter

    with store.session() as s:
        run_ids(s, [run_id])
        [info] = select_runs(s, RunFilter(runs=(run_id,)))
        graded = {r.job_id: r.correct[0] for r in run_records(s, info, [("last", "weighted")]).records}
        q = (
            select(m.Job.id, m.Problem.problem_id, m.Job.status, m.Job.error)
            .join(m.Problem, m.Problem.id == m.Job.problem_id)
            .where(m.Job.run_id == run_id)
            .order_by(m.Job.id)
        )
        return [
            {"index": i, "problem": key, "status": str(status), "correct": graded.get(job_id), "error": error}
            for i, (job_id, key, status, error) in enumerate(s.execute(q))
        ]
