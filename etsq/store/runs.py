"""Runs: turning a dataset and a search configuration into stored jobs, and reading them back."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from etsq import validation
from etsq.datasets import Dataset, Problem, load_dataset
from etsq.errors import UserError
from etsq.models.config import ModelConfig
from etsq.search.config import SearchConfig
from etsq.search.methods import get_method, stored_models, stored_search
from etsq.settings import Settings
from etsq.store import bulk
from etsq.store import schema as m
from etsq.store.jobs import close_run_if_done, finish_values, job_seconds
from etsq.store.labels import run_backend, run_label
from etsq.store.session import Store, rows_affected
from etsq.store.statuses import FINISHED, UNFINISHED, JobStatus, RunStatus

RECORDED_PACKAGES = (
    "etsq",
    "torch",
    "transformers",
    "sentence-transformers",
    "pulp",
    "highspy",
    "celery",
    "aiohttp",
    "sglang",
)


@dataclass(frozen=True)
class RunSpec:
    """Everything `etsq submit` was asked for; with its problems, what identifies the run."""

    dataset: str
    search: SearchConfig
    models: ModelConfig
    limit: int | None = None

    def __post_init__(self) -> None:
        validation.text("dataset", self.dataset, max_chars=4096)
        validation.number("limit", self.limit)

    def config(self, data: Dataset) -> dict[str, Any]:
        """What the run stores: the dataset's canonical name, its problems' hash, both configs
        (the search and model fields its method reads, and no other)."""
        return {
            "dataset": data.source,
            "data_hash": data.content_hash,
            "problems": len(data),
            "limit": self.limit,
            **self.settings(),
        }

    def settings(self) -> dict[str, Any]:
        """The stored search and model configs: what, with the problems, identifies the run."""
        return {
            "search": stored_search(self.search),
            "models": stored_models(self.search.method, self.models.to_dict()),
        }

    @property
    def label(self) -> str:
        """The run's short label (`etsq.store.labels.run_label`)."""
        return run_label(self.settings())


# A run is its problems (by content: ids, questions, answers after --limit) searched with one
# configuration: how the dataset was spelled and the limit that selected the problems are not part
# of it; nor are the parameters its method does not read (`etsq.search.methods.stored_search`).
# Migrations 0005 and 0006 compute the same identity for runs stored before; keep them in step.
IDENTITY_KEYS = ("data_hash", "search", "models")


