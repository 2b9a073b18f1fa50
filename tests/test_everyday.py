"""Issue 22: what a new user meets on the embedded default (sim backend), one test per item.

Cancel and resume agree (1), `--wait` runs its own run (2), worker presence from the database (3),
commands start without the heavy imports (4), filters checked like submit's values (5), imports
checked against their dataset (6), `status --watch` without a terminal and on a narrow one (7),
Ctrl-C during `--wait` (8), and the smaller three (9).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from etsq.queue.broker import stop_local_redis
from etsq.store.session import Store
from tests.helpers import cli, cli_json, etsq, one_error_line

SIM = ["--backend", "sim", "--method", "rebase", "--width", "2"]
DATA = Path(__file__).resolve().parents[1] / "etsq" / "data"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An ETSQ home on the embedded default (this process and its children), Redis stopped after."""
    home = tmp_path / "home"
    monkeypatch.setenv("ETSQ_HOME", str(home))
    monkeypatch.delenv("ETSQ_DATA_DIR", raising=False)
    yield home
    stop_local_redis(home)


def _store(home: Path) -> Store:
    return Store.open(f"sqlite:///{home / 'etsq.db'}")


def _status(run_id: int) -> dict[str, int]:
    [row] = cli_json("status", str(run_id))
    return row  # type: ignore[no-any-return]


# 1 ------------------------------------------------------------------------------------------------


def test_a_cancel_is_a_pause_that_resume_continues_and_a_resubmission_names(home: Path) -> None:
    submitted = cli("submit", "gsm8k", *SIM, "--limit", "3")
    assert submitted.exit_code == 0 and "etsq worker" in submitted.stderr  # (3) no worker: named
    cancelled = cli("cancel", "1")
    assert "3 jobs cancelled" in cancelled.stdout and "etsq resume 1" in cancelled.stdout
    assert _status(1)["problems_cancelled"] == 3
    assert "problems_cancelled" in cli("status").stdout
    again = cli("submit", "gsm8k", *SIM, "--limit", "3")
    [line] = again.stderr.strip().splitlines()[:1]
    assert "3 cancelled jobs stay cancelled" in line and "`etsq resume 1`" in line
    resumed = cli("resume", "1")
    assert "3 cancelled jobs queued again" in resumed.stdout
    row = _status(1)
    assert (row["problems_cancelled"], row["problems_queued"], row["status"]) == (0, 3, "queued")


# 3 ------------------------------------------------------------------------------------------------


def test_a_registered_or_busy_worker_counts_as_listening(home: Path) -> None:
    from etsq.store import schema as m
    from etsq.store.workers import live_queues, live_workers, register_worker

    assert cli("submit", "gsm8k", *SIM, "--limit", "2").exit_code == 0
    store = _store(home)
    with store.session() as s:
        assert live_workers(s, 120) == []
        job = s.get_one(m.Job, 1)  # a busy worker: its running job's heartbeat is fresh
        job.status, job.worker, job.heartbeat_at, job.queue = "running", "busy@box", m.utcnow(), "etsq"
    with store.session() as s:
        assert [w.name for w in live_workers(s, 120)] == ["busy@box"]
    resumed = cli_json("resume", "1")
    assert resumed["workers_listening"] is True
    with store.session() as s:
        register_worker(s, "etsq-gpu0-1@box", "gpu0", 1)
    with store.session() as s:
        assert live_queues(s, 120) == ["etsq", "gpu0"]
    quiet = cli("resume", "1")
    assert "no worker" not in quiet.stderr


# 4 ------------------------------------------------------------------------------------------------


