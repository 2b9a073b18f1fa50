"""selection wall and commit ms: each depth's wall time and its commit's share of it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Steps stored before keep NULL: the report draws their unmeasured time as "other" only where known.
    with op.batch_alter_table("selection_steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commit_ms", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("wall_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("selection_steps", schema=None) as batch_op:
        batch_op.drop_column("wall_ms")
        batch_op.drop_column("commit_ms")
