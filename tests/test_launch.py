"""`etsq servers up / status / down` with real processes (a stand-in for the engine, since SGLang
needs a GPU), and the SGLang and vLLM command lines against their documented forms."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from etsq.models.backends import check_servers
from etsq.models.config import ModelConfig
from etsq.servers.launcher import ENGINES, LaunchRequest, alive, make_plan, session_members, worker_argv
from etsq.settings import Settings
from tests.helpers import cli, etsq, one_error_line

REPO = Path(__file__).resolve().parent.parent
STANDIN = f"{shlex.quote(sys.executable)} -m tests.launch_standin"


def free_port_pair() -> int:
    """A port P such that P and P + 1 were both free a moment ago."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            if base >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
        return int(base)
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """ETSQ_HOME for child `etsq` processes; whatever servers a test leaves are stopped after it."""
    path = tmp_path / "etsq-home"
    yield path
    for record in (path / "servers").glob("gpu*/servers.json"):
        for server in json.loads(record.read_text())["servers"]:
            for pid in session_members(server["pid"], server["start_ticks"]):
                os.kill(pid, signal.SIGKILL)


def run(home: Path, *args: str) -> Any:
    env = {"ETSQ_HOME": str(home), "PYTHONPATH": str(REPO)}
    return etsq(*args, env=env, timeout=120)


def up_args(gpu: int, policy: str, prm: str, engine: str = "sglang", **opts: str) -> list[str]:
    args = ["servers", "up", "--gpu", str(gpu), "--policy", policy, "--prm", prm, "--engine", engine]
    args += ["--engine-command", f"{STANDIN} {engine}", "--port-base", str(free_port_pair())]
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


