"""run identity by content: runs.config gets data_hash, config_hash covers data + configuration

A run used to be identified by its whole stored config, including the dataset argument as typed
(`GSM8K` and `gsm8k`, or two spellings of one file, made two runs; a changed file resumed the old
run).  From here a run's identity is sha256 over {data_hash, search, models}, where data_hash is
the SHA-256 of its problems' [id, question, answer] JSON lines in job order (etsq.datasets.
content_hash).  This migration computes data_hash from each run's stored problems, lower-cases
built-in dataset names, stores float parameters as floats (a sweep's `lambda_b: 1` and the CLI's
1.0 are one configuration), and recomputes config_hash.  Runs that become the same run keep
their rows: the oldest gets the hash, later ones a distinct `-dup-<id>` hash (as in 0003).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a migration must keep meaning what it meant when written.
BUILTINS = ("gsm8k", "math500")
FLOAT_FIELDS = {
    "search": ("temperature", "softmax_temp", "lambda_b", "lambda_s", "cluster_threshold"),
    "models": ("sim_latency_s",),
}
IDENTITY_KEYS = ("data_hash", "search", "models")
NEW_KEYS = ("data_hash", "problems")

runs = sa.table(
    "runs", sa.column("id", sa.Integer), sa.column("config", sa.JSON), sa.column("config_hash", sa.String)
)
jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("run_id", sa.Integer), sa.column("problem_id"))
problems = sa.table(
    "problems",
    sa.column("id", sa.Integer),
    sa.column("problem_id", sa.String),
    sa.column("question", sa.Text),
    sa.column("answer", sa.Text),
)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_hash(rows: Sequence[tuple[str, str, str]]) -> str:
    """etsq.datasets.content_hash over stored (problem_id, question, answer) rows."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(list(row), ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _floats(section: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    out = dict(section)
    for name in names:
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _stored_problems(conn: sa.Connection, run_id: int) -> list[tuple[str, str, str]]:
    q = (
        sa.select(problems.c.problem_id, problems.c.question, problems.c.answer)
        .select_from(jobs.join(problems, problems.c.id == jobs.c.problem_id))
        .where(jobs.c.run_id == run_id)
        .order_by(jobs.c.id)
    )
    return [(str(a), str(b), str(c)) for a, b, c in conn.execute(q)]


def _upgraded(conn: sa.Connection, run_id: int, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    rows = _stored_problems(conn, run_id)
    out = dict(config)
    dataset = str(out.get("dataset", ""))
    if dataset.lower() in BUILTINS:
        out["dataset"] = dataset.lower()
    out["data_hash"] = content_hash(rows)
    out["problems"] = len(rows)
    for section, names in FLOAT_FIELDS.items():
        if isinstance(out.get(section), dict):
            out[section] = _floats(out[section], names)
    return out, _sha256_json({key: out.get(key) for key in IDENTITY_KEYS})


def _downgraded(conn: sa.Connection, run_id: int, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    out = {key: value for key, value in config.items() if key not in NEW_KEYS}
    return out, _sha256_json(out)


def _rehash(rehash: Callable[[sa.Connection, int, dict[str, Any]], tuple[dict[str, Any], str]]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(runs.c.id, runs.c.config).order_by(runs.c.id)).all()
    # First move every hash out of the way, so no intermediate state breaks the unique constraint.
    conn.execute(runs.update().values(config_hash=sa.literal("migrating-") + sa.cast(runs.c.id, sa.String)))
    taken: set[str] = set()
    for run_id, config in rows:
        new_config, digest = rehash(conn, run_id, config if isinstance(config, dict) else {})
        if digest in taken:  # a later run of the same identity keeps its rows under a distinct hash
            digest = f"{digest[:48]}-dup-{run_id}"
        taken.add(digest)
        conn.execute(runs.update().where(runs.c.id == run_id).values(config=new_config, config_hash=digest))


def upgrade() -> None:
    _rehash(_upgraded)


def downgrade() -> None:
    _rehash(_downgraded)