def config_hash(config: dict[str, Any]) -> str:
    """The run's identity (`runs.config_hash`, unique) from its stored config."""
    identity = {key: config[key] for key in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def package_versions() -> dict[str, str | None]:
    """The recorded packages' versions (None: not installed)."""
    return dict(_installed_versions())


@functools.cache  # a distribution's metadata costs ~6 ms to read: once per process, not per run of a sweep
def _installed_versions() -> tuple[tuple[str, str | None], ...]:
    out: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return tuple(out.items())


def load_problems(settings: Settings, spec: RunSpec, loaded: dict[str, Dataset] | None = None) -> Dataset:
    """The problems the run covers; raises a UserError before anything is written.

    `loaded` caches datasets by name across the specs of one sweep.
    """
    get_method(spec.search.method)
    validation.check_width(spec.search.width, settings.max_width)
    cache = {} if loaded is None else loaded
    if spec.dataset not in cache:
        cache[spec.dataset] = load_dataset(spec.dataset, settings.data_dir)
    return cache[spec.dataset].head(spec.limit)


# A dataset's problems go in as one executemany, without ORM objects (a run's jobs: bulk.insert_jobs).
_PROBLEMS = m.Base.metadata.tables["problems"]

# What a submission is told when a problem's id is stored with another question or answer.
DATA_CHANGED = (
    "differs from the row of that id stored by an earlier run (the data changed under the same name); "
    "keep the earlier data in ETSQ_DATA_DIR or submit the new data as a .jsonl file"
)


def problem_row(s: Session, namespace: str, p: Problem, clash: str = DATA_CHANGED) -> m.Problem:
    """The stored row of problem `p` under `namespace`, added now if missing; a UserError
    `namespace/id clash` when a row of that id holds another question or answer."""
    row = s.scalar(
        select(m.Problem).where(m.Problem.dataset == namespace, m.Problem.problem_id == p.problem_id)
    )
    if row is None:
        row = m.Problem(
            dataset=namespace, problem_id=p.problem_id, question=p.question, answer=p.answer, meta=p.meta
        )
        s.add(row)
    elif (row.question, row.answer) != (p.question, p.answer):
        raise UserError(f"{namespace}/{p.problem_id} {clash}")
    return row


def create_run(store: Store, spec: RunSpec, data: Dataset, queues: list[str]) -> tuple[int, bool]:
    """The run of this configuration: (id, True) when stored now, (id, False) when it existed.

    The config hash is unique, so concurrent submissions of one configuration make one run;
    the loser of the race rolls back and finds the winner's run.
    """
    insert = functools.partial(_insert_run, spec=spec, data=data, queues=queues)
    return store_run(store, spec.config(data), insert, spec.dataset)


def store_run(
    store: Store, config: dict[str, Any], insert: Callable[[Session, dict[str, Any]], m.Run], name: str
) -> tuple[int, bool]:
    """The run of `config`'s identity: (id, False) when stored already, else (id, True) after
    `insert` built its row (with its jobs) in a transaction of its own.

    The config hash is unique, so concurrent stores of one identity make one run: the loser of the
    race rolls back and finds the winner's run.  Submitted and imported runs are stored through here.
    """
    wanted = config_hash(config)
    for _ in range(3):
        with store.session() as s:
            existing = s.scalar(select(m.Run.id).where(m.Run.config_hash == wanted))
        if existing is not None:
            return existing, False
        try:
            with store.session() as s:
                run = insert(s, config)
                s.add(run)
                s.flush()
                return run.id, True
        except IntegrityError:
            continue  # a concurrent submit inserted the same run or problems first
    raise UserError(f"could not store the run of {name!r}: conflicting concurrent submissions")


def find_run(s: Session, spec: RunSpec, data: Dataset) -> int | None:
    """The stored run of these problems and this configuration, if any."""
    return s.scalar(select(m.Run.id).where(m.Run.config_hash == config_hash(spec.config(data))))


def _insert_run(
    s: Session, config: dict[str, Any], *, spec: RunSpec, data: Dataset, queues: list[str]
) -> m.Run:
    """The run's row and its jobs, each kind of row written in bulk: a SELECT per problem and an ORM
    object per job were half of the 17 s a 40-run sweep over MATH500 took."""
    problem_ids = problem_rows(s, data.namespace, list(data))
    run = run_row(config, data.name, spec.search.method, spec.search.width, spec.search.seed)
    run.policy_model, run.prm_model = spec.models.label("policy"), spec.models.label("prm")
    s.add(run)
    s.flush()  # the run's id, for its jobs
    insert_jobs(s, run.id, problem_ids, queues)
    return run


def problem_rows(s: Session, namespace: str, problems: list[Problem], clash: str = DATA_CHANGED) -> list[int]:
    """The stored ids of `problems` under `namespace`, in order, the missing rows inserted in one
    statement; a UserError `namespace/id clash` as `problem_row` raises it."""
    stored = _stored_problems(s, namespace)
    for p in problems:
        row = stored.get(p.problem_id)
        if row is not None and row[1:] != (p.question, p.answer):
            raise UserError(f"{namespace}/{p.problem_id} {clash}")
    missing = [p for p in problems if p.problem_id not in stored]
    if missing:
        values = [
            {"dataset": namespace, "problem_id": p.problem_id, "question": p.question, "answer": p.answer,
             "meta": p.meta}
            for p in missing
        ]  # fmt: skip
        s.execute(insert(_PROBLEMS), values)
        stored = _stored_problems(s, namespace)
    return [stored[p.problem_id][0] for p in problems]


def _stored_problems(s: Session, namespace: str) -> dict[str, tuple[int, str, str]]:
    """problem_id -> (row id, question, answer) of every row stored under `namespace`."""
    q = select(m.Problem.problem_id, m.Problem.id, m.Problem.question, m.Problem.answer).where(
        m.Problem.dataset == namespace
    )
    return {pid: (rid, question, answer) for pid, rid, question, answer in s.execute(q)}


def insert_jobs(s: Session, run_id: int, problem_ids: list[int], queues: list[str]) -> None:
    """One queued job per problem, in one statement.  Round-robin over the queues with live workers
    keeps every GPU's servers busy."""
    spread = [queues[i % len(queues)] for i in range(len(problem_ids))]
    bulk.insert_jobs(s.connection(), run_id, problem_ids, spread)


def run_row(config: dict[str, Any], dataset: str, method: str, width: int, seed: int) -> m.Run:
    """A run's row: its stored config, the identity hashed from it, and the packages it ran with."""
    return m.Run(
        dataset=dataset,
        method=method,
        width=width,
        seed=seed,
        config=config,
        config_hash=config_hash(config),
        versions=package_versions(),
    )


def queued_jobs(s: Session, run_id: int, default_queue: str) -> list[tuple[int, str]]:
    """(job id, queue) of the run's jobs waiting for a worker: what resume enqueues."""
    q = select(m.Job.id, m.Job.queue).where(m.Job.run_id == run_id, m.Job.status == JobStatus.QUEUED)
    return [(job_id, queue or default_queue) for job_id, queue in s.execute(q.order_by(m.Job.id))]


def route_jobs(s: Session, run_id: int, queue: str | None, own_queue: str) -> None:
    """Send the run's waiting jobs to `queue`; with None, those on `own_queue` (a finished `--wait`'s)
    go back to the shared default queue."""
    waiting = [m.Job.run_id == run_id, m.Job.status == JobStatus.QUEUED]
    if queue is None:
        s.execute(update(m.Job).where(*waiting, m.Job.queue == own_queue).values(queue=None))
    else:
        s.execute(update(m.Job).where(*waiting).values(queue=queue))


def other_runs_waiting(s: Session, run_id: int) -> int:
    """Jobs of other runs waiting for a worker: what a `--wait` local worker leaves alone."""
    q = select(func.count()).where(m.Job.run_id != run_id, m.Job.status == JobStatus.QUEUED)
    return int(s.scalar(q) or 0)


def uncancel_run(s: Session, run_id: int) -> int:
    """A cancel is a pause: the run's cancelled jobs wait again, from their last committed depth."""
    n = rows_affected(
        s,
        update(m.Job)
        .where(m.Job.run_id == run_id, m.Job.status == JobStatus.CANCELLED)
        .values(status=JobStatus.QUEUED, finished_at=None, lease=None, heartbeat_at=None, error=None),
    )
    if n:
        s.execute(update(m.Run).where(m.Run.id == run_id).values(finished_at=None))
    return n


def unfinished_run_ids(s: Session) -> list[int]:
    """Runs with a job queued, running or cancelled: what `etsq resume --all` resumes."""
    unfinished = m.Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLED])
    return list(s.scalars(select(m.Job.run_id).where(unfinished).distinct().order_by(m.Job.run_id)))


