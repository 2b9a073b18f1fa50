"""Model servers on one GPU without Docker: `etsq servers up / status / down`.

A GPU box runs a policy server and a PRM server per GPU (SGLang, or vLLM for the `openai`
backend).  `up` starts both with the command lines their projects document, pinned to the GPU
through `CUDA_VISIBLE_DEVICES`, each in its own session so they outlive the command, with their
output in `$ETSQ_HOME/servers/gpuN/{policy,prm}.log`.  The PRM starts once the policy answers
`/health`: two servers sharing a GPU must not size their memory pools at the same moment (SGLang's
`--mem-fraction-static` is a fraction of the memory free when it starts).  Both healthy, the pair is
recorded in `$ETSQ_HOME/servers/gpuN/servers.json` (written atomically) with the worker command
that uses them; a server that exits or never answers stops the other and records nothing.
`down` sends SIGTERM to each server's process group, SIGKILL after a timeout, and drops the record.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from etsq import procs
from etsq.errors import UserError
from etsq.procs import alive, last_log_line, proc_start_ticks, session_members
from etsq.settings import Settings

# Re-exported: `etsq servers` and its tests read a server's process state from here.
__all__ = ["alive", "last_log_line", "proc_start_ticks", "session_members"]

ROLES = ("policy", "prm")
HEALTH_PATH = "/health"
DEFAULT_PORT_BASE = 30000
PORTS_PER_GPU = 10  # gpuN's servers listen on 30000 + 10 N and the port after it by default
START_TIMEOUT_S = 1800.0  # a first start may download the weights
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.25

Report = Callable[[str], None]


class ServerError(UserError):
    """A model server could not be started, found or stopped."""


# --------------------------------------------------------------------------- engines


def sglang_argv(program: Sequence[str], model: str, host: str, port: int) -> list[str]:
    """SGLang's documented launch (docs.sglang.io, server arguments), with `/metrics` enabled."""
    return [*program, "--model-path", model, "--host", host, "--port", str(port), "--enable-metrics"]


def vllm_argv(program: Sequence[str], model: str, host: str, port: int) -> list[str]:
    """vLLM's documented launch (`vllm serve MODEL`, docs.vllm.ai); `/metrics` is always served.

    `--enable-prompt-tokens-details` returns each request's cached prompt tokens, which etsq records.
    """
    return [*program, model, "--host", host, "--port", str(port), "--enable-prompt-tokens-details"]


@dataclass(frozen=True)
class Engine:
    """A model-server implementation: how it is launched and which etsq backend speaks its API."""

    name: str
    backend: str
    program: tuple[str, ...]
    argv: Callable[[Sequence[str], str, str, int], list[str]]
    # Memory flags for two servers on one GPU, per role (`--policy-args`/`--prm-args` replace them).
    # SGLang: a fraction of the memory free at its start, and the PRM starts after the policy;
    # vLLM: a fraction of the whole GPU per instance.
    shared_gpu_args: dict[str, tuple[str, ...]]

    def command(
        self, model: str, host: str, port: int, extra: Sequence[str], program: Sequence[str] | None = None
    ) -> list[str]:
        return [*self.argv(program or self.program, model, host, port), *extra]


ENGINES: dict[str, Engine] = {
    "sglang": Engine(
        "sglang",
        "sglang",
        ("python3", "-m", "sglang.launch_server"),
        sglang_argv,
        {"policy": ("--mem-fraction-static", "0.45"), "prm": ("--mem-fraction-static", "0.7")},
    ),
    "vllm": Engine(
        "vllm",
        "openai",
        ("vllm", "serve"),
        vllm_argv,
        {"policy": ("--gpu-memory-utilization", "0.45"), "prm": ("--gpu-memory-utilization", "0.4")},
    ),
}


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise ServerError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})") from None


