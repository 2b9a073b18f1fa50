"""job status check: jobs.status may only hold a JobStatus value

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a migration must keep meaning what it meant when written.
STATUSES = ("queued", "running", "done", "failed", "cancelled")


def upgrade() -> None:
    # A row with any other status could only come from a bug; stop the migration rather than guess.
    condition = "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_check_constraint(op.f("ck_jobs_status"), condition)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_status"), type_="check")