def launch_info(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/launch", timeout=5, trust_env=False).json())


def status_rows(home: Path) -> list[dict[str, Any]]:
    proc = run(home, "servers", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


# --------------------------------------------------------------------------- documented command lines


def test_sglang_and_vllm_command_lines_are_the_documented_forms(tmp_path: Path) -> None:
    settings = Settings.for_home(tmp_path)
    sglang = make_plan(
        settings, LaunchRequest(gpu=2, policy="meta-llama/Llama-3.1-8B-Instruct", prm="/m/prm")
    )
    policy, prm = sglang.servers
    # docs.sglang.io: python3 -m sglang.launch_server --model-path M --host H --port P; --enable-metrics
    assert policy.argv == [
        "python3", "-m", "sglang.launch_server", "--model-path", "meta-llama/Llama-3.1-8B-Instruct",
        "--host", "127.0.0.1", "--port", "30020", "--enable-metrics", "--mem-fraction-static", "0.45",
    ]  # fmt: skip
    assert prm.argv == [
        "python3", "-m", "sglang.launch_server", "--model-path", "/m/prm",
        "--host", "127.0.0.1", "--port", "30021", "--enable-metrics", "--mem-fraction-static", "0.7",
    ]  # fmt: skip
    assert policy.log == str(tmp_path / "servers" / "gpu2" / "policy.log")
    vllm = make_plan(
        settings,
        LaunchRequest(gpu=0, policy="Qwen/Qwen2.5-Math-7B-Instruct", prm="p", engine="vllm", port_base=8000,
                      host="0.0.0.0", prm_args="--gpu-memory-utilization 0.3 --max-model-len 4096"),
    )  # fmt: skip
    # docs.vllm.ai: vllm serve MODEL --host H --port P
    assert [s.argv for s in vllm.servers] == [
        ["vllm", "serve", "Qwen/Qwen2.5-Math-7B-Instruct", "--host", "0.0.0.0", "--port", "8000",
         "--enable-prompt-tokens-details", "--gpu-memory-utilization", "0.45"],
        ["vllm", "serve", "p", "--host", "0.0.0.0", "--port", "8001", "--enable-prompt-tokens-details",
         "--gpu-memory-utilization", "0.3", "--max-model-len", "4096"],
    ]  # fmt: skip
    assert vllm.servers[0].url(vllm.host) == "http://127.0.0.1:8000"  # 0.0.0.0 is reached on loopback
    assert (ENGINES["sglang"].backend, ENGINES["vllm"].backend) == ("sglang", "openai")
    assert worker_argv(1, "openai", "http://a:1", "http://a:2") == [
        "etsq", "worker", "--gpu", "1", "--backend", "openai", "--policy-url", "http://a:1", "--prm-url", "http://a:2"
    ]  # fmt: skip


def test_an_engine_command_replaces_only_the_program(tmp_path: Path) -> None:
    plan = make_plan(
        Settings.for_home(tmp_path),
        LaunchRequest(
            gpu=0, policy="m", prm="m", engine_command="'/opt/my env/bin/python' -m sglang.launch_server"
        ),
    )
    assert plan.servers[0].argv[:4] == [
        "/opt/my env/bin/python",
        "-m",
        "sglang.launch_server",
        "--model-path",
    ]


# --------------------------------------------------------------------------- real processes


def test_up_starts_both_servers_pinned_and_detached_then_status_and_down(home: Path) -> None:
    proc = run(home, *up_args(3, "policy-model", "prm-model"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((home / "servers" / "gpu3" / "servers.json").read_text())
    policy, prm = record["servers"]
    # stdout is exactly the worker command for this pair
    assert shlex.split(proc.stdout) == worker_argv(3, "sglang", policy["url"], prm["url"])
    assert prm["port"] == policy["port"] + 1
    for server in (policy, prm):
        info = launch_info(server["url"])  # the `etsq servers up` process is gone; the servers are not
        assert info["cuda_visible_devices"] == "3"
        assert info["sid"] == info["pid"] == server["pid"] != os.getsid(0)  # its own session
        assert info["argv"] == ["sglang", *server["argv"][server["argv"].index("--model-path") :]]
        assert Path(server["log"]) == home / "servers" / "gpu3" / f"{server['role']}.log"
        assert "serving" in Path(server["log"]).read_text()
    assert {(r["role"], r["alive"], r["healthy"]) for r in status_rows(home)} == {
        ("policy", True, True),
        ("prm", True, True),
    }
    children = [launch_info(s["url"])["child"] for s in (policy, prm)]

    os.kill(prm["pid"], signal.SIGKILL)  # a server that dies overnight shows in status
    time.sleep(0.3)
    rows = {r["role"]: r for r in status_rows(home)}
    assert (rows["prm"]["alive"], rows["prm"]["healthy"], rows["policy"]["healthy"]) == (False, False, True)

    down = run(home, "servers", "down", "--gpu", "3")
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("GPU 3: stopped policy")
    assert not alive(policy["pid"], policy["start_ticks"])
    assert not any(alive(pid, None) for pid in children)  # the session's children are gone too
    assert not (home / "servers" / "gpu3" / "servers.json").exists()
    assert status_rows(home) == []


def test_a_server_that_dies_at_start_is_one_error_line_and_stops_the_other(home: Path) -> None:
    proc = run(home, *up_args(0, "policy-model", "exit-at-start"))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("etsq: error: prm server (sglang, exit-at-start) on GPU 0 exited with status 1")
    assert "last log line: RuntimeError: CUDA error: out of memory" in line
    assert sum(x.startswith("etsq: error:") for x in proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (home / "servers" / "gpu0" / "servers.json").exists()  # nothing recorded
    assert status_rows(home) == []
    policy_pids = logged_pids(home / "servers" / "gpu0" / "policy.log")
    assert not any(alive(pid, None) for pid in policy_pids)  # the healthy policy server was stopped


def test_a_server_that_never_answers_times_out_and_nothing_is_left(home: Path) -> None:
    proc = run(home, *up_args(1, "never-healthy", "prm-model", timeout="2"))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "etsq: error: policy server (sglang, never-healthy) on GPU 1 did not answer http://127.0.0.1:"
        )
    )
    assert "/health within 2 s" in proc.stderr
    assert not (home / "servers" / "gpu1" / "prm.log").exists()  # the PRM never started
    assert not any(alive(pid, None) for pid in logged_pids(home / "servers" / "gpu1" / "policy.log"))


def test_up_twice_and_busy_ports_are_refused(home: Path) -> None:
    first = run(home, *up_args(0, "policy-model", "prm-model", engine="vllm"))
    assert first.returncode == 0, first.stderr
    assert shlex.split(first.stdout)[:6] == ["etsq", "worker", "--gpu", "0", "--backend", "openai"]
    again = run(home, *up_args(0, "policy-model", "prm-model"))
    assert again.returncode == 2
    assert again.stderr.strip() == "etsq: error: servers on GPU 0 are up already (etsq servers down --gpu 0)"
    port = json.loads((home / "servers" / "gpu0" / "servers.json").read_text())["servers"][0]["port"]
    taken = run(home, *up_args(1, "policy-model", "prm-model")[:-2], "--port-base", str(port))
    assert taken.returncode == 2
    assert taken.stderr.strip() == (
        f"etsq: error: port {port} (policy server) is in use; choose another --port-base"
    )
    assert not (home / "servers" / "gpu1" / "servers.json").exists()
    assert run(home, "servers", "down").returncode == 0
    assert status_rows(home) == []


def test_down_kills_a_server_that_ignores_sigterm(home: Path) -> None:
    proc = run(home, *up_args(0, "ignore-sigterm", "prm-model"))
    assert proc.returncode == 0, proc.stderr
    policy = json.loads((home / "servers" / "gpu0" / "servers.json").read_text())["servers"][0]
    began = time.monotonic()
    down = run(home, "servers", "down", "--timeout", "1")
    assert down.returncode == 0, down.stderr
    assert 1 <= time.monotonic() - began < 30
    assert not alive(policy["pid"], policy["start_ticks"])


def test_the_printed_urls_serve_etsq_sglang_client(home: Path, tiny_model: Path) -> None:
    """The pair `up` starts is what a worker checks at its start: the SGLang stand-in on a real model."""
    proc = run(home, *up_args(0, str(tiny_model), str(tiny_model)))
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    urls = {"policy_url": argv[argv.index("--policy-url") + 1], "prm_url": argv[argv.index("--prm-url") + 1]}
    settings = Settings.for_home(home, **urls)
    lines = check_servers(ModelConfig.create("sglang", prm_family="judge"), settings)
    assert lines == [
        f"policy: {tiny_model} at {urls['policy_url']}",
        f"prm: {tiny_model} at {urls['prm_url']}",
    ]
    assert run(home, "servers", "down").returncode == 0


# --------------------------------------------------------------------------- user errors, in-process


def test_bad_options_are_one_error_line(tmp_path: Path) -> None:
    base = ["servers", "up", "--gpu", "0", "--policy", "m", "--prm", "m"]
    assert "--engine-command" in one_error_line(cli(*base, "--engine-command", "'unclosed"))
    assert "No closing quotation" in one_error_line(cli(*base, "--policy-args", '"x'))
    assert "--port-base" in one_error_line(cli(*base, "--port-base", "65535"))
    assert "'tpu'" in one_error_line(cli(*base, "--engine", "tpu"))
    assert one_error_line(cli(*base, "--host", "no-such-host.invalid")).startswith(
        "etsq: error: --host no-such-host.invalid: "
    )
    line = one_error_line(cli(*base, "--engine-command", "/nonexistent/python -m sglang.launch_server"))
    assert line == "etsq: error: policy server: cannot run '/nonexistent/python': no such program"
    assert one_error_line(cli("servers", "down", "--gpu", "4")) == (
        "etsq: error: no servers are recorded on GPU 4 (etsq servers status lists them)"
    )
    file_home = tmp_path / "a-file"
    file_home.write_text("")
    assert "a-file" in one_error_line(cli(*base, env={"ETSQ_HOME": str(file_home)}))


def test_status_and_down_with_nothing_recorded() -> None:
    assert cli("servers", "status").stdout.strip() == "no servers are recorded (etsq servers up starts them)"
    assert json.loads(cli("servers", "status", "--json").stdout) == []
    assert cli("servers", "down").stdout.strip() == "no servers are recorded"


def logged_pids(log: Path) -> list[int]:
    """The stand-in's pid and its child's, from its 'serving ... pid P child C' log line."""
    line = next(x for x in log.read_text().splitlines() if x.startswith("serving"))
    words = line.split()
    return [int(words[words.index("pid") + 1]), int(words[words.index("child") + 1])]


def test_a_record_from_before_a_reboot_is_dead_and_down_kills_nothing(tmp_path: Path) -> None:
    """After a reboot the recorded pids may be someone else's: status shows them dead, down spares them."""
    import subprocess

    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        folder = tmp_path / "etsq-home" / "servers" / "gpu0"
        folder.mkdir(parents=True)
        server = {"role": "policy", "model": "m", "port": 30000, "url": "http://127.0.0.1:30000",
                  "pid": bystander.pid, "start_ticks": None, "argv": ["x"], "log": "policy.log"}  # fmt: skip
        record = {"gpu": 0, "engine": "sglang", "backend": "sglang", "host": "127.0.0.1",
                  "started_at": "2025-01-01T00:00:00+00:00", "boot_id": "another-boot",
                  "servers": [server, {**server, "role": "prm", "port": 30001}]}  # fmt: skip
        (folder / "servers.json").write_text(json.dumps(record))
        rows = json.loads(cli("servers", "status", "--json").stdout)
        assert [(r["role"], r["alive"], r["healthy"]) for r in rows] == [
            ("policy", False, False),
            ("prm", False, False),
        ]
        pid = bystander.pid
        assert cli("servers", "down").stdout.strip() == (
            f"GPU 0: dropped the record, from before a reboot, of policy (pid {pid}), prm (pid {pid})"
        )
        assert bystander.poll() is None and not (folder / "servers.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_damaged_record_is_one_error_line(tmp_path: Path) -> None:
    folder = tmp_path / "etsq-home" / "servers" / "gpu1"
    folder.mkdir(parents=True)
    (folder / "servers.json").write_text('{"gpu": 1}')
    line = one_error_line(cli("servers", "status"))
    assert line.startswith(f"etsq: error: {folder / 'servers.json'}: not a server record")