def cancelled_jobs(s: Session, run_id: int) -> int:
    q = select(func.count()).where(m.Job.run_id == run_id, m.Job.status == JobStatus.CANCELLED)
    return int(s.scalar(q) or 0)


def cancel_run(s: Session, run_id: int) -> int:
    """Mark every unfinished job cancelled; running ones stop at their next depth commit.  A pause:
    `uncancel_run` (`etsq resume`) queues them again, and they go on from their committed depths."""
    run_ids(s, [run_id])
    n = rows_affected(
        s,
        update(m.Job)
        .where(m.Job.run_id == run_id, m.Job.status.in_(UNFINISHED))
        .values(**finish_values(JobStatus.CANCELLED)),
    )
    if n:  # a finished run keeps the time it finished
        close_run_if_done(s.connection(), run_id)
    return n


def delete_run(s: Session, run_id: int) -> None:
    """Remove a run that was never enqueued: its jobs, and the problem rows no other run uses."""
    problem_ids = list(s.scalars(select(m.Job.problem_id).where(m.Job.run_id == run_id)))
    s.execute(delete(m.Job).where(m.Job.run_id == run_id))
    s.execute(delete(m.Run).where(m.Run.id == run_id))
    still_used = select(m.Job.problem_id).where(m.Job.problem_id.in_(problem_ids))
    s.execute(delete(m.Problem).where(m.Problem.id.in_(problem_ids), m.Problem.id.not_in(still_used)))


def run_ids(s: Session, wanted: list[int] | None = None) -> list[int]:
    """The given run ids (each checked to exist) or every run, oldest first."""
    existing = list(s.scalars(select(m.Run.id).order_by(m.Run.id)))
    if not wanted:
        return existing
    missing = sorted(set(wanted) - set(existing))
    if missing:
        raise UserError(f"no run with id {', '.join(map(str, missing))}")
    return list(wanted)


def matching_run_ids(
    s: Session,
    wanted: list[int] | None,
    datasets: tuple[str, ...] = (),
    methods: tuple[str, ...] = (),
    widths: tuple[int, ...] = (),
) -> list[int]:
    """The runs (of `wanted`, or all) that pass the filters, matched as `etsq submit` matches its
    values: a built-in dataset in any case, a file by its stem; a method by its registry name (an
    unknown one is refused).  A filter that matches no stored run is a UserError naming what exists."""
    from etsq.datasets import dataset_name
    from etsq.search.methods import METHODS

    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise UserError(f"--method {unknown[0]!r}: unknown method; choose from {', '.join(sorted(METHODS))}")
    ids = run_ids(s, wanted)
    if not (datasets or methods or widths) or not ids:
        return ids
    names = {dataset_name(d) for d in datasets}
    q = select(m.Run.id, m.Run.dataset, m.Run.method, m.Run.width).where(m.Run.id.in_(ids)).order_by(m.Run.id)
    rows = s.execute(q).all()
    kept = [
        rid
        for rid, dataset, method, width in rows
        if (not names or dataset in names or dataset.split("@")[0] in names)
        and (not methods or method in methods)
        and (not widths or width in widths)
    ]
    if not kept:
        asked = " ".join(
            [*(f"--dataset {d}" for d in datasets), *(f"--method {x}" for x in methods),
             *(f"--width {w}" for w in widths)]
        )  # fmt: skip
        widths_have = ", ".join(map(str, sorted({r[3] for r in rows})))
        have = (
            f"datasets {', '.join(sorted({r[1] for r in rows}))}; methods "
            f"{', '.join(sorted({r[2] for r in rows}))}; widths {widths_have}"
        )
        raise UserError(f"no run matches {asked}; the runs{' asked for' if wanted else ''} have {have}")
    return kept


