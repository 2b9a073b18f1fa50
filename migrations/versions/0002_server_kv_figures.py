"""server kv figures: the policy server's measured KV cache per selection step

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("selection_steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("server_kv_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("server_kv_usage", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("server_cache_hit_rate", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("cached_prompt_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("selection_steps", schema=None) as batch_op:
        batch_op.drop_column("prompt_tokens")
        batch_op.drop_column("cached_prompt_tokens")
        batch_op.drop_column("server_cache_hit_rate")
        batch_op.drop_column("server_kv_usage")
        batch_op.drop_column("server_kv_tokens")
