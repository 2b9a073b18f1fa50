"""job leases and unique run configs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpu", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("queue", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("lease", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))

    # Runs submitted before configs were unique keep their rows: later duplicates get a
    # distinct (still 64-character) hash, the oldest keeps the real one.
    op.execute(
        "UPDATE runs SET config_hash = substr(config_hash, 1, 48) || '-dup-' || CAST(id AS TEXT) "
        "WHERE id NOT IN (SELECT min(id) FROM runs GROUP BY config_hash)"
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_config_hash"))
        batch_op.create_unique_constraint(batch_op.f("uq_runs_config_hash"), ["config_hash"])


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_runs_config_hash"), type_="unique")
        batch_op.create_index(batch_op.f("ix_runs_config_hash"), ["config_hash"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("lease")
        batch_op.drop_column("queue")
        batch_op.drop_column("gpu")
