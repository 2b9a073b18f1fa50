"""Alembic environment: runs migrations against ETSQ_DATABASE_URL or the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool, text

from etsq.store.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from etsq.settings import Settings

        url = Settings.from_env().database_url
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section) or {}
    section["sqlalchemy.url"] = _url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Copying a table drops the old one, and with foreign keys on, that DELETE would cascade
            # to every row referencing it (all nodes of all jobs).  Off here; each app connection
            # turns them on again.
            connection.execute(text("PRAGMA foreign_keys=OFF"))
            connection.commit()
        # render_as_batch: SQLite can only ALTER tables by copying them.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
