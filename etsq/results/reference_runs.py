"""Reference files as runs: `etsq import` stores one through the store's run path (the same problem
rows and run identity as a submitted run), and `export --format reference` reads a run back.

The format itself (reading, checking, the answer tree, writing) is `etsq.results.reference`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from etsq.datasets import Problem
from etsq.errors import UserError
from etsq.results.reference import (
    SOURCE,
    Entry,
    ExportRow,
    ImportSpec,
    StoredProblem,
    answer_tree,
    export_entry,
    gold,
    problem_key,
    read_reference,
    read_stats,
    run_config,
)
from etsq.store import schema as m
from etsq.store.runs import run_ids
from etsq.store.session import Store
from etsq.store.statuses import JobStatus
from etsq.store.trees import FinishedProblem, FinishedRun, GivenNode, store_finished_run

CLASH = "is stored with another question or answer; import under another --dataset label"


def import_reference(store: Store, spec: ImportSpec) -> tuple[int, bool]:
    """Store a reference file as a run: (run id, True), or (the existing run's id, False) when this
    file was imported with the same options before.  Checked whole before anything is written."""
    if spec.width < 1:
        raise UserError(f"width must be positive, got {spec.width}")
    entries = read_reference(spec.file)
    stats = read_stats(spec.stats) if spec.stats is not None else None
    run = FinishedRun(
        config=run_config(spec, entries, stats),
        dataset=spec.dataset,
        method=spec.method,
        width=spec.width,
        models=SOURCE,
        model_info={"source": SOURCE, "file": spec.file.name},
        problems=[_finished(spec.dataset, entry) for entry in entries],
        clash=CLASH,
    )
    return store_finished_run(store, run)


def _finished(dataset: str, entry: Entry) -> FinishedProblem:
    nodes = [
        GivenNode(n.parent, n.depth, n.path, n.text, n.score, n.terminal, n.answer, len(n.children))
        for n in answer_tree(entry)
    ]
    return FinishedProblem(Problem(problem_key(dataset, entry.id), entry.question, gold(entry)), nodes)


def reference_entries(s: Session, run_id: int) -> Iterator[dict[str, Any]]:
    """The run's finished problems in the reference's shape, one at a time."""
    run_ids(s, [run_id])
    run = s.get_one(m.Run, run_id)
    jobs = s.scalars(
        select(m.Job).where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE).order_by(m.Job.id)
    )
    for position, job in enumerate(jobs):
        yield export_entry(run.dataset, run.config, _stored(job), _rows(s, job.id), position)


def reference_stats(s: Session, run_id: int) -> dict[str, float] | None:
    """The run's stats.log figures: an imported run's own, else its finished problems' totals
    (KV before pruning, sampled steps, generated tokens, searched seconds); None when a figure is
    missing (an imported file that came without stats.log)."""
    from etsq.results.evaluate import run_records, select_runs
    from etsq.results.table import RunFilter

    run = s.get_one(m.Run, run_id)
    if run.config.get("source") == SOURCE:
        stats = run.config.get("stats")
        return None if stats is None else dict(stats)
    [info] = select_runs(s, RunFilter(runs=(run_id,)))
    records = run_records(s, info, [("last", "weighted")]).records
    totals: dict[str, float] = {}
    for name, figure in (("kv_cache", "kv_before"), ("model_calls", "policy_calls"),
                         ("tokens_generated", "tokens"), ("seconds", "seconds")):  # fmt: skip
        values = [getattr(r, figure) for r in records]
        if any(v is None for v in values):
            return None
        totals[name] = float(sum(values))
    return totals


def _stored(job: m.Job) -> StoredProblem:
    return StoredProblem(job.problem.problem_id, job.problem.question, job.problem.answer)


def _rows(s: Session, job_id: int) -> list[ExportRow]:
    n = m.Node
    q = select(n.id, n.parent_id, n.text, n.score, n.terminal, n.step_tokens).where(n.job_id == job_id)
    return [ExportRow(*row) for row in s.execute(q)]
