"""SQLAlchemy 2.0 typed models: everything a search produced, enough to redo aggregation offline."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from etsq.store.statuses import JobStatus

# Stable constraint names so Alembic migrations are identical on SQLite and Postgres.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY, so BIGINT ids fall back to INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class StatusType(TypeDecorator[JobStatus]):
    """A job status stored as its string and read back as a JobStatus."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


_JOB_STATUS_CHECK = "status IN ({})".format(", ".join(f"'{s.value}'" for s in JobStatus))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Run(Base):
    """One submitted search configuration over a dataset (one job per problem)."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # A run is its configuration: submitting the same config again finds this run.
    config_hash: Mapped[str] = mapped_column(String(64), unique=True)
    policy_model: Mapped[str] = mapped_column(String(500))
    prm_model: Mapped[str] = mapped_column(String(500))
    model_info: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set by migration 0006 on a run stored before whose identity became that of an older run (a
    # parameter its method never read told them apart): the older run is the one a resubmission
    # resumes.  New runs never get one, since identity is unique.
    duplicate_of: Mapped[int | None] = mapped_column(Integer, nullable=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="run", cascade="all, delete-orphan")


class Problem(Base):
    """One dataset row: the question and its ground-truth answer."""

    __tablename__ = "problems"
    __table_args__ = (UniqueConstraint("dataset", "problem_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200))
    problem_id: Mapped[str] = mapped_column(String(200))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Job(Base):
    """One problem of one run: the unit of work a Celery task takes by id."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("run_id", "problem_id"),
        CheckConstraint(_JOB_STATUS_CHECK, name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    problem_id: Mapped[int] = mapped_column(ForeignKey("problems.id"))
    status: Mapped[JobStatus] = mapped_column(StatusType(), default=JobStatus.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    gpu: Mapped[str | None] = mapped_column(String(32), nullable=True)
    queue: Mapped[str | None] = mapped_column(String(200), nullable=True)  # where its task is sent
    # Who holds the job now: a claim sets a fresh lease, and commits check it, so a redelivered
    # task can never run a job that a live worker (recent heartbeat) is still searching.
    lease: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # The lease's generation, one higher at every claim: the fencing token a depth commit checks, so
    # a worker cut off past its lease cannot write once the job was reclaimed (etsq.store.trees).
    lease_gen: Mapped[int] = mapped_column(Integer, server_default="0")
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    depth: Mapped[int] = mapped_column(Integer, default=0)  # last committed depth
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Seconds the job was searched: its depths' wall times summed (etsq.store.trees); a pause between
    # attempts and model loading are not in it.  None for jobs stored before it was measured.
    search_s: Mapped[float | None] = mapped_column(Float, nullable=True)

    run: Mapped[Run] = relationship(back_populates="jobs")
    problem: Mapped[Problem] = relationship()


class Node(Base):
    """One search-tree node; `path` ("0.3.1") is its natural key inside the job."""

    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("job_id", "path"), Index("ix_nodes_job_depth", "job_id", "depth"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), nullable=True)
    depth: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(400))
    text: Mapped[str] = mapped_column(Text)
    step_tokens: Mapped[int] = mapped_column(Integer)
    cum_tokens: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    terminal: Mapped[bool] = mapped_column(Boolean, default=False)
    terminal_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    kept: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    n_children: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cluster: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SelectionStep(Base):
    """What one select step did at one depth: frontier, kept set, KV before/after, timings."""

    __tablename__ = "selection_steps"
    __table_args__ = (UniqueConstraint("job_id", "depth"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    depth: Mapped[int] = mapped_column(Integer)
    remaining: Mapped[int] = mapped_column(Integer)
    frontier_size: Mapped[int] = mapped_column(Integer)
    kept_size: Mapped[int] = mapped_column(Integer)
    children: Mapped[int] = mapped_column(Integer)
    kv_before: Mapped[int] = mapped_column(Integer)  # tokens of all frontier candidates' paths
    kv_after: Mapped[int] = mapped_column(Integer)  # tokens of the kept set's paths
    select_ms: Mapped[float] = mapped_column(Float)
    expand_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    score_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The depth's wall time (what it adds to jobs.search_s) and the share its commit's writes took.
    commit_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    wall_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_clusters: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ilp_vars: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ilp_constraints: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ilp_objective: Mapped[float | None] = mapped_column(Float, nullable=True)
    solver: Mapped[str | None] = mapped_column(String(32), nullable=True)
    solve_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Measured by the policy server during the depth (etsq.models.metrics); NULL for in-process models.
    server_kv_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # peak KV tokens in use
    server_kv_usage: Mapped[float | None] = mapped_column(Float, nullable=True)  # peak fraction of the pool
    server_cache_hit_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    cached_prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # prefix-cache hits
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # prompt tokens the server read
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Worker(Base):
    """A live `etsq worker`: registered when it is ready, seen again at each janitor sweep, removed at
    shutdown.  Whether a worker listens is read here (and from running jobs' heartbeats), not from a
    broker ping that a busy worker answers too late."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery's node name
    queue: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
