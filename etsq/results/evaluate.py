"""Offline evaluation: stream a run's stored nodes, one problem at a time, into graded records.

Nothing here touches a model.  A run's nodes are read in one query ordered by job, through a
server-side cursor on PostgreSQL, so memory holds one problem's nodes at a time whatever the
run's size.  Each problem's leaves are grouped by answer once (`etsq.results.aggregate.Ballot`) and graded
under every requested agg x vote from that one grouping.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import ClauseElement, Connection, func, select
from sqlalchemy.orm import Session

from etsq.errors import UserError
from etsq.results.aggregate import (
    AGGS,
    EMPTY_PATH,
    VOTES,
    Ballot,
    PathScores,
    expand_choices,
    extend_path,
    grade_ballot,
    path_values,
)
from etsq.results.reference import is_imported, problem_figures
from etsq.results.table import (
    ProblemFilter,
    ProblemRecord,
    RunCounts,
    RunFilter,
    RunInfo,
    summarise,
)
from etsq.store import schema as m
from etsq.store.jobs import job_seconds
from etsq.store.labels import run_backend, run_label
from etsq.store.runs import matching_run_ids
from etsq.store.session import Store
from etsq.store.statuses import JobStatus

STREAM_ROWS = 10_000  # rows per fetch from the (server-side) cursor
Combo = tuple[str, str]
NodeRow = tuple[int, int, int, int | None, float | None, bool, str | None, int]


@dataclass(frozen=True)
class DoneJob:
    """What grading needs of one finished job besides its nodes."""

    problem: int
    key: str
    gold: str
    seconds: float | None


@dataclass(frozen=True)
class KVFigures:
    """A job's selection steps, summed or maxed over depths."""

    before: float
    after: float
    peak: float
    server_peak: float | None


@dataclass
class RunRecords:
    """A run's graded finished problems and its job counts (both after the problem filter)."""

    run: RunInfo
    records: list[ProblemRecord]
    counts: RunCounts


# --------------------------------------------------------------------------- runs


def select_runs(s: Session, filt: RunFilter) -> list[RunInfo]:
    """The runs a filter admits, oldest first (named runs are checked to exist)."""
    ids = matching_run_ids(s, list(filt.runs) or None, filt.datasets, filt.methods, filt.widths)
    q = select(m.Run).where(m.Run.id.in_(ids)).order_by(m.Run.id)
    return [_info(run) for run in s.scalars(q)]


def _info(run: m.Run) -> RunInfo:
    source = "reference" if is_imported(run.config) else "etsq"
    label, backend = run_label(run.config), run_backend(run.config)
    return RunInfo(run.id, run.dataset, run.method, run.width, source, label, backend, run.duplicate_of)


# --------------------------------------------------------------------------- jobs


def _jobs(s: Session, run_id: int, filt: ProblemFilter) -> tuple[dict[int, DoneJob], RunCounts]:
    q = (
        select(
            m.Job.id, m.Job.status, m.Job.search_s, m.Job.started_at, m.Job.finished_at,
            m.Problem.id, m.Problem.problem_id, m.Problem.answer, m.Problem.meta,
        )
        .join(m.Problem, m.Problem.id == m.Job.problem_id)
        .where(m.Job.run_id == run_id)
    )  # fmt: skip
    done: dict[int, DoneJob] = {}
    counts = RunCounts()
    for job_id, status, search_s, started, finished, problem, key, gold, meta in s.execute(q):
        if not filt.admits(meta or {}):
            continue
        counts.total += 1
        counts.failed += status == JobStatus.FAILED
        counts.unfinished += not status.finished
        if status == JobStatus.DONE:
            counts.done += 1
            done[job_id] = DoneJob(problem, key, gold, job_seconds(search_s, started, finished))
    return done, counts


def _kv(s: Session, run_id: int) -> dict[int, KVFigures]:
    step = m.SelectionStep
    q = (
        select(
            step.job_id, func.sum(step.kv_before), func.sum(step.kv_after), func.max(step.kv_before),
            func.max(step.server_kv_tokens),
        )
        .join(m.Job, m.Job.id == step.job_id)
        .where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE)
        .group_by(step.job_id)
    )  # fmt: skip
    return {
        job_id: KVFigures(float(before), float(after), float(peak), None if server is None else float(server))
        for job_id, before, after, peak, server in s.execute(q)
    }