def worker_argv(gpu: int | str, backend: str, policy_url: str, prm_url: str) -> list[str]:
    """The `etsq worker` command bound to one GPU's pair of servers."""
    return [
        "etsq", "worker", "--gpu", str(gpu), "--backend", backend,
        "--policy-url", policy_url, "--prm-url", prm_url,
    ]  # fmt: skip


# --------------------------------------------------------------------------- plans and records


@dataclass(frozen=True)
class ServerSpec:
    """One server to start: its role, model, port and exact command line."""

    role: str
    model: str
    port: int
    argv: list[str]
    log: str

    def url(self, host: str) -> str:
        reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{reach}:{self.port}"


@dataclass(frozen=True)
class LaunchRequest:
    """`etsq servers up`'s options."""

    gpu: int
    policy: str
    prm: str
    engine: str = "sglang"
    port_base: int | None = None
    host: str = "127.0.0.1"
    engine_command: str | None = None  # replaces the documented program (another env; tests)
    policy_args: str | None = None
    prm_args: str | None = None
    timeout_s: float = START_TIMEOUT_S


@dataclass(frozen=True)
class Plan:
    """The servers `up` will start for one GPU."""

    gpu: int
    engine: Engine
    host: str
    servers: tuple[ServerSpec, ...]
    timeout_s: float


@dataclass
class RunningServer:
    """A started server as recorded: enough to check it and to stop exactly that process."""

    role: str
    model: str
    port: int
    url: str
    pid: int
    start_ticks: int | None
    argv: list[str]
    log: str


@dataclass
class Record:
    """One GPU's servers, as `$ETSQ_HOME/servers/gpuN/servers.json` holds them."""

    gpu: int
    engine: str
    backend: str
    host: str
    started_at: str
    servers: list[RunningServer] = field(default_factory=list)
    boot_id: str | None = None  # pids and sessions mean nothing after a reboot

    @property
    def this_boot(self) -> bool:
        return self.boot_id is None or self.boot_id == current_boot_id()

    def url(self, role: str) -> str:
        return next(s.url for s in self.servers if s.role == role)

    @property
    def worker_command(self) -> list[str]:
        return worker_argv(self.gpu, self.backend, self.url("policy"), self.url("prm"))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "worker_command": shlex.join(self.worker_command)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        servers = [RunningServer(**s) for s in data["servers"]]
        keys = ("gpu", "engine", "backend", "host", "started_at")
        return cls(**{k: data[k] for k in keys}, servers=servers, boot_id=data.get("boot_id"))


def servers_dir(settings: Settings) -> Path:
    return settings.home / "servers"


def gpu_dir(settings: Settings, gpu: int | str) -> Path:
    return servers_dir(settings) / f"gpu{gpu}"


def make_plan(settings: Settings, req: LaunchRequest) -> Plan:
    """The two servers' command lines, ports and logs; refuses bad options before anything starts."""
    engine = get_engine(req.engine)
    base = DEFAULT_PORT_BASE + PORTS_PER_GPU * req.gpu if req.port_base is None else req.port_base
    if not 1 <= base <= 65534:
        raise ServerError(f"--port-base {base}: the two servers need ports {base} and {base + 1} in 1-65535")
    program = _split("--engine-command", req.engine_command) if req.engine_command else None
    extras = {"policy": req.policy_args, "prm": req.prm_args}
    models = {"policy": req.policy, "prm": req.prm}
    folder = gpu_dir(settings, req.gpu)
    servers = tuple(
        ServerSpec(
            role,
            models[role],
            base + i,
            engine.command(models[role], req.host, base + i, _extra(engine, role, extras[role]), program),
            str(folder / f"{role}.log"),
        )
        for i, role in enumerate(ROLES)
    )
    return Plan(req.gpu, engine, req.host, servers, req.timeout_s)


def _extra(engine: Engine, role: str, text: str | None) -> list[str]:
    if text is None:
        return list(engine.shared_gpu_args[role])
    return _split(f"--{role}-args", text)


