"""Migrations: upgrade from empty to head matches the models on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from etsq.datasets import load_dataset
from etsq.models.config import ModelConfig
from etsq.queue.execute import run_job
from etsq.search.config import SearchConfig
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store.runs import RunSpec, create_run, find_run, load_problems, queued_jobs
from etsq.store.schema import Base
from etsq.store.session import current_revision, get_engine, session_scope, upgrade


def test_head_schema_matches_models(db_url: str) -> None:
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert current_revision(db_url) is not None


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    from alembic import command

    from etsq.store.session import alembic_config

    command.downgrade(alembic_config(url), "base")
    assert set(inspect(get_engine(url)).get_table_names()) <= {"alembic_version"}
    upgrade(url)
    assert {"runs", "jobs", "nodes", "selection_steps", "problems"} <= set(
        inspect(get_engine(url)).get_table_names()
    )


def _node_count(url: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM nodes")) or 0)


def test_rebuilding_the_jobs_table_keeps_every_node(db_url: str) -> None:
    """0004 copies `jobs` on SQLite; nodes reference it with ON DELETE CASCADE and must survive."""
    from alembic import command

    from etsq.store.session import alembic_config

    settings = Settings.from_env().with_(database_url=db_url)
    spec = RunSpec("gsm8k", SearchConfig(method="rebase", width=4), ModelConfig.create("sim"), limit=2)
    run_id, _ = create_run(db_url, spec, load_problems(settings, spec), ["etsq"])
    for job_id, _ in queued_jobs(db_url, run_id, "etsq"):
        assert run_job(job_id, settings) == "done"
    before = _node_count(db_url)
    assert before > 10
    command.downgrade(alembic_config(db_url), "0003")
    assert _node_count(db_url) == before
    upgrade(db_url)
    assert _node_count(db_url) == before
    with pytest.raises(IntegrityError), get_engine(db_url).begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'paused'"))


def _old_run(
    s: Session, dataset: str, problems: list[m.Problem], search: SearchConfig, config_extra: dict[str, Any]
) -> int:
    """A run stored as etsq did before 0005: its config as typed, hashed whole."""
    config = {
        "dataset": dataset,
        "limit": len(problems),
        "search": search.to_dict(),
        "models": ModelConfig.create("sim").to_dict(),
    }
    config["search"].update(config_extra)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    run = m.Run(
        dataset=dataset, method=search.method, width=search.width, seed=0, config=config, config_hash=digest,
        policy_model="sim", prm_model="sim", versions={},
    )  # fmt: skip
    s.add(run)
    s.flush()
    # Core, naming only the columns jobs had then: the ORM would write today's columns too.
    jobs = [{"run_id": run.id, "problem_id": p.id, "queue": "etsq", "status": "queued"} for p in problems]
    s.execute(insert(m.Job.__table__), jobs)
    return run.id


def test_0005_identifies_existing_runs_by_their_stored_problems(db_url: str, tmp_path: Path) -> None:
    from alembic import command

    from etsq.store.session import alembic_config

    command.downgrade(alembic_config(db_url), "0004")
    gsm8k = load_dataset("gsm8k", None).head(2)
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    mine = load_dataset(str(path), None)
    search = SearchConfig(method="rebase", width=4)
    with session_scope(db_url) as s:
        rows = [
            m.Problem(dataset="gsm8k", problem_id=p.problem_id, question=p.question, answer=p.answer, meta={})
            for p in gsm8k
        ]
        file_rows = [
            m.Problem(dataset="mine", problem_id=p.problem_id, question=p.question, answer=p.answer, meta={})
            for p in mine
        ]
        s.add_all(rows + file_rows)
        s.flush()
        typed = _old_run(s, "GSM8K", rows, search, {})
        lower = _old_run(s, "gsm8k", rows, search, {})  # the same run under another spelling
        int_lambda = _old_run(s, "gsm8k", rows, search, {"lambda_b": 2})  # a sweep's integer
        by_file = _old_run(s, "./mine.jsonl", file_rows, search, {})
    upgrade(db_url)
    settings = Settings.from_env().with_(database_url=db_url)

    def found(dataset: str, limit: int | None, **changes: Any) -> int | None:
        spec = RunSpec(
            dataset, SearchConfig(method="rebase", width=4, **changes), ModelConfig.create("sim"), limit
        )
        return find_run(db_url, spec, load_problems(settings, spec))

    assert found("gsm8k", 2) == typed
    assert found("GSM8K", 2) == typed
    assert found("gsm8k", 2, lambda_b=2.0) == int_lambda
    assert found(str(path), None) == by_file
    assert found("gsm8k", 3) is None
    with session_scope(db_url) as s:
        runs = {r.id: r for r in s.scalars(select(m.Run))}
        assert runs[lower].config_hash.endswith(f"-dup-{lower}")  # kept, but no longer the identity
        assert runs[typed].config["dataset"] == "gsm8k" and runs[typed].config["problems"] == 2
        assert runs[int_lambda].config["search"]["lambda_b"] == 2.0
        assert runs[by_file].config["data_hash"] == mine.content_hash
    command.downgrade(alembic_config(db_url), "0004")
    with session_scope(db_url) as s:
        assert all("data_hash" not in r.config for r in s.scalars(select(m.Run)))
    upgrade(db_url)
    assert found("gsm8k", 2) == typed