def _job_counts(s: Session, run_id: int) -> dict[JobStatus, int]:
    rows = s.execute(select(m.Job.status, func.count()).where(m.Job.run_id == run_id).group_by(m.Job.status))
    return {JobStatus(status): int(n) for status, n in rows}


def _node_count(s: Session, run_id: int) -> int:
    q = select(func.count(m.Node.id)).join(m.Job, m.Job.id == m.Node.job_id).where(m.Job.run_id == run_id)
    return int(s.scalar(q) or 0)


def run_summary(s: Session, run_id: int) -> dict[str, Any]:
    run = s.get_one(m.Run, run_id)
    counts = _job_counts(s, run_id)
    return {
        "run_id": run.id,
        "dataset": run.dataset,
        "method": run.method,
        "width": run.width,
        "label": run_label(run.config),
        "backend": run_backend(run.config),
        "duplicate_of": run.duplicate_of,
        "status": RunStatus.of(counts).value,
        "problems": sum(counts.values()),
        "problems_done": counts.get(JobStatus.DONE, 0),
        "problems_failed": counts.get(JobStatus.FAILED, 0),
        "problems_running": counts.get(JobStatus.RUNNING, 0),
        "problems_queued": counts.get(JobStatus.QUEUED, 0),
        "problems_cancelled": counts.get(JobStatus.CANCELLED, 0),
        "nodes": _node_count(s, run_id),
        "policy_model": run.policy_model,
        "prm_model": run.prm_model,
        "created_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def running_depths(s: Session, run_id: int) -> list[int]:
    q = (
        select(m.Job.depth)
        .where(m.Job.run_id == run_id, m.Job.status == JobStatus.RUNNING)
        .order_by(m.Job.id)
    )
    return list(s.scalars(q))


def mean_job_seconds(s: Session, run_id: int) -> float | None:
    """Mean wall time of the run's finished jobs: what an ETA is made of."""
    rows = s.execute(
        select(m.Job.search_s, m.Job.started_at, m.Job.finished_at).where(
            m.Job.run_id == run_id, m.Job.status == JobStatus.DONE
        )
    ).all()
    spans = [s for s in (job_seconds(*row) for row in rows) if s is not None]
    return sum(spans) / len(spans) if spans else None


def statuses(
    s: Session,
    wanted: list[int] | None = None,
    datasets: tuple[str, ...] = (),
    methods: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The summary of the `wanted` runs (each checked to exist), or of every run, filtered as
    `matching_run_ids` filters."""
    return [run_summary(s, rid) for rid in matching_run_ids(s, wanted, datasets, methods)]


def progress(s: Session, run_id: int) -> tuple[int, int, int]:
    """(finished, failed, total) jobs of a run: what a progress bar shows.

    Cancelled jobs count as finished.
    """
    done_or_failed = case((m.Job.status.in_(FINISHED), 1), else_=0)
    failed = case((m.Job.status == JobStatus.FAILED, 1), else_=0)
    row = s.execute(
        select(func.sum(done_or_failed), func.sum(failed), func.count()).where(m.Job.run_id == run_id)
    ).one()
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


def export_jobs(s: Session, run_id: int) -> Iterator[dict[str, Any]]:
    """One JSON-able object per problem of the run, with its whole tree."""
    run_ids(s, [run_id])
    jobs = s.scalars(select(m.Job).where(m.Job.run_id == run_id).order_by(m.Job.id)).all()
    for job in jobs:
        yield _export_job(s, job)


def _export_job(s: Session, job: m.Job) -> dict[str, Any]:
    nodes = s.scalars(select(m.Node).where(m.Node.job_id == job.id).order_by(m.Node.id)).all()
    return {
        "problem_id": job.problem.problem_id,
        "question": job.problem.question,
        "answer": job.problem.answer,
        "status": job.status,
        "error": job.error,
        "attempts": job.attempts,
        "nodes": [
            {
                "id": n.id,
                "parent_id": n.parent_id,
                "depth": n.depth,
                "text": n.text,
                "tokens": n.step_tokens,
                "cum_tokens": n.cum_tokens,
                "score": n.score,
                "terminal": n.terminal,
                "terminal_reason": n.terminal_reason,
                "answer": n.answer,
                "kept": n.kept,
                "n_children": n.n_children,
                "cluster": n.cluster,
            }
            for n in nodes
        ],
    }