# --------------------------------------------------------------------------- nodes


def _stream_nodes(s: Session, run_id: int) -> Iterator[tuple[int, list[NodeRow]]]:
    """(job id, its nodes) for every finished job of the run, one job at a time."""
    done = select(m.Job.id).where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE)
    n = m.Node
    q = (
        select(n.job_id, n.depth, n.id, n.parent_id, n.score, n.terminal, n.answer, n.step_tokens)
        .where(n.job_id.in_(done.scalar_subquery()))
        .order_by(n.job_id)
    )
    rows = _dbapi_rows(s.connection(), q)
    for job_id, group in itertools.groupby(rows, key=operator.itemgetter(0)):
        yield job_id, list(group)


def _dbapi_rows(conn: Connection, q: ClauseElement) -> Iterator[Any]:
    """The rows of `q` as the driver's plain tuples, fetched in chunks.

    A server-side (named) cursor on PostgreSQL streams the result; SQLite's cursor steps through
    it anyway.  Bypassing SQLAlchemy's Row objects halves the cost per node, and the statement's
    only parameters are a run id and a status, rendered inline.
    """
    sql = str(q.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None, "a connection in use has its DBAPI connection"
    server_side = conn.dialect.name == "postgresql"
    cursor = dbapi.cursor(name="etsq_nodes") if server_side else dbapi.cursor()
    try:
        cursor.execute(sql)
        while chunk := cursor.fetchmany(STREAM_ROWS):
            yield from chunk
    finally:
        cursor.close()


@dataclass
class TreeTally:
    """One problem's tree reduced: its ballot and its node counts."""

    ballot: Ballot
    nodes: int = 0
    tokens: int = 0
    scored: int = 0


def tally_tree(rows: list[NodeRow]) -> TreeTally:
    """Build the ballot of a problem's nodes: every leaf's four aggregates in one pass, root first.

    Rows are (job, depth, id, parent, score, terminal, answer, step tokens); parents are at a
    smaller depth than their children, so in (depth, id) order each path extends its parent's.
    Leaves vote in id order, as they were stored.
    """
    rows.sort()
    paths: dict[int, PathScores] = {}
    leaves: list[tuple[int, str | None, PathScores]] = []
    tokens = scored = 0
    for _job, _depth, node_id, parent, score, terminal, answer, step_tokens in rows:
        if parent is None:
            paths[node_id] = EMPTY_PATH
            continue
        path = paths[node_id] = extend_path(paths[parent], score)
        tokens += step_tokens
        scored += score is not None
        if terminal:
            leaves.append((node_id, answer, path))
    leaves.sort(key=operator.itemgetter(0))
    ballot = Ballot()
    for _, answer, path in leaves:
        ballot.add(answer, path_values(path))
    return TreeTally(ballot, len(rows), tokens, scored)


def _record(
    job_id: int, job: DoneJob, tally: TreeTally, kv: KVFigures | None, combos: Sequence[Combo]
) -> ProblemRecord:
    grades = grade_ballot(tally.ballot, job.gold, combos)
    return ProblemRecord(
        job_id=job_id,
        problem=job.problem,
        key=job.key,
        correct=grades.correct,
        covered=grades.covered,
        graded_by_value=grades.by_value,
        nodes=tally.nodes,
        tokens=float(tally.tokens),
        policy_calls=float(tally.nodes - 1),  # every non-root node is one sampled step
        prm_calls=float(tally.scored),
        kv_before=kv.before if kv else None,
        kv_after=kv.after if kv else None,
        kv_peak=kv.peak if kv else None,
        server_kv_peak=kv.server_peak if kv else None,
        seconds=job.seconds,
    )


def _measured(record: ProblemRecord, config: dict[str, Any]) -> ProblemRecord:
    """Figures the run's config holds (an imported run's file and stats.log) replace those of its tree."""
    for name, value in problem_figures(config, record.key).items():
        setattr(record, name, value)
    return record


def run_records(
    s: Session, run: RunInfo, combos: Sequence[Combo], filt: ProblemFilter | None = None
) -> RunRecords:
    """Every finished problem of `run` the filter admits, graded under `combos`."""
    jobs, counts = _jobs(s, run.run_id, filt or ProblemFilter())
    kv = _kv(s, run.run_id)
    config = s.get_one(m.Run, run.run_id).config
    records = []
    for job_id, rows in _stream_nodes(s, run.run_id):
        if job_id in jobs:
            record = _record(job_id, jobs[job_id], tally_tree(rows), kv.get(job_id), combos)
            records.append(_measured(record, config))
    return RunRecords(run, records, counts)


# --------------------------------------------------------------------------- the table


def combos_of(aggs: Sequence[str], votes: Sequence[str]) -> list[Combo]:
    """(agg, vote) pairs; `all` stands for every choice, and no choice for last / weighted."""
    return [
        (agg, vote)
        for agg in expand_choices(aggs, AGGS, "last")
        for vote in expand_choices(votes, VOTES, "weighted")
    ]


def evaluate(
    store: Store,
    wanted: list[int] | None,
    aggs: Sequence[str],
    votes: Sequence[str],
    runs: RunFilter | None = None,
    problems: ProblemFilter | None = None,
) -> list[dict[str, Any]]:
    """The results table: one row per run and (agg, vote), `wanted` runs or every run.

    With a --level / --subject filter, runs none of whose problems match are left out.
    """
    combos = combos_of(aggs, votes)
    results = evaluate_runs(store, wanted, combos, runs, problems)
    return [row for r in results for row in summarise(r.run, r.records, r.counts, combos)]


def evaluate_runs(
    store: Store,
    wanted: list[int] | None,
    combos: Sequence[Combo],
    runs: RunFilter | None = None,
    problems: ProblemFilter | None = None,
) -> list[RunRecords]:
    """Every selected run's graded records (what `evaluate` summarises into rows)."""
    run_filter = replace(runs or RunFilter(), runs=tuple(wanted or ()))
    problem_filter = problems or ProblemFilter()
    with store.session() as s:
        results = [run_records(s, run, combos, problem_filter) for run in select_runs(s, run_filter)]
    if problem_filter.active:
        if results and not any(r.counts.total for r in results):
            raise UserError("no problem of the selected runs has the --level / --subject asked for")
        results = [r for r in results if r.counts.total]
    return results


# --------------------------------------------------------------------------- per depth


@dataclass(frozen=True)
class DepthFigures:
    """One depth of a run's selection steps, averaged over its finished problems."""

    depth: int
    problems: int
    kv_before: float
    kv_after: float
    kept_fraction: float | None
    clusters: float | None
    select_ms: float | None
    expand_ms: float | None
    score_ms: float | None
    # Sums over the depth's problems (divide by the run's finished problems for a mean per problem
    # whose depths add up to its seconds): select, expand, score, commit and wall milliseconds.
    time_sums: dict[str, float | None] | None = None


TIME_PARTS = ("expand", "score", "select", "commit")


def depth_profile(s: Session, run_id: int) -> list[DepthFigures]:
    """What a run's selection steps did at each depth (finished problems only), depth 0 first."""
    step = m.SelectionStep
    q = (
        select(
            step.depth, func.count(), func.avg(step.kv_before), func.avg(step.kv_after),
            func.sum(step.kept_size), func.sum(step.frontier_size), func.avg(step.n_clusters),
            func.avg(step.select_ms), func.avg(step.expand_ms), func.avg(step.score_ms),
            func.sum(step.expand_ms), func.sum(step.score_ms), func.sum(step.select_ms),
            func.sum(step.commit_ms), func.sum(step.wall_ms),
        )
        .join(m.Job, m.Job.id == step.job_id)
        .where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE)
        .group_by(step.depth)
        .order_by(step.depth)
    )  # fmt: skip
    return [
        DepthFigures(
            depth, n, float(before), float(after), kept / frontier if frontier else None,
            _float(clusters), _float(sel), _float(exp), _float(score),
            dict(zip((*TIME_PARTS, "wall"), map(_float, sums), strict=True)),
        )
        for depth, n, before, after, kept, frontier, clusters, sel, exp, score, *sums in s.execute(q)
    ]  # fmt: skip


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