def test_status_and_help_start_without_alembic_celery_numpy_or_http_clients(home: Path) -> None:
    assert cli("submit", "gsm8k", *SIM, "--limit", "1").exit_code == 0  # the database, at head
    probe = (
        "import sys\nfrom cli.main import cli\n"
        "try:\n    cli.main(['status', '--json'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('alembic', 'celery', 'numpy', 'httpx', 'aiohttp', 'etsq.search.ilp')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    env = {**os.environ, "ETSQ_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# 5 ------------------------------------------------------------------------------------------------


def test_result_filters_are_checked_like_submit_values(home: Path) -> None:
    assert cli("submit", "gsm8k", *SIM, "--limit", "1").exit_code == 0
    assert "unknown method" in one_error_line(cli("aggregate", "--method", "foo"))
    assert "unknown method" in one_error_line(cli("aggregate", "--method", "ETS"))  # as submit refuses it
    assert [r["run_id"] for r in cli_json("aggregate", "--dataset", "GSM8K")] == [1]
    none = one_error_line(cli("aggregate", "--dataset", "math500"))
    assert "no run matches --dataset math500" in none and "gsm8k" in none and "rebase" in none
    assert "no run matches --method ets" in one_error_line(cli("status", "--method", "ets"))
    assert [r["run_id"] for r in cli_json("status", "--dataset", "GSM8K", "--method", "rebase")] == [1]
    assert "no run matches" in one_error_line(cli("report", "--out", str(home / "r"), "--width", "9"))


# 6 ------------------------------------------------------------------------------------------------


def _reference(rows: list[dict[str, str]], path: Path) -> Path:
    data = [
        {"id": i, "question": r["question"], "ground_truth_answer": r["answer"], "total_tokens": 9,
         "model_answer": [{"text": "The answer is 3.", "step_scores": [0.5]}]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def test_imports_are_checked_against_their_built_in_dataset(home: Path, tmp_path: Path) -> None:
    gsm = [json.loads(line) for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()[:2]]
    file = _reference(gsm, tmp_path / "gsm.json")
    args = ["--method", "rebase", "--width", "1"]
    wrong = one_error_line(cli("import", str(file), "--dataset", "math500", *args))
    assert "[0] (id 0)" in wrong and "math500" in wrong
    assert not (home / "etsq.db").exists()  # nothing written
    edited = _reference([gsm[0], {**gsm[1], "question": "Janet's ducks lay 16 eggs."}], tmp_path / "ed.json")
    assert "[1] (id 1)" in one_error_line(cli("import", str(edited), "--dataset", "gsm8k", *args))
    spaced = _reference(
        [{**gsm[0], "question": "  " + gsm[0]["question"].replace(" ", "\n ")}], tmp_path / "s.json"
    )
    assert cli("import", str(spaced), "--dataset", "GSM8K", *args).exit_code == 0  # whitespace and case
    first = cli_json("import", str(file), "--dataset", "gsm8k", *args)["run_id"]
    again = cli("import", str(file), "--dataset", "gsm8k", *args)
    assert again.stdout.strip() == str(first) and "--dataset gsm8k --method rebase --width 1" in again.stderr
    mine = cli_json("import", str(file), "--dataset", "mine", *args)["run_id"]
    assert mine != first  # the same file under another label is another run


# 7 ------------------------------------------------------------------------------------------------


def test_watch_prints_plain_lines_without_a_terminal_and_keeps_the_count_on_a_narrow_one(home: Path) -> None:
    from etsq.watch import Watch, snapshot

    assert cli("submit", "gsm8k", *SIM, "--limit", "3").exit_code == 0
    assert cli("cancel", "1").exit_code == 0  # a finished run: the watch returns at once
    lines: list[str] = []
    plain = Console(file=io.StringIO(), force_terminal=False)
    Watch(_store(home), None, interval=0.01, console=plain, echo=lines.append).run()
    assert lines == [lines[0]] and lines[0].startswith("run 1: 3/3 cancelled")
    piped = cli("status", "--watch")
    assert piped.stdout.startswith("run 1: 3/3 cancelled")
    narrow = Console(file=io.StringIO(), width=30, force_terminal=True, color_system=None)
    watch = Watch(_store(home), None, console=narrow)
    narrow.print(watch.render(snapshot(_store(home), None)))
    assert narrow.file.getvalue().lstrip().startswith("3/3 ")  # type: ignore[attr-defined]


# 9 ------------------------------------------------------------------------------------------------


def test_the_smaller_three(home: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("datasets: [gsm8k]\nmethods: [rebase]\nwidths: [2]\nlimit: 2\nmodels: {backend: sim}\n")
    planned = cli("sweep", str(sweep), "--dry-run")
    assert planned.exit_code == 0 and "nothing was written" in planned.stderr
    assert not (home / "etsq.db").exists()
    sweep.write_text("datasets: [gsm8k]\nmethods: [rebase]\nwidths: [2]\nmodels: {sim_latency: 0.1}\n")
    refused = one_error_line(cli("sweep", str(sweep), "--dry-run"))
    assert "sim_latency" in refused and "allowed:" in refused and "sim_latency_s" in refused
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text('{"id": 0}\n{"id": 1}\n')
    hint = one_error_line(cli("import", str(jsonl), "--dataset", "x", "--method", "ets", "--width", "1"))
    assert "Extra data" in hint and "reference format" in hint


# 2, 8: a real local worker ------------------------------------------------------------------------


@pytest.mark.slow
def test_wait_runs_its_own_run_first_and_ctrl_c_answers_within_a_second(home: Path) -> None:
    env = {"ETSQ_HOME": str(home)}
    left = etsq("submit", "gsm8k", *SIM, "--limit", "3", env=env)  # another run, left queued
    assert left.returncode == 0 and "etsq worker" in left.stderr
    waited = etsq(
        "submit", "gsm8k", *SIM, "--limit", "2", "--sim-latency", "0", "--wait", env=env, timeout=120
    )
    assert waited.returncode == 0, waited.stderr
    assert "starting one for run 2" in waited.stderr and "3 jobs of other runs wait" in waited.stderr
    assert cli_json("status", "2")[0]["problems_done"] == 2
    assert cli_json("status", "1")[0]["problems_queued"] == 3  # the local worker left them alone

    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "submit", "gsm8k", *SIM, "--limit", "2", "--sim-latency", "2",
         "--wait"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    assert "starting one for run 3" in proc.stderr.readline()
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - sent < 1.5
    assert proc.returncode == 130
    assert "run 3 stays queued; `etsq resume 3 --wait` continues it" in err
    finished = etsq("resume", "3", "--wait", env=env, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert cli_json("status", "3")[0]["problems_done"] == 2


def test_a_wait_local_worker_is_no_shared_worker(home: Path) -> None:
    """Its queue is its run's own: other submissions neither count it nor send jobs there."""
    from etsq.store.workers import live_queues, live_workers, register_worker

    assert cli("submit", "gsm8k", *SIM, "--limit", "1").exit_code == 0
    with _store(home).session() as s:
        register_worker(s, "etsq-etsq.run1-7@box", "etsq.run1", 7)
    with _store(home).session() as s:
        assert live_workers(s, 120) == [] and live_queues(s, 120) == []
        assert [w.queue for w in live_workers(s, 120, shared_only=False)] == ["etsq.run1"]
