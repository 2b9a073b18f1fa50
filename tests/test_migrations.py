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
from etsq.store.runs import RunSpec, create_run, find_run, load_problems
from etsq.store.schema import Base
from etsq.store.session import Store, current_revision, get_engine, session_scope, upgrade
from tests.helpers import queued_ids


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
    run_id, _ = create_run(Store.open(db_url), spec, load_problems(settings, spec), ["etsq"])
    for job_id in queued_ids(Store.open(db_url), run_id):
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
    return _insert_run(s, problems, dataset=dataset, method=search.method, width=search.width, config=config,
                       config_hash=digest)  # fmt: skip


def _insert_run(s: Session, problems: list[m.Problem], **values: Any) -> int:
    """A runs row written with the columns of an older schema only (Core, not the ORM's columns)."""
    row = {"seed": 0, "policy_model": "sim", "prm_model": "sim", "versions": {}, **values}
    run_id = int(s.execute(insert(m.Run.__table__).values(**row).returning(m.Run.id)).scalar_one())
    s.add_all(problems)
    s.flush()  # the problems' ids
    jobs = [{"run_id": run_id, "problem_id": p.id, "queue": "etsq", "status": "queued"} for p in problems]
    s.execute(insert(m.Job.__table__), jobs)
    return run_id


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
        int_temp = _old_run(s, "gsm8k", rows, search, {"softmax_temp": 1})  # a sweep's integer
        by_file = _old_run(s, "./mine.jsonl", file_rows, search, {})
    upgrade(db_url)
    settings = Settings.from_env().with_(database_url=db_url)

    def found(dataset: str, limit: int | None, **changes: Any) -> int | None:
        spec = RunSpec(
            dataset, SearchConfig(method="rebase", width=4, **changes), ModelConfig.create("sim"), limit
        )
        with Store.open(db_url).session() as s:
            return find_run(s, spec, load_problems(settings, spec))

    assert found("gsm8k", 2) == typed
    assert found("GSM8K", 2) == typed
    assert found("gsm8k", 2, softmax_temp=1.0) == int_temp
    assert found(str(path), None) == by_file
    assert found("gsm8k", 3) is None
    with session_scope(db_url) as s:
        runs = {r.id: r for r in s.scalars(select(m.Run))}
        assert runs[lower].config_hash.endswith(f"-dup-{lower}")  # kept, but no longer the identity
        assert runs[typed].config["dataset"] == "gsm8k" and runs[typed].config["problems"] == 2
        assert runs[int_temp].config["search"]["softmax_temp"] == 1.0
        assert runs[by_file].config["data_hash"] == mine.content_hash
    command.downgrade(alembic_config(db_url), "0004")
    with session_scope(db_url) as s:
        assert all("data_hash" not in config for config in s.scalars(select(m.Run.config)))
    upgrade(db_url)
    assert found("gsm8k", 2) == typed


def _0005_run(s: Session, rows: list[m.Problem], search: SearchConfig, embedding: str | None = None) -> int:
    """A run as 0005 stored it: every search field, and the models' embedding whatever the method."""
    data = load_dataset("gsm8k", None).head(len(rows))
    models = {**ModelConfig.create("sim").to_dict(), "embedding": embedding}
    config = {
        "dataset": "gsm8k", "data_hash": data.content_hash, "problems": len(rows), "limit": len(rows),
        "search": search.to_dict(), "models": models,
    }  # fmt: skip
    identity = {key: config[key] for key in ("data_hash", "search", "models")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return _insert_run(s, rows, dataset="gsm8k", method=search.method, width=search.width, config=config,
                       config_hash=digest)  # fmt: skip


def test_0007_identifies_runs_by_what_their_method_reads(db_url: str) -> None:
    """Runs that differ only in a parameter their method never read become one identity: the older
    is the run a resubmission finds, the newer is kept and marked as its duplicate."""
    from alembic import command

    from etsq.store.session import alembic_config

    command.downgrade(alembic_config(db_url), "0006")
    with session_scope(db_url) as s:
        rows = [
            m.Problem(dataset="gsm8k", problem_id=p.problem_id, question=p.question, answer=p.answer, meta={})
            for p in load_dataset("gsm8k", None).head(2)
        ]
        rebase = _0005_run(s, rows, SearchConfig(method="rebase", width=4))
        rebase_2 = _0005_run(
            s, rows, SearchConfig(method="rebase", width=4, lambda_b=2.0)
        )  # REBASE ignores it
        ets = _0005_run(s, rows, SearchConfig(method="ets", width=4))
        ets_2 = _0005_run(s, rows, SearchConfig(method="ets", width=4, lambda_b=2.0))
        bon = _0005_run(s, rows, SearchConfig(method="bon", width=4))
        bon_emb = _0005_run(s, rows, SearchConfig(method="bon", width=4, beam_k=3), embedding="e")
    upgrade(db_url)
    settings = Settings.from_env().with_(database_url=db_url)

    def found(method: str, **changes: Any) -> int | None:
        spec = RunSpec("gsm8k", SearchConfig(method=method, width=4, **changes), ModelConfig.create("sim"), 2)
        with Store.open(db_url).session() as s:
            return find_run(s, spec, load_problems(settings, spec))

    assert found("rebase") == found("rebase", lambda_b=2.0) == rebase
    assert (found("ets"), found("ets", lambda_b=2.0)) == (ets, ets_2)
    assert found("bon", beam_k=5) == bon
    duplicates = {rebase_2: rebase, bon_emb: bon}
    with session_scope(db_url) as s:
        stored = {r.id: r for r in s.scalars(select(m.Run))}
        assert {rid: r.duplicate_of for rid, r in stored.items()} == {
            rid: duplicates.get(rid) for rid in (rebase, rebase_2, ets, ets_2, bon, bon_emb)
        }
        assert "lambda_b" not in stored[rebase].config["search"]
        assert "embedding" not in stored[rebase].config["models"]
        assert (
            stored[ets_2].config["search"]["lambda_b"] == 2.0
            and "embedding" in stored[ets_2].config["models"]
        )
    env = {"ETSQ_DATABASE_URL": db_url}
    from tests.helpers import cli_json

    status = {r["run_id"]: r for r in cli_json("status", env=env)}
    assert status[rebase_2]["duplicate_of"] == rebase and status[rebase]["duplicate_of"] is None
    assert status[ets_2]["label"] == "ets W=4 λb=2 · sim"
    rows_out = {r["run_id"]: r for r in cli_json("aggregate", env=env)}
    assert rows_out[bon_emb]["duplicate_of"] == bon and rows_out[bon_emb]["label"] == "bon W=4 · sim"
    command.downgrade(alembic_config(db_url), "0006")
    with session_scope(db_url) as s:
        configs = dict(s.execute(select(m.Run.id, m.Run.config)).tuples().all())
        assert configs[rebase]["search"]["lambda_b"] == 1.0 and configs[bon]["models"]["embedding"] is None
    upgrade(db_url)
    assert found("rebase", lambda_b=2.0) == rebase
    with session_scope(db_url) as s:
        assert s.get_one(m.Run, rebase_2).duplicate_of == rebase