def _split(option: str, text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ServerError(f"{option} {text!r}: {exc}") from None
    if not words and option == "--engine-command":
        raise ServerError("--engine-command is empty")
    return words


# --------------------------------------------------------------------------- processes


def current_boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def stop_server(pid: int, start_ticks: int | None, timeout_s: float) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of its session is left after
    `timeout_s` (a leader that exits may leave its children behind, holding GPU memory)."""
    procs.stop_session(pid, start_ticks, timeout_s)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the server answers `GET /health` with 200."""
    import httpx  # here: `etsq --help` and every other command must not pay for it

    try:
        # trust_env=False: a proxy from the environment must not answer for a local server.
        return httpx.get(url + HEALTH_PATH, timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(host: str, port: int) -> bool:
    try:
        return procs.port_free(port, host)
    except socket.gaierror as exc:
        raise ServerError(f"--host {host}: {exc.strerror}") from None


def _spawn(spec: ServerSpec, gpu: int) -> subprocess.Popen[bytes]:
    """Start one server in a new session (it outlives this command), pinned to `gpu`; the previous
    start's log is kept beside the new one."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    try:
        return procs.spawn(spec.argv, Path(spec.log), env, new_session=True, keep_previous_log=True)
    except OSError as exc:
        raise ServerError(f"{spec.role} server: cannot run {spec.argv[0]!r}: {exc.strerror}") from None


def _wait_healthy(proc: subprocess.Popen[bytes], spec: ServerSpec, plan: Plan) -> None:
    deadline = time.monotonic() + plan.timeout_s
    url = spec.url(plan.host)
    while True:
        code = proc.poll()
        if code is not None:
            raise _start_failed(spec, plan, f"exited with status {code} before {HEALTH_PATH} answered")
        if healthy(url):
            return
        if time.monotonic() >= deadline:
            raise _start_failed(spec, plan, f"did not answer {url}{HEALTH_PATH} within {plan.timeout_s:g} s")
        time.sleep(_POLL_S)


def _start_failed(spec: ServerSpec, plan: Plan, what: str) -> ServerError:
    return ServerError(
        f"{spec.role} server ({plan.engine.name}, {spec.model}) on GPU {plan.gpu} {what}; "
        f"last log line: {last_log_line(spec.log)} (log: {spec.log})"
    )


def _stop_started(started: list[tuple[subprocess.Popen[bytes], ServerSpec]]) -> None:
    for proc, _ in started:
        stop_server(proc.pid, proc_start_ticks(proc.pid), STOP_TIMEOUT_S)
        proc.wait()  # our child: reap it


# --------------------------------------------------------------------------- records on disk


@contextlib.contextmanager
def _gpu_lock(settings: Settings, gpu: int | str) -> Iterator[Path]:
    """Hold the GPU's lock: one `etsq servers` command at a time works on a GPU."""
    folder = gpu_dir(settings, gpu)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(procs.file_lock(folder / ".lock"))
        except procs.LockBusy:
            raise ServerError(f"another `etsq servers` command is working on GPU {gpu}") from None
        yield folder


def _record_path(folder: Path) -> Path:
    return folder / "servers.json"


def read_record(folder: Path) -> Record | None:
    path = _record_path(folder)
    try:
        return Record.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerError(f"{path}: not a server record ({exc}); remove it if no server runs") from None


def _write_record(folder: Path, record: Record) -> None:
    procs.atomic_write_json(_record_path(folder), record.to_json())


def records(settings: Settings) -> list[Record]:
    """Every GPU's recorded servers, by GPU."""
    root = servers_dir(settings)
    if not root.is_dir():
        return []
    found = [read_record(folder) for folder in root.iterdir() if folder.name.startswith("gpu")]
    return sorted((r for r in found if r is not None), key=lambda r: r.gpu)


def _alive_in(record: Record, server: RunningServer) -> bool:
    return record.this_boot and alive(server.pid, server.start_ticks)


def _any_alive(record: Record) -> bool:
    return any(_alive_in(record, s) for s in record.servers)


# --------------------------------------------------------------------------- up, status, down


def up(settings: Settings, req: LaunchRequest, report: Report) -> Record:
    """Start one GPU's policy and PRM servers, wait until both are healthy, and record them."""
    plan = make_plan(settings, req)
    with _gpu_lock(settings, plan.gpu) as folder:
        _refuse_busy(folder, plan)
        started: list[tuple[subprocess.Popen[bytes], ServerSpec]] = []
        try:
            for spec in plan.servers:
                report(f"starting the {spec.role} server: {shlex.join(spec.argv)} (log: {spec.log})")
                started.append((_spawn(spec, plan.gpu), spec))
                began = time.monotonic()
                _wait_healthy(started[-1][0], spec, plan)
                took = time.monotonic() - began
                report(f"{spec.role} server healthy at {spec.url(plan.host)} after {took:.1f} s")
            record = _new_record(plan, started)
            _write_record(folder, record)
        except BaseException:
            _stop_started(started)
            raise
    return record


def _refuse_busy(folder: Path, plan: Plan) -> None:
    old = read_record(folder)
    if old is not None and _any_alive(old):
        raise ServerError(f"servers on GPU {plan.gpu} are up already (etsq servers down --gpu {plan.gpu})")
    for spec in plan.servers:
        if shutil.which(spec.argv[0]) is None:
            raise ServerError(f"{spec.role} server: cannot run {spec.argv[0]!r}: no such program")
        if not _port_free(plan.host, spec.port):
            raise ServerError(f"port {spec.port} ({spec.role} server) is in use; choose another --port-base")


def _new_record(plan: Plan, started: list[tuple[subprocess.Popen[bytes], ServerSpec]]) -> Record:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    servers = [
        RunningServer(
            spec.role, spec.model, spec.port, spec.url(plan.host), proc.pid, proc_start_ticks(proc.pid),
            spec.argv, spec.log,
        )
        for proc, spec in started
    ]  # fmt: skip
    return Record(plan.gpu, plan.engine.name, plan.engine.backend, plan.host, now, servers, current_boot_id())


def status(settings: Settings) -> list[dict[str, Any]]:
    """One row per recorded server: whether its process lives and whether `/health` answers."""
    rows = []
    for record in records(settings):
        for server in record.servers:
            running = _alive_in(record, server)
            rows.append(
                {
                    "gpu": record.gpu, "role": server.role, "engine": record.engine, "model": server.model,
                    "url": server.url, "pid": server.pid, "alive": running,
                    "healthy": running and healthy(server.url), "log": server.log,
                    "worker_command": shlex.join(record.worker_command),
                }
            )  # fmt: skip
    return rows


def down(settings: Settings, gpu: int | None, timeout_s: float = STOP_TIMEOUT_S) -> list[Record]:
    """Stop the recorded servers of `gpu` (every GPU if None) and drop their records."""
    gpus = [r.gpu for r in records(settings)] if gpu is None else [gpu]
    stopped = []
    for number in gpus:
        with _gpu_lock(settings, number) as folder:
            record = read_record(folder)
            if record is None:
                raise ServerError(f"no servers are recorded on GPU {number} (etsq servers status lists them)")
            _stop_record(record, timeout_s)
            _record_path(folder).unlink()
            stopped.append(record)
    return stopped


def _stop_record(record: Record, timeout_s: float) -> None:
    if not record.this_boot:
        return  # stopped by the reboot; its pids may belong to others now
    live = [alive(s.pid, s.start_ticks) for s in record.servers]
    for server, running in zip(record.servers, live, strict=True):  # SIGTERM all: side-by-side shutdown
        if running:
            procs.send_signal(server.pid, signal.SIGTERM, group=True)
    for server, running in zip(record.servers, live, strict=True):
        procs.end_session(server.pid, server.start_ticks, timeout_s if running else 0)
