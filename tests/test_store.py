"""The store seam: one Store per database per process, its schema checked once, and sessions that a
caller composes into one transaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from etsq.models.config import ModelConfig
from etsq.search.config import SearchConfig
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store import session as store_session
from etsq.store.jobs import fail_job
from etsq.store.runs import RunSpec, cancel_run, create_run, load_problems
from etsq.store.session import Store
from tests.helpers import cli, cli_json, queued_ids

REFERENCE = Path(__file__).parent / "data" / "reference_small.json"


def _run(store: Store, limit: int = 3) -> tuple[int, list[int]]:
    spec = RunSpec("gsm8k", SearchConfig(method="rebase", width=4), ModelConfig.create("sim"), limit=limit)
    run_id, created = create_run(store, spec, load_problems(Settings.from_env(), spec), ["etsq"])
    assert created
    return run_id, queued_ids(store, run_id)


def _statuses(store: Store, run_id: int) -> list[str]:
    with store.session() as s:
        return list(s.scalars(select(m.Job.status).where(m.Job.run_id == run_id).order_by(m.Job.id)))


def test_two_writes_share_one_transaction(db_url: str) -> None:
    store = Store.open(db_url)
    run_id, [first, *_] = _run(store)
    with pytest.raises(RuntimeError), store.session() as s:
        fail_job(s, first, "one write")
        assert cancel_run(s, run_id) == 2  # the other write sees the first
        raise RuntimeError("after both writes")
    assert _statuses(store, run_id) == ["queued"] * 3  # the rollback undid both
    with store.session() as s:
        fail_job(s, first, "one write")
        cancel_run(s, run_id)
    assert _statuses(store, run_id) == ["failed", "cancelled", "cancelled"]


def test_one_store_per_database_and_nothing_created_until_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lazy' / 'etsq.db'}"
    store = Store.open(url)
    assert Store.open(url) is store
    assert not (tmp_path / "lazy").exists()  # opening connects to nothing and creates nothing
    with store.session() as s:
        assert s.scalars(select(m.Run)).all() == []
    assert (tmp_path / "lazy" / "etsq.db").exists()


def test_a_command_checks_the_schema_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export --format reference` reads the run's status and then its trees: one schema check, not
    one per function; and every later command in the same process reuses the check."""
    checks: list[str] = []
    upgrade = store_session.upgrade

    def counted(url: str, revision: str = "head") -> None:
        checks.append(url)
        upgrade(url, revision)

    monkeypatch.setattr(store_session, "upgrade", counted)
    monkeypatch.setattr(Store, "_open", {})
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'once.db'}"}
    args = ["import", str(REFERENCE), "--dataset", "handmade", "--method", "ets", "--width", "4"]
    run_id = cli_json(*args, env=env)["run_id"]
    assert len(checks) == 1
    monkeypatch.setattr(Store, "_open", {})  # as a new process would
    assert cli("export", str(run_id), "--format", "reference", env=env).exit_code == 0
    assert len(checks) == 2
    assert cli("status", str(run_id), env=env).exit_code == 0
    assert cli_json("aggregate", str(run_id), "--json", env=env)
    assert len(checks) == 2
