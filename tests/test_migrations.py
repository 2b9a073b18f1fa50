"""Migrations: upgrade from empty to head matches the models on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from etsq.db.models import Base
from etsq.db.session import current_revision, get_engine, upgrade
from etsq.models.config import ModelConfig
from etsq.runs import RunSpec, create_run, load_problems, queued_jobs
from etsq.search.config import SearchConfig
from etsq.settings import Settings
from etsq.worker import run_job


def test_head_schema_matches_models(db_url: str) -> None:
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert current_revision(db_url) is not None


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    from alembic import command

    from etsq.db.session import alembic_config

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

    from etsq.db.session import alembic_config

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
