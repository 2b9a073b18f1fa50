"""Reference files as runs: `etsq import` stores one through the store's run path (the same problem
rows and run identity as a submitted run), and `export --format reference` reads a run back.

The format itself (reading, checking, the answer tree, writing) is `etsq.results.reference`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from etsq.datasets import Dataset, Problem, dataset_name, is_builtin, load_dataset
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


def import_reference(store: Store, spec: ImportSpec, data_dir: Path | None = None) -> tuple[int, bool]:
    """Store a reference file as a run: (run id, True), or (the existing run's id, False) when this
    file was imported with the same options before.  Checked whole before anything is written: with
    a built-in dataset (`data_dir`: ETSQ_DATA_DIR), every question must be its id's dataset row."""
    if spec.width < 1:
        raise UserError(f"width must be positive, got {spec.width}")
    if is_builtin(spec.dataset):
        spec = replace(spec, dataset=dataset_name(spec.dataset))  # GSM8K is gsm8k, as for submit
    entries = read_reference(spec.file)
    label, namespace = spec.dataset, None
    if is_builtin(spec.dataset):  # the dataset's own text: the file's may differ in whitespace only
        questions = check_questions(spec, entries, load_dataset(spec.dataset, data_dir))
        entries = [replace(e, question=q) for e, q in zip(entries, questions, strict=True)]
        problems = [_finished(spec.dataset, entry) for entry in entries]
    elif spec.dataset.endswith(".jsonl"):  # a problems file: its rows, as a submitted run stores them
        data = load_dataset(spec.dataset, data_dir)
        label, namespace = data.name, data.namespace
        problems = [_finished_row(problem, entry) for problem, entry in file_rows(spec, entries, data)]
    else:
        problems = [_finished(spec.dataset, entry) for entry in entries]
    stats = read_stats(spec.stats) if spec.stats is not None else None
    run = FinishedRun(
        config=run_config(spec, entries, stats),
        dataset=label,
        method=spec.method,
        width=spec.width,
        models=SOURCE,
        model_info={"source": SOURCE, "file": spec.file.name},
        problems=problems,
        clash=CLASH,
        namespace=namespace,
    )
    return store_finished_run(store, run)


def file_rows(spec: ImportSpec, entries: list[Entry], data: Dataset) -> list[tuple[Problem, Entry]]:
    """Each entry's row of a problems file: the row whose id is the entry's id, else the row at that
    position (the reference numbers a file's questions by position); refused, with its position, when
    there is none or its question is not the entry's (after whitespace normalisation)."""
    by_id = {p.problem_id: p for p in data.problems}
    out = []
    for position, entry in enumerate(entries):
        row = by_id.get(str(entry.id))
        if row is None and 0 <= entry.id < len(data.problems):
            row = data.problems[entry.id]
        where = f"{spec.file}: [{position}] (id {entry.id})"
        if row is None:
            raise UserError(
                f"{where}: {spec.dataset} has no row {entry.id}; is the file from another dataset?"
            )
        if _normal(entry.question) != _normal(row.question):
            raise UserError(f"{where}: the question is not {spec.dataset}'s row {row.problem_id}")
        out.append((row, entry))
    return out


def _finished_row(problem: Problem, entry: Entry) -> FinishedProblem:
    nodes = [
        GivenNode(n.parent, n.depth, n.path, n.text, n.score, n.terminal, n.answer, len(n.children))
        for n in answer_tree(entry)
    ]
    return FinishedProblem(problem, nodes)


def _normal(text: str) -> str:
    return " ".join(text.split())


def check_questions(spec: ImportSpec, entries: list[Entry], data: Dataset) -> list[str]:
    """Each entry's dataset row question; a UserError at the first entry whose id is not a row of the
    dataset or whose question is not that row's (after whitespace normalisation): grading it
    against that row's answer would be wrong."""
    rows = {p.problem_id: p.question for p in data.problems}
    for position, entry in enumerate(entries):
        key = problem_key(spec.dataset, entry.id)
        where = f"{spec.file}: [{position}] (id {entry.id})"
        if key not in rows:
            raise UserError(f"{where}: {spec.dataset} has no row {key}; is the file from another dataset?")
        if _normal(entry.question) != _normal(rows[key]):
            shown = _normal(entry.question)[:60]
            raise UserError(
                f"{where}: the question ({shown!r}...) is not {spec.dataset}'s row {key}; "
                "is the file from another dataset? (a file's own problems import under another --dataset)"
            )
    return [rows[problem_key(spec.dataset, entry.id)] for entry in entries]


def _finished(dataset: str, entry: Entry) -> FinishedProblem:
    return _finished_row(Problem(problem_key(dataset, entry.id), entry.question, gold(entry)), entry)


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
