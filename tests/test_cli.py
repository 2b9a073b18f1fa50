"""The CLI's contract: bad input is one line on stderr, exit status 2, and no run written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select

from etsq.db import models as m
from tests.helpers import etsq, etsq_json, tiny_submit_args


def _runs_in(db: Path) -> int:
    if not db.exists():
        return 0
    engine = create_engine(f"sqlite:///{db}")
    try:
        if "runs" not in inspect(engine).get_table_names():
            return 0
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(m.Run)) or 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchset"], "unknown dataset"),
        (["gsm8k", "--method", "magic"], "--method"),
        (["gsm8k", "--width", "0"], "--width"),
        (["gsm8k", "--width", "-3"], "--width"),
        (["gsm8k", "--limit", "0"], "--limit"),
        (["gsm8k", "--method", "ets", "--lambda-b", "-1"], "lambda_b"),
    ],
)
def test_bad_submit_input(tmp_path: Path, args: list[str], message: str) -> None:
    db = tmp_path / "cli.db"
    proc = etsq(
        "submit",
        *args,
        env={"ETSQ_DATABASE_URL": f"sqlite:///{db}", "ETSQ_BROKER_URL": "redis://127.0.0.1:1/0"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etsq: error:") and message in lines[0], proc.stderr
    assert _runs_in(db) == 0


def test_unreachable_broker_writes_no_run(tmp_path: Path, tiny_model: Path) -> None:
    db = tmp_path / "cli.db"
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{db}", "ETSQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    proc = etsq("submit", "gsm8k", *tiny_submit_args(tiny_model), env=env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "broker" in proc.stderr
    assert _runs_in(db) == 0


def test_malformed_dataset_row_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n{not json\n")
    proc = etsq("submit", str(data), env={"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert proc.returncode == 2
    assert f"{data}:2:" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_run_is_a_user_error(tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    for args in (["status", "42"], ["aggregate", "42"], ["export", "42"]):
        proc = etsq(*args, env=env)
        assert proc.returncode == 2 and "no run with id 42" in proc.stderr


def test_empty_database_lists_nothing(tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    assert etsq_json("status", env=env) == []
    assert etsq_json("aggregate", env=env) == []


def test_help_shows_examples() -> None:
    proc = etsq("submit", "--help")
    assert proc.returncode == 0 and "etsq submit math500 --method ets --width 256" in proc.stdout
