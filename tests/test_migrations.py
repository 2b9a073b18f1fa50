"""Migrations: upgrade from empty to head matches the models on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from etsq.db.models import Base
from etsq.db.session import current_revision, get_engine, upgrade


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
