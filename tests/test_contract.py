"""The input contract, input by input: a user's mistake is one `etsq: error:` line naming what is
wrong, exit status 2, and nothing written (no run, no problem rows, no stray file, no broker started).

`CASES` is the list of bad inputs a careful new user tried (issue 10); each runs in-process through
click's runner against a fresh SQLite database, with an unreachable broker unless a case needs the
embedded one (which it must then not start).
"""

from __future__ import annotations

import json
import shlex
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select

from etsq.queue.broker import stop_local_redis
from etsq.queue.messages import message_job_id
from etsq.store import schema as m
from tests.helpers import cli, cli_json, etsq, one_error_line
from tests.services import RedisHandle, start_redis

UNREACHABLE = "redis://127.0.0.1:1/0"
ROW = json.dumps({"question": "1+1?", "answer": "2"})
SWEEP_OK = "datasets: [gsm8k]\nmethods: [rebase]\nwidths: [4]\nlimit: 2\nmodels: {backend: sim}\n"


@dataclass(frozen=True)
class Case:
    """One bad input: a command line (`{tmp}`, `{file}`, `{sweep}` are filled in), what the line names."""

    args: str
    says: str
    env: dict[str, str] = field(default_factory=dict)
    file: bytes | None = None  # written to {file} (a .jsonl)
    sweep: str | bytes | None = None  # written to {sweep} (a .yaml)
    setup: Callable[[Path], None] | None = None

    @property
    def id(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{extra} {self.args}".strip()[:80]


def _sweep(**overrides: str) -> str:
    keys = {"datasets": "[gsm8k]", "methods": "[rebase]", "widths": "[4]", **overrides}
    return "".join(f"{key}: {value}\n" for key, value in keys.items() if value != "DROP")


def _newer_database(tmp: Path) -> None:
    with sqlite3.connect(tmp / "etsq.db") as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")


def _a_file(tmp: Path) -> None:
    (tmp / "afile").write_text("not a directory\n")


S = "submit gsm8k --backend sim --limit 2"
CASES = [
    # Numbers that are not finite or out of their documented range.
    Case(f"{S} --method ets --lambda-b nan", "lambda_b must be a finite number >= 0"),
    Case(f"{S} --method ets --lambda-b inf", "lambda_b must be a finite number"),
    Case(f"{S} --method ets --lambda-b -1", "lambda_b must be"),
    Case(f"{S} --method ets --lambda-s nan", "lambda_s must be a finite number"),
    Case(f"{S} --softmax-temp inf", "softmax_temp must be a finite number > 0"),
    Case(f"{S} --softmax-temp 0", "softmax_temp must be a finite number > 0"),
    Case(f"{S} --temperature nan", "temperature must be a finite number"),
    Case(f"{S} --temperature 1e9", "temperature must be a finite number >= 0 and <= 100"),
    Case(f"{S} --cluster-threshold 3", "cluster_threshold must be"),
    Case(f"{S} --width 1000000000", "above ETSQ_MAX_WIDTH=65536"),
    Case(f"{S} --width 70000", "above ETSQ_MAX_WIDTH=65536"),
    Case(f"{S} --width 64", "above ETSQ_MAX_WIDTH=32", env={"ETSQ_MAX_WIDTH": "32"}),
    Case(f"{S} --width 0", "--width"),
    Case(f"{S} --width 4.5", "--width"),
    Case(f"{S} --seed -1", "--seed"),
    Case(f"{S} --seed 3000000000", "seed must be an integer >= 0 and <= 2,147,483,647"),
    Case(f"{S} --max-step-tokens 99999999", "max_step_tokens must be"),
    Case(f"{S} --max-depth 0", "--max-depth"),
    Case(f"{S} --limit 0", "--limit"),
    Case(f"{S} --beam-k 0", "--beam-k"),
    Case(f"{S} --sim-latency nan", "sim_latency_s must be a finite number"),
    Case(f"{S} --sim-latency 99999", "sim_latency_s must be"),
    Case(f"{S} --method magic", "--method"),
    # Model servers: parsed, refused where they do not belong, checked to answer.
    Case("submit gsm8k --backend openai", "needs a policy server URL"),
    Case("submit gsm8k --backend openai --policy-url 'not a url'", "'not a url' is not a URL"),
    Case("submit gsm8k --backend openai --policy-url ftp://h:1", "the scheme must be http or https"),
    Case("submit gsm8k --backend openai --policy-url http://h:99999", "is not a URL"),
    Case("submit gsm8k --backend sglang --policy-url http://127.0.0.1:1", "cannot reach the sglang servers"),
    Case("submit gsm8k --backend openai --policy-url http://127.0.0.1:1", "--no-check-servers"),
    Case("submit gsm8k --backend sim --policy-url http://h:1", "need --backend sglang or --backend openai"),
    Case("submit gsm8k --prm-url http://h:1", "need --backend sglang or --backend openai, not local"),
    Case("submit gsm8k --backend openai --prm-api fork --no-check-servers", "--prm-api fork"),
    Case(f"{S} --queue a,b", "a queue name is"),
    Case(f"{S} --policy-model ''", "policy must be a non-empty string"),
    # Datasets.
    Case("submit nosuchset", "unknown dataset 'nosuchset'"),
    Case("submit {tmp}/absent.jsonl", "absent.jsonl does not exist"),
    Case("submit {tmp}", "unknown dataset"),
    Case("submit {file}", "not UTF-8", file=b'{"question": "caf\xe9", "answer": "1"}\n'),
    Case("submit {file}", "has no rows", file=b"\n"),
    Case("submit {file}", "p.jsonl:2: invalid JSON", file=(ROW + "\n{nope\n").encode()),
    Case("submit {file}", "NUL", file=b'{"question": "a\\u0000", "answer": "1"}\n'),
    Case(f"{S}", "ETSQ_DATA_DIR=", env={"ETSQ_DATA_DIR": "/nonexistent/data"}),
    # Sweep files.
    Case("sweep {sweep}", "not UTF-8", sweep=b"\xff\xfe datasets"),
    Case("sweep {sweep}", "invalid YAML", sweep="datasets: [gsm8k\n"),
    Case("sweep {sweep}", "a sweep file is a mapping", sweep="- gsm8k\n"),
    Case("sweep {sweep}", "unknown keys width", sweep=_sweep(width="4")),
    Case("sweep {sweep}", "missing widths", sweep=_sweep(widths="DROP")),
    Case("sweep {sweep}", "width must be an integer, got 4.7", sweep=_sweep(widths="[4.7]")),
    Case("sweep {sweep}", "got True", sweep=_sweep(widths="[true]")),
    Case("sweep {sweep}", "got '4'", sweep=_sweep(widths="['4']")),
    Case("sweep {sweep}", "beam_k must be an integer >= 1", sweep=_sweep(params="{beam_k: -3}")),
    Case(
        "sweep {sweep}", "dvts_subtrees must be", sweep=_sweep(methods="[dvts]", params="{dvts_subtrees: 0}")
    ),
    Case("sweep {sweep}", "lambda_b must be", sweep=_sweep(params="{lambda_b: .nan}")),
    Case("sweep {sweep}", "the grid has no runs: datasets is empty", sweep=_sweep(datasets="[]")),
    Case("sweep {sweep}", "params.lambda_b is empty", sweep=_sweep(params="{lambda_b: []}")),
    Case(
        "sweep {sweep}",
        "more than 100,000",
        sweep=_sweep(seeds=str(list(range(500))), widths=str(list(range(1, 300)))),
    ),
    Case("sweep {sweep}", "params must be a mapping", sweep=_sweep(params="[1, [2]]")),
    Case("sweep {sweep}", "unknown search parameters bogus", sweep=_sweep(params="{bogus: 1}")),
    Case("sweep {sweep}", "models: unknown backend 'gpu'", sweep=_sweep(models="{backend: gpu}")),
    Case("sweep {sweep}", "models: unknown model options colour", sweep=_sweep(models="{colour: red}")),
    Case("sweep {sweep}", "limit must be", sweep=_sweep(limit="0")),
    Case("sweep {sweep}", "limit must be", sweep=_sweep(limit="true")),
    Case("sweep {sweep}", "dataset must be a non-empty string, got 3", sweep=_sweep(datasets="[3]")),
    Case("sweep {sweep}", "method must be a non-empty string", sweep=_sweep(methods="[null]")),
    Case("sweep {sweep}", "s.yaml: unknown method 'magic'", sweep=_sweep(methods="[magic]")),
    Case("sweep {tmp}/absent.yaml", "does not exist"),
    # The worker's options (checked before it connects anywhere).
    Case("worker --loglevel bogus", "unknown --loglevel 'BOGUS'"),
    Case("worker --gpu x", "--gpu must be one GPU index"),
    Case("worker --gpu 99999", "gpu must be an integer"),
    Case("worker --concurrency 5000", "concurrency must be an integer >= 1 and <= 1,024"),
    Case("worker --queue 'a b'", "a queue name is"),
    Case("worker --backend sglang --policy-url 'not a url'", "--policy-url 'not a url' is not a URL"),
    Case("worker --policy-url http://h:1", "--policy-url needs --backend sglang or --backend openai"),
    Case("worker --backend sglang", "--backend and --prm-url need --policy-url"),
    # Settings, the database and its revision.
    Case("status", "ETSQ_JOB_TIME_LIMIT='abc': not a valid integer", env={"ETSQ_JOB_TIME_LIMIT": "abc"}),
    Case("status", "ETSQ_STALE_AFTER_S='1e300'", env={"ETSQ_STALE_AFTER_S": "1e300"}),
    Case("status", "ETSQ_JANITOR_S='inf'", env={"ETSQ_JANITOR_S": "inf"}),
    Case("status", "ETSQ_JOB_TIME_LIMIT='99999999999'", env={"ETSQ_JOB_TIME_LIMIT": "99999999999"}),
    Case("status", "ETSQ_QUEUE='a b'", env={"ETSQ_QUEUE": "a b"}),
    Case("status", "ETSQ_MAX_WIDTH='0'", env={"ETSQ_MAX_WIDTH": "0"}),
    Case("status", "ETSQ_DATABASE_URL='notaurl': not a database URL", env={"ETSQ_DATABASE_URL": "notaurl"}),
    Case(
        "status", "cannot create the directory /proc/x", env={"ETSQ_DATABASE_URL": "sqlite:////proc/x/e.db"}
    ),
    Case(
        "status",
        "a file is in the way",
        env={"ETSQ_DATABASE_URL": "sqlite:///{tmp}/afile/e.db"},
        setup=_a_file,
    ),
    Case(
        "status",
        "a file is in the way",
        env={"ETSQ_HOME": "{tmp}/afile", "ETSQ_DATABASE_URL": ""},
        setup=_a_file,
    ),
    Case("db upgrade --revision bogus", "Can't locate revision identified by 'bogus'"),
    Case("status", "which this etsq does not know", setup=_newer_database),
    # Runs that do not exist, and brokers etsq cannot use or does not own.
    Case("status 999", "no run with id 999"),
    Case("cancel 999", "no run with id 999"),
    Case("resume 999", "no run with id 999"),
    Case("resume abc", "'abc' is not a valid integer"),
    Case("resume", "name a run to resume, or --all"),
    Case("resume 1 --all", "name the runs to resume, or --all, not both"),
    Case("resume 1 2 --wait", "--wait follows one run"),
    Case("resume 998 999", "no run with id 998, 999"),
    Case(S, "cannot reach broker redis://127.0.0.1:1/0"),
    Case(S, "unsupported scheme 'amqp'", env={"ETSQ_BROKER_URL": "amqp://guest@h//"}),
    Case("broker stop", "etsq stops only its embedded one"),
    Case("nosuchcommand", "No such command"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, case: Case) -> None:
    line = one_error_line(run_case(tmp_path, case))
    assert case.says in line, line
    assert_nothing_written(tmp_path)


def run_case(tmp: Path, case: Case, broker: str | None = UNREACHABLE) -> Result:
    """Run the case's command line; `broker=None` leaves the embedded broker as the default."""
    fill = {"tmp": str(tmp), "file": str(tmp / "p.jsonl"), "sweep": str(tmp / "s.yaml")}
    if case.file is not None:
        (tmp / "p.jsonl").write_bytes(case.file)
    if case.sweep is not None:
        sweep = case.sweep.encode() if isinstance(case.sweep, str) else case.sweep
        (tmp / "s.yaml").write_bytes(sweep)
    if case.setup is not None:
        case.setup(tmp)
    env = {
        "ETSQ_HOME": str(tmp / "home"),
        "ETSQ_DATABASE_URL": f"sqlite:///{tmp / 'etsq.db'}",
        **{k: v.format(**fill) for k, v in case.env.items()},
    }
    if broker is not None:
        env.setdefault("ETSQ_BROKER_URL", broker)
    return cli(*shlex.split(case.args.format(**fill)), env=env)


def assert_nothing_written(tmp: Path) -> None:
    """No run or problem rows, no half-written file, no embedded broker."""
    db = tmp / "etsq.db"
    if db.is_file():
        with sqlite3.connect(db) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for table in {"runs", "jobs", "problems"} & tables:
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
    stray = [p for p in tmp.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert stray == []
    assert not (tmp / "home" / "redis").exists()


EMBEDDED_CASES = [c for c in CASES if "broker" not in c.says and "ETSQ_BROKER_URL" not in c.env]


@pytest.mark.parametrize("case", EMBEDDED_CASES[::4], ids=[c.id for c in EMBEDDED_CASES[::4]])
def test_a_command_that_fails_before_it_needs_the_broker_does_not_start_the_embedded_one(
    tmp_path: Path, case: Case
) -> None:
    one_error_line(run_case(tmp_path, case, broker=None))
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------- with a real Redis


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisHandle) -> dict[str, str]:
    """A fresh database and a queue of this test's own on the session's Redis."""
    return {
        "ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'etsq.db'}",
        "ETSQ_BROKER_URL": redis_server.url,
        "ETSQ_QUEUE": f"q-{tmp_path.name[-20:]}",
    }


def _queued(redis_server: RedisHandle, env: dict[str, str]) -> list[int]:
    """Job ids of the search messages waiting in the test's queue."""
    with redis_server.client() as client:
        raw = client.lrange(env["ETSQ_QUEUE"], 0, -1)
    return sorted(job_id for job_id in map(message_job_id, raw) if job_id is not None)


def _rows(env: dict[str, str], table: str) -> int:
    with sqlite3.connect(env["ETSQ_DATABASE_URL"].removeprefix("sqlite:///")) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _submit(env: dict[str, str], *args: str) -> dict[str, Any]:
    return cli_json("submit", *args, "--backend", "sim", "--method", "bon", "--width", "2", env=env)  # type: ignore[no-any-return]


def test_the_same_data_under_any_spelling_is_one_run(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _submit(env, "gsm8k", "--limit", "3")
    assert first["created"]
    assert not _submit(env, "GSM8K", "--limit", "3")["created"]
    rows = [json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) for i in range(4)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    mine = _submit(env, "./mine.jsonl")
    assert _submit(env, str(path))["run_id"] == mine["run_id"]
    assert _submit(env, "mine.jsonl", "--limit", "40")["run_id"] == mine["run_id"]  # limit past the end
    [row] = cli_json("status", str(mine["run_id"]), env=env)
    assert (row["dataset"], row["problems"]) == ("mine", 4)
    with sqlite3.connect(tmp_path / "etsq.db") as conn:
        [(config,)] = conn.execute("SELECT config FROM runs WHERE id = ?", (mine["run_id"],)).fetchall()
    stored = json.loads(config)
    assert stored["dataset"] == str(path) and stored["problems"] == 4 and len(stored["data_hash"]) == 64


def test_changed_data_at_the_same_path_is_a_new_run(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(ROW + "\n")
    before = _submit(env, str(path))
    path.write_text(ROW + "\n" + json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    after = _submit(env, str(path))
    assert after["created"] and after["run_id"] != before["run_id"] and after["jobs"] == 2
    path.write_text(json.dumps({"question": "1+1?", "answer": "3"}) + "\n")  # same id, other answer
    assert _submit(env, str(path))["created"]
    assert _rows(env, "runs") == 3


def test_a_float_parameter_written_as_an_integer_is_the_same_run(tmp_path: Path, env: dict[str, str]) -> None:
    cli_json(
        "submit", "gsm8k", "--backend", "sim", "--method", "ets", "--limit", "1", "--lambda-b", "2", env=env
    )
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        _sweep(methods="[ets]", widths="[16]", limit="1", params="{lambda_b: 2}", models="{backend: sim}")
    )
    [row] = cli_json("sweep", str(sweep), env=env)
    assert not row["created"]


def test_a_parameter_the_method_does_not_read_warns_and_keeps_the_run(env: dict[str, str]) -> None:
    args = ("submit", "gsm8k", "--backend", "sim", "--method", "rebase", "--width", "4", "--limit", "1")
    default = cli(*args, env=env)
    assert default.exit_code == 0 and "has no effect" not in default.stderr, default.stderr
    assert default.stderr.startswith("no worker is running")  # the one line: who will search it
    again = cli(*args, "--lambda-b", "2", "--embedding-model", "m", "--softmax-temp", "0.2", env=env)
    assert again.exit_code == 0, again.stderr
    assert again.stdout == default.stdout  # the default REBASE run's id
    lines = again.stderr.splitlines()
    assert lines[:2] == ["--lambda-b has no effect on rebase", "--embedding-model has no effect on rebase"]
    assert not any("softmax-temp" in line for line in lines)  # rebase reads it: no warning
    assert _rows(env, "runs") == 1


def test_a_sweep_over_a_parameter_one_method_ignores_makes_only_distinct_runs(
    tmp_path: Path, env: dict[str, str]
) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        _sweep(methods="[ets, rebase]", limit="1", params="{lambda_b: [1.0, 2.0]}", models="{backend: sim}")
    )
    dry = cli("sweep", str(sweep), "--dry-run", "--json", env=env)
    assert dry.exit_code == 0, dry.stderr
    assert [p["label"] for p in json.loads(dry.stdout)] == [
        "ets W=4 · sim",
        "ets W=4 λb=2 · sim",
        "rebase W=4 · sim",
    ]
    assert "dry run: 4 grid points -> 3 runs (3 new, 0 existing), 3 new jobs" in dry.stderr
    done = cli("sweep", str(sweep), "--json", env=env)
    assert len(json.loads(done.stdout)) == 3 and _rows(env, "runs") == 3
    assert "sweep: 4 grid points -> 3 runs (3 created, 0 existing)" in done.stderr


def test_resume_sends_messages_only_for_jobs_without_one(
    env: dict[str, str], redis_server: RedisHandle
) -> None:
    run = _submit(env, "gsm8k", "--limit", "3")
    ids = _queued(redis_server, env)
    assert len(ids) == 3
    out = cli_json("resume", str(run["run_id"]), env=env)
    assert (out["enqueued"], out["already_queued"], out["workers_listening"]) == (0, 3, False)
    assert _queued(redis_server, env) == ids  # no duplicates
    with redis_server.client() as client:
        client.delete(env["ETSQ_QUEUE"])  # as after a flushed Redis
    assert cli_json("resume", str(run["run_id"]), env=env)["enqueued"] == 3
    assert _queued(redis_server, env) == ids
    result = cli("resume", str(run["run_id"]), env=env)
    assert result.exit_code == 0 and "no worker is running for the broker" in result.stderr
    assert "`etsq worker`" in result.stderr
    assert f"etsq resume {run['run_id']} --wait" in result.stderr


def test_resume_all_after_a_flushed_redis_sends_each_unfinished_runs_jobs_once(
    env: dict[str, str], redis_server: RedisHandle
) -> None:
    """`resume --all` resumes every run with unfinished jobs, a cancelled one included (a cancel is
    a pause), and `resume RUN RUN` the runs named; a job whose message waits gets no second one."""
    first, second = _submit(env, "gsm8k", "--limit", "3"), _submit(env, "math500", "--limit", "2")
    ids = _queued(redis_server, env)
    assert len(ids) == 5
    assert cli("cancel", str(second["run_id"]), env=env).exit_code == 0
    with redis_server.client() as client:
        client.delete(env["ETSQ_QUEUE"])  # as after a flushed Redis
    every = cli_json("resume", "--all", env=env)
    assert [(r["run_id"], r["enqueued"], r["already_queued"], r["uncancelled"]) for r in every] == [
        (first["run_id"], 3, 0, 0),
        (second["run_id"], 2, 0, 2),
    ]
    assert _queued(redis_server, env) == ids  # each job once
    again = cli_json("resume", str(first["run_id"]), str(second["run_id"]), env=env)
    assert [(r["enqueued"], r["already_queued"]) for r in again] == [(0, 3), (0, 2)]
    assert _queued(redis_server, env) == ids
    text = cli("resume", "--all", env=env)
    assert text.exit_code == 0
    assert f"run {first['run_id']}: 0 jobs enqueued, 3 already queued" in text.stdout
    assert "no worker is running" in text.stderr


def test_enqueue_publishes_the_message_send_task_builds(
    env: dict[str, str], redis_server: RedisHandle
) -> None:
    """enqueue sends, field for field, the message Celery's own send_task leaves in Redis (ids aside)."""
    from etsq.queue.app import create_app
    from etsq.queue.messages import TASK_NAME, enqueue
    from etsq.settings import Settings

    app = create_app(Settings.from_env(env))
    queue = env["ETSQ_QUEUE"]
    app.send_task(TASK_NAME, args=[41], queue=queue)
    enqueue(app, [(41, queue)])
    with redis_server.client() as client:
        ours, celerys = (json.loads(raw) for raw in client.lrange(queue, 0, -1))  # LPUSH: newest first
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    assert ours["properties"]["delivery_tag"] != ours["headers"]["id"]
    for message in (ours, celerys):
        for key in ("id", "root_id"):
            message["headers"].pop(key)
        for key in ("correlation_id", "delivery_tag"):
            message["properties"].pop(key)
    assert ours == celerys
    assert message_job_id(json.dumps(ours)) == 41


def test_a_resubmitted_sweep_sends_each_missing_job_once(
    tmp_path: Path, env: dict[str, str], redis_server: RedisHandle
) -> None:
    """The queue is read once per submission; a run two grid points name is resumed twice, sent once."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        _sweep(datasets="[gsm8k, GSM8K]", methods="[bon, rebase]", limit="3", models="{backend: sim}")
    )
    first = cli_json("sweep", str(sweep), env=env)
    assert [r["created"] for r in first] == [True, True, False, False]
    ids = _queued(redis_server, env)
    assert len(ids) == len(set(ids)) == 6
    with redis_server.client() as client:
        client.delete(env["ETSQ_QUEUE"])  # as after a flushed Redis
    again = cli_json("sweep", str(sweep), env=env)
    assert [r["jobs_enqueued"] for r in again] == [3, 3, 0, 0]
    assert _queued(redis_server, env) == ids
    assert [r["jobs_enqueued"] for r in cli_json("sweep", str(sweep), env=env)] == [0, 0, 0, 0]


def test_batched_publish_delivers_every_job_once_to_a_real_worker(
    tmp_path: Path, env: dict[str, str], redis_server: RedisHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs sent by several LPUSHes each reach a real Celery worker exactly once."""
    import os
    import subprocess
    import sys
    import time

    monkeypatch.setattr("etsq.queue.messages.PUBLISH_BATCH", 7)  # 30 jobs: five LPUSHes
    run = _submit(env, "gsm8k", "--limit", "30")
    ids = _queued(redis_server, env)
    assert len(ids) == len(set(ids)) == 30
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--concurrency", "4", "--loglevel", "INFO"],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while cli_json("status", str(run["run_id"]), env=env)[0]["problems_done"] < 30:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(1.0)  # a duplicate would be taken within the worker's next poll
    finally:
        worker.terminate()
        worker.wait(30)
    text = log.read_text()
    assert text.count("succeeded in") == 30 and "'skipped'" not in text, text[-3000:]
    assert _queued(redis_server, env) == []


def test_a_janitor_puts_reclaimed_jobs_ahead_of_the_backlog(
    tmp_path: Path, env: dict[str, str], redis_server: RedisHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs reclaimed from a dead worker are the next a real worker takes, in their order, before
    the messages that waited in the queue: their runs wait on them, and they hold committed depths."""
    import os
    import subprocess
    import sys
    import time

    from etsq.queue.app import create_app
    from etsq.queue.janitor import Janitor
    from etsq.settings import Settings
    from etsq.store.jobs import claim_job
    from etsq.store.session import Store

    monkeypatch.setattr("etsq.queue.messages.PUBLISH_BATCH", 1)  # one push per job: their order holds too
    backlog = _submit(env, "gsm8k", "--limit", "4")["run_id"]
    dead = _submit(env, "math500", "--limit", "3")["run_id"]
    store, settings = Store.open(env["ETSQ_DATABASE_URL"]), Settings.from_env(env)
    with store.session() as s:
        reclaimed = sorted(s.scalars(select(m.Job.id).where(m.Job.run_id == dead)))
    with redis_server.client() as client:  # the dead box took its messages with it
        for raw in client.lrange(env["ETSQ_QUEUE"], 0, -1):
            if message_job_id(raw) in reclaimed:
                client.lrem(env["ETSQ_QUEUE"], 0, raw)
    for job_id in reclaimed:
        assert claim_job(store, job_id, stale_after_s=60, worker="dead-box") is not None
    time.sleep(1.2)
    Janitor(create_app(settings), settings.with_(stale_after_s=1.0), store).sweep()
    assert len(_queued(redis_server, env)) == 7
    with open(tmp_path / "worker.log", "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--concurrency", "1"],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while sum(r["problems_done"] for r in cli_json("status", str(backlog), str(dead), env=env)) < 7:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(30)
    with store.session() as s:
        done = select(m.Job.id).where(m.Job.finished_at.is_not(None)).order_by(m.Job.finished_at, m.Job.id)
        order = list(s.scalars(done))
    assert len(order) == 7 and order[:3] == reclaimed, order


def test_sweep_dry_run_lists_the_runs_and_writes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(_sweep(methods="[rebase, bon]", widths="[2, 4]", limit="2", models="{backend: sim}"))
    result = cli("sweep", str(sweep), "--dry-run", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    planned = json.loads(result.stdout)
    assert len(planned) == 4 and all(p["new"] and p["run_id"] is None for p in planned)
    assert "dry run: 4 runs (4 new, 0 existing), 8 new jobs; nothing was written" in result.stderr
    assert not Path(env["ETSQ_DATABASE_URL"].removeprefix("sqlite:///")).exists()  # not even the file
    assert _queued_len(env) == 0
    done = cli("sweep", str(sweep), env=env)
    assert "sweep: 4 runs (4 created, 0 existing), 8 new jobs, 8 enqueued" in done.stderr
    again = cli("sweep", str(sweep), "--dry-run", "--json", env=env)
    assert not any(p["new"] for p in json.loads(again.stdout))


def _queued_len(env: dict[str, str]) -> int:
    import redis

    with redis.Redis.from_url(env["ETSQ_BROKER_URL"]) as client:
        return int(client.llen(env["ETSQ_QUEUE"]))


def test_cancel_keeps_the_finish_time_of_a_finished_run(tmp_path: Path, env: dict[str, str]) -> None:
    from etsq.queue.execute import run_job
    from etsq.settings import Settings

    run = _submit(env, "gsm8k", "--limit", "2")
    settings = Settings.from_env(env)
    with sqlite3.connect(tmp_path / "etsq.db") as conn:
        job_ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE run_id = ?", (run["run_id"],))]
    assert [run_job(job_id, settings) for job_id in job_ids] == ["done", "done"]
    finished = cli_json("status", str(run["run_id"]), env=env)[0]["finished_at"]
    assert finished is not None
    result = cli("cancel", str(run["run_id"]), env=env)
    assert result.exit_code == 0 and "0 jobs cancelled" in result.stdout
    assert cli_json("status", str(run["run_id"]), env=env)[0]["finished_at"] == finished


def test_a_failed_enqueue_leaves_no_run_and_no_problem_rows(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from etsq.errors import BrokerUnavailable

    def refuse(*_: object) -> None:
        raise BrokerUnavailable("cannot enqueue jobs: the broker went away")

    monkeypatch.setattr("etsq.submit.enqueue", refuse)
    line = one_error_line(cli("submit", "gsm8k", "--backend", "sim", "--limit", "3", env=env))
    assert "the broker went away" in line
    assert (_rows(env, "runs"), _rows(env, "jobs"), _rows(env, "problems")) == (0, 0, 0)


def test_a_broker_that_answers_ping_but_refuses_writes(tmp_path: Path) -> None:
    with start_redis(tmp_path / "r") as server:
        with server.client() as client:
            client.config_set("min-replicas-to-write", 1)  # PING answers, every write is refused
        env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'etsq.db'}", "ETSQ_BROKER_URL": server.url}
        line = one_error_line(cli("submit", "gsm8k", "--backend", "sim", "--limit", "2", env=env))
        assert "NOREPLICAS" in line
        assert_nothing_written(tmp_path)


def test_no_check_servers_stores_a_run_whose_urls_the_workers_give(env: dict[str, str]) -> None:
    out = cli_json("submit", "gsm8k", "--backend", "openai", "--limit", "1", "--no-check-servers", env=env)
    assert out["created"] and out["jobs"] == 1


def test_submit_checks_a_live_server_as_a_worker_would(env: dict[str, str], sglang_server: Any) -> None:
    result = cli(
        "submit", "gsm8k", "--backend", "sglang", "--policy-url", sglang_server.url, "--limit", "1", env=env
    )
    assert result.exit_code == 0, result.stderr
    line = one_error_line(
        cli(
            "submit",
            "gsm8k",
            "--backend",
            "openai",
            "--policy-url",
            sglang_server.url,
            "--limit",
            "1",
            env=env,
        )
    )
    assert "--no-check-servers" in line  # an SGLang server is not an OpenAI-compatible one


@pytest.mark.slow
def test_submit_wait_exits_1_with_the_count_of_failed_problems(tmp_path: Path) -> None:
    env = {
        "ETSQ_HOME": str(tmp_path / "home"),
        "ETSQ_JOB_RETRIES": "0",
        "ETSQ_HTTP_RETRIES": "1",
        "ETSQ_POLICY_URL": "",
    }
    try:
        proc = etsq(
            "submit", "gsm8k", "--backend", "openai", "--policy-url", "http://127.0.0.1:1", "--limit", "2",
            "--no-check-servers", "--wait", env=env, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "2 of 2 problems failed" in proc.stderr
    finally:
        stop_local_redis(tmp_path / "home")


# --------------------------------------------------------------------------- one validation for all


def test_float_parameters_typed_as_integers_are_one_configuration() -> None:
    from etsq.search.config import SearchConfig

    assert (
        SearchConfig(lambda_b=2, temperature=1).to_dict()
        == SearchConfig(lambda_b=2.0, temperature=1.0).to_dict()
    )
    assert isinstance(SearchConfig(lambda_b=2).lambda_b, float)


def test_the_worker_refuses_a_stored_value_as_submit_would(tmp_path: Path) -> None:
    """A run stored before validation (or under a wider ETSQ_MAX_WIDTH) fails with the reason."""
    from etsq.models.config import ModelConfig
    from etsq.queue.execute import run_job
    from etsq.search.config import SearchConfig
    from etsq.settings import Settings
    from etsq.store import schema as m
    from etsq.store.runs import RunSpec, create_run, load_problems
    from etsq.store.session import Store, session_scope, upgrade
    from tests.helpers import queued_ids

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    settings = Settings.from_env().with_(database_url=url)
    spec = RunSpec("gsm8k", SearchConfig(method="ets", width=4), ModelConfig.create("sim"), limit=2)
    run_id, _ = create_run(Store.open(url), spec, load_problems(settings, spec), ["etsq"])
    first, second = queued_ids(Store.open(url), run_id)
    assert run_job(first, settings.with_(max_width=2)) == "failed"
    with session_scope(url) as s:
        run = s.get_one(m.Run, run_id)
        run.config = {**run.config, "search": {**run.config["search"], "lambda_b": float("nan")}}
    assert run_job(second, settings) == "failed"
    with session_scope(url) as s:
        errors = [
            j.error or "" for j in s.scalars(select(m.Job).where(m.Job.run_id == run_id).order_by(m.Job.id))
        ]
    assert "above ETSQ_MAX_WIDTH=2" in errors[0]
    assert "lambda_b must be a finite number" in errors[1]


def test_the_readme_limits_table_is_the_one_validation_uses() -> None:
    from etsq.validation import markdown_table

    assert markdown_table() in (Path(__file__).resolve().parent.parent / "README.md").read_text()
