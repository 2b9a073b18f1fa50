"""The CLI's contract: bad input is one line on stderr, exit status 2, and no run written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select

from etsq.store import schema as m
from tests.helpers import cli, cli_json, one_error_line, tiny_submit_args


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
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{db}", "ETSQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    assert message in one_error_line(cli("submit", *args, env=env))
    assert _runs_in(db) == 0


def test_unreachable_broker_writes_no_run(tmp_path: Path, tiny_model: Path) -> None:
    db = tmp_path / "cli.db"
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{db}", "ETSQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    assert "broker" in one_error_line(cli("submit", "gsm8k", *tiny_submit_args(tiny_model), env=env))
    assert _runs_in(db) == 0


def test_malformed_dataset_row_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n{not json\n")
    line = one_error_line(
        cli("submit", str(data), env={"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    )
    assert f"{data}:2:" in line


def test_unknown_run_is_a_user_error(tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    for args in (["status", "42"], ["aggregate", "42"], ["export", "42"], ["cancel", "42"]):
        assert "no run with id 42" in one_error_line(cli(*args, env=env))


def test_export_of_an_unknown_run_leaves_no_file(tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    target = tmp_path / "out.jsonl"
    one_error_line(cli("export", "999", "-o", str(target), env=env))
    assert list(tmp_path.glob("out.jsonl*")) == []


def test_empty_database_lists_nothing(tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    assert cli_json("status", env=env) == []
    assert cli_json("aggregate", env=env) == []


def test_help_shows_examples() -> None:
    result = cli("submit", "--help")
    assert result.exit_code == 0 and "etsq submit math500 --method ets --width 256" in result.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [("ETSQ_JOB_TIME_LIMIT", "abc"), ("ETSQ_HTTP_RETRIES", "0"), ("ETSQ_HEARTBEAT_S", "nan")],
)
def test_a_malformed_setting_is_one_line_naming_it(tmp_path: Path, name: str, value: str) -> None:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}", name: value}
    assert one_error_line(cli("status", env=env)).startswith(f"etsq: error: {name}={value!r}: ")
    assert cli("status", "--help", env=env).exit_code == 0  # help needs no settings


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from etsq.settings import SettingsError

    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}", "ETSQ_JOB_TIME_LIMIT": "abc"}
    with pytest.raises(SettingsError):
        cli("--debug", "status", env=env)


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr("etsq.store.runs.statuses", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli("status", env={"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"})


def _imported_run(tmp_path: Path) -> dict[str, str]:
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    data = Path(__file__).parent / "data" / "reference_small.json"
    assert (
        cli_json("import", str(data), "--dataset", "mine", "--method", "ets", "--width", "4", env=env)[
            "run_id"
        ]
        == 1
    )
    return env


def test_export_to_a_device_writes_in_place_and_a_full_one_is_one_line(tmp_path: Path) -> None:
    env = _imported_run(tmp_path)
    line = one_error_line(cli("export", "1", "-o", "/dev/full", env=env))
    assert "cannot write /dev/full" in line and "No space left on device" in line
    assert Path("/dev/full").is_char_device()  # never replaced by a regular file
    assert cli("export", "1", "-o", "/dev/null", env=env).exit_code == 0
    assert Path("/dev/null").is_char_device()


def test_export_to_an_empty_or_missing_path_is_one_line(tmp_path: Path) -> None:
    env = _imported_run(tmp_path)
    assert "output file name is empty" in one_error_line(cli("export", "1", "-o", "", env=env))
    line = one_error_line(cli("export", "1", "-o", str(tmp_path / "no" / "such" / "f.jsonl"), env=env))
    assert "No such file or directory" in line
    assert not (tmp_path / "no").exists()
