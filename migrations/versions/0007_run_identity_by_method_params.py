"""run identity by method parameters: a run stores and hashes only what its method reads

A run's stored search config used to hold every search field, so REBASE at lambda_b 1 and 2 (a
parameter only ETS reads) were two runs that searched alike.  From here a run stores the shared
fields and its method's own (etsq.search.methods: `SHARED_PARAMS`, `Method.params`), and the model
config's `embedding` only for a method that clusters (ETS).  This migration strips the other
fields from every stored run and recomputes config_hash as 0005 defined it.  Where two stored runs
now share an identity, nothing is deleted: the older (lower id) gets the hash, so resubmitting
resumes it, and each newer one keeps its rows under a distinct `-dup-<id>` hash with
`duplicate_of` naming the older run (`etsq status` and `etsq aggregate` show it).  Imported
reference runs and runs of a method unknown here keep their config.

Downgrading puts the dropped fields back at their defaults of the time (a dropped value is lost:
it never changed a search) and the 0005 hashes; `duplicate_of` goes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a migration must keep meaning what it meant when written.
SHARED = (
    "method", "width", "seed", "temperature", "max_step_tokens", "max_tokens", "max_depth", "step_delimiter",
)  # fmt: skip
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "rebase": ("softmax_temp",),
    "bon": (),
    "beam": ("beam_k",),
    "dvts": ("dvts_subtrees",),
    "ets": ("softmax_temp", "lambda_b", "lambda_s", "cost", "cluster_threshold"),
    "particle": ("softmax_temp",),
}
EMBEDDERS = ("ets",)
# SearchConfig's fields and defaults as 0005 stored them (for the way down).
SEARCH_DEFAULTS: dict[str, Any] = {
    "method": "rebase", "width": 16, "seed": 0, "temperature": 1.0, "softmax_temp": 0.2,
    "max_step_tokens": 256, "max_tokens": 1024, "max_depth": 25, "step_delimiter": "\n\n", "lambda_b": 1.0,
    "lambda_s": None, "cost": "uniform", "cluster_threshold": 0.05, "beam_k": None, "dvts_subtrees": None,
    "extra": {},
}  # fmt: skip
IDENTITY_KEYS = ("data_hash", "search", "models")

runs = sa.table(
    "runs",
    sa.column("id", sa.Integer),
    sa.column("config", sa.JSON),
    sa.column("config_hash", sa.String),
    sa.column("duplicate_of", sa.Integer),
)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _section(config: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = config.get(key)
    return dict(value) if isinstance(value, dict) else None


def _imported(config: dict[str, Any]) -> bool:
    return config.get("source") == "reference"


def _upgraded(config: dict[str, Any]) -> dict[str, Any]:
    search, models = _section(config, "search"), _section(config, "models")
    if _imported(config) or search is None or search.get("method") not in METHOD_PARAMS:
        return config
    method = str(search["method"])
    reads = set(SHARED) | set(METHOD_PARAMS[method])
    out = {**config, "search": {k: v for k, v in search.items() if k in reads or (k == "extra" and v)}}
    if models is not None and method not in EMBEDDERS:
        out["models"] = {k: v for k, v in models.items() if k != "embedding"}
    return out


def _downgraded(config: dict[str, Any]) -> dict[str, Any]:
    search, models = _section(config, "search"), _section(config, "models")
    if _imported(config) or search is None or search.get("method") not in METHOD_PARAMS:
        return config
    out = {**config, "search": {**SEARCH_DEFAULTS, **search}}
    if models is not None and "embedding" not in models:
        out["models"] = {**models, "embedding": None}
    return out


def _rehash(change: Callable[[dict[str, Any]], dict[str, Any]], mark_duplicates: bool) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(runs.c.id, runs.c.config).order_by(runs.c.id)).all()
    # First move every hash out of the way, so no intermediate state breaks the unique constraint.
    conn.execute(runs.update().values(config_hash=sa.literal("migrating-") + sa.cast(runs.c.id, sa.String)))
    first: dict[str, int] = {}  # identity -> the oldest run that has it
    for run_id, config in rows:
        new_config = change(config if isinstance(config, dict) else {})
        digest = _sha256_json({key: new_config.get(key) for key in IDENTITY_KEYS})
        values: dict[str, Any] = {"config": new_config, "config_hash": digest}
        if digest in first:  # a newer run of the same identity keeps its rows under a distinct hash
            values["config_hash"] = f"{digest[:48]}-dup-{run_id}"
            if mark_duplicates:
                values["duplicate_of"] = first[digest]
        else:
            first[digest] = run_id
        conn.execute(runs.update().where(runs.c.id == run_id).values(**values))


def upgrade() -> None:
    op.add_column("runs", sa.Column("duplicate_of", sa.Integer(), nullable=True))
    _rehash(_upgraded, mark_duplicates=True)


def downgrade() -> None:
    _rehash(_downgraded, mark_duplicates=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("duplicate_of")
