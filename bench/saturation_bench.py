"""Is the engine the bottleneck, or etsq?  REBASE and ETS searches against the servers' own ceiling.

Starts one vLLM CPU server on the testbed policy and one on its PRM (or reuses `--policy-url` /
`--prm-url`; `--serve` only starts them and waits), then per method and worker concurrency K
(problems searched at once, as `etsq worker --concurrency K` runs them: K threads, each running
`run_job` on one claimed job, over one fresh SQLite store):

1. search: the arith problems' jobs, every completion request recorded (body, start, end, usage);
2. ceiling: the same requests sent straight to the same servers, K problems at a time, each
   problem's requests depth by depth (one depth's requests at once, as the search fans them out),
   policy and PRM each on their own, with no search logic between: no select, no commit, no
   waiting for the other server.  Same bodies, same seeds, so the same generated lengths.
3. ceiling in order: the same requests, each problem's model calls in the order the search made
   them (a depth's scoring waits for its generation, the next depth for both), K problems at a
   time: what the search would take if select, commit and every other etsq step took no time.
   Its ratio (ceiling-in-order seconds / search seconds) is etsq's own share of the gap; the rest
   is the method's: one problem cannot score before it generates.

Each ceiling is replayed `--replays` times after the search (the two alternating) and the fastest
replay counts: on this machine replays of the very same requests differ by up to 1.7x minutes apart,
and no replay can be faster than the servers allow, so the slower ones measure noise.  Every replay's
seconds are kept in the JSON.  Over `--repeat`s the summary also sets the fastest search against the
fastest replays, so that the search's own noise is not counted against it either.  The cell's
`in_order_of_ceiling` (ceiling seconds / in-order seconds) is the most any search of this method
reaches of the ceiling with no etsq time at all.

The prefix cache is emptied before each phase (`/reset_prefix_cache`, vLLM's dev mode, which the
servers started here turn on), so neither phase reads what the other left.

Reported per cell: generated tokens/s (policy completions) and scored tokens/s (PRM prompt tokens)
of the search and of the ceiling and their ratio; per server the share of wall time with at least
one request running, sampled from its `/metrics` (`vllm:num_requests_running`) every
`--sample-ms`; and the timeline of a depth: its phases (select, fan-out: from the policy call to
its last request sent, generation, scoring, commit: the depth handed to its writer, with any wait for
the write before; and the write, on the writer's thread beside the next depth) and the gaps between
them, mean milliseconds over every depth of every job; and per phase the CPU seconds of this
process (the worker side: search, select, commit, HTTP; the replay's client in the ceilings) and
of each server's process tree, with their share of the machine's CPU time: where etsq and the
servers share the CPUs, what etsq burns the servers cannot have.  A server's CPU is not all work:
vLLM's CPU worker busy-waits (sched_yield) for 1 s after each step on its shared-memory queue, on
its own CPU.  JSON in `--out`, a table on stdout.

    python bench/saturation_bench.py --problems 8 --width 8 --concurrency 1 4 16 --out /tmp/sat
    python bench/saturation_bench.py --serve --out /tmp/sat     # servers only, their URLs in urls.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import itertools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etsq.models import openai_compat as oc  # noqa: E402
from etsq.models.backends import load_models  # noqa: E402
from etsq.models.config import ModelConfig  # noqa: E402
from etsq.models.http import ServerClient  # noqa: E402
from etsq.models.metrics import KVMonitor, metric_sum, parse_prometheus  # noqa: E402
from etsq.models.remote import RemoteLikelihoodPRM, RemotePolicy, RemoteRole  # noqa: E402
from etsq.queue import execute  # noqa: E402
from etsq.search import loop  # noqa: E402
from etsq.search.config import SearchConfig  # noqa: E402
from etsq.search.embed import SentenceEmbedder  # noqa: E402
from etsq.settings import Settings  # noqa: E402
from etsq.store import schema as m  # noqa: E402
from etsq.store.runs import RunSpec, create_run  # noqa: E402
from etsq.store.session import Store  # noqa: E402
from etsq.store.trees import DepthWriter  # noqa: E402
from etsq.submit import prepare  # noqa: E402
from etsq.testbed.build import PRM_FAMILY, testbed_paths  # noqa: E402
from tests.model_servers import testbed_server_cpus, testbed_vllm_argv  # noqa: E402
from tests.services import HttpServiceHandle, start_http_service  # noqa: E402

COMPLETIONS = "/v1/completions"

# Which job and which model call a request belongs to: contextvars reach the HTTP loop's tasks
# (run_coroutine_threadsafe schedules them in a copy of the calling thread's context).
_JOB: contextvars.ContextVar[int] = contextvars.ContextVar("job", default=-1)
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("depth", default=-1)
_CALL: contextvars.ContextVar[int] = contextvars.ContextVar("call", default=-1)


# --------------------------------------------------------------------------- servers


def serve(name: str, model: Path, tmp: Path, cpus: str) -> HttpServiceHandle:
    argv = testbed_vllm_argv(model)
    # Dev mode: /reset_prefix_cache, so each phase starts from an empty prefix cache.
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false", "VLLM_SERVER_DEV_MODE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": cpus}  # fmt: skip
    return start_http_service(name, argv, tmp / name, start_timeout=420.0, env=env)


def reset_prefix_cache(url: str) -> bool:
    try:
        return httpx.post(url + "/reset_prefix_cache", timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# --------------------------------------------------------------------------- CPU accounting


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its descendants, from /proc."""
    total, todo, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total


class CpuMeter:
    """Cumulative CPU seconds of this process (etsq's worker side) and of each server it started:
    on a machine whose CPUs serve the models, what the client burns the servers cannot have."""

    def __init__(self, server_pids: dict[str, int]) -> None:
        self.server_pids = server_pids

    def read(self) -> dict[str, float]:
        own = os.times()
        return {"client": own.user + own.system, **{r: tree_cpu_s(p) for r, p in self.server_pids.items()}}

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
        """Each party's CPU seconds and the share of the machine's CPU time it took."""
        cpus = os.cpu_count() or 1
        seconds = {k: after[k] - before[k] for k in before}
        return {"cpu_s": seconds, "machine_share": {k: v / (wall_s * cpus) for k, v in seconds.items()}}


# --------------------------------------------------------------------------- /metrics sampling


# vLLM's gauges are set after each engine step, from the requests still running: a request that
# ends within one step (a PRM read: prefill + one token) is never seen running.  So an interval
# between two samples counts as busy when a request runs or waits at its end, or when the token
# counters moved during it (block-granular: it overstates by at most one interval per burst).
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")


class BusySampler:
    """Samples each server's request gauges and token counters every `interval_s`, in a process of
    its own, so that no scrape or parse runs in the process it measures.  Sampling costs the servers
    too (vLLM spends ~8 ms rendering each page): REBASE at 4 problems at once took 16-18 s sampled
    every 50 ms and 11-13 s sampled once a second, in a thread or in this process alike, hence the
    100 ms default.  Times are `time.perf_counter()`, the system-wide monotonic clock, so they
    compare across the two processes."""

    def __init__(self, urls: dict[str, str], interval_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self._process = ctx.Process(target=_sample_loop, args=(urls, interval_s, self._stop, self._out))
        self.samples: dict[str, list[tuple[float, float, float]]] = {}  # (time, running + waiting, tokens)

    def __enter__(self) -> BusySampler:
        self._process.start()
        self._out.get(timeout=60)  # started: its first samples are taken
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.samples = self._out.get(timeout=60)
        self._process.join()

    def busy_share(self, role: str, start: float, end: float) -> float | None:
        """The share of [start, end] in intervals where the server worked (see GAUGES above)."""
        inside = [s for s in self.samples[role] if start <= s[0] <= end]
        busy = total = 0.0
        for (t0, _, tok0), (t1, queued, tok1) in itertools.pairwise(inside):
            total += t1 - t0
            busy += (t1 - t0) if queued > 0 or tok1 > tok0 else 0.0
        return busy / total if total else None


def _sample_loop(urls: dict[str, str], interval_s: float, stop: Any, out: Any) -> None:
    samples: dict[str, list[tuple[float, float, float]]] = {role: [] for role in urls}
    clients = {role: httpx.Client(base_url=url, timeout=10) for role, url in urls.items()}
    started = False
    while not stop.is_set():
        for role, client in clients.items():
            sample = _sample(client)
            if sample is not None:
                samples[role].append((time.perf_counter(), *sample))
        if not started:
            out.put(None)
            started = True
        stop.wait(interval_s)
    out.put(samples)


def _sample(client: httpx.Client) -> tuple[float, float] | None:
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return None
    samples = parse_prometheus(text, GAUGES + COUNTERS)
    return (
        sum(metric_sum(samples, g) or 0.0 for g in GAUGES),
        sum(metric_sum(samples, c) or 0.0 for c in COUNTERS),
    )


# --------------------------------------------------------------------------- recording a search


@dataclass
class Sent:
    """One completion request as the search sent it."""

    server: str
    body: dict[str, Any]
    job: int
    call: int  # the model call (one depth's fan-out) it belongs to
    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Phase:
    job: int
    depth: int
    name: str
    start: float
    end: float


@dataclass
class Recorder:
    sent: list[Sent] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: Iterator[int] = field(default_factory=lambda: iter(range(1 << 62)))

    def phase(
        self, name: str, start: float, end: float, job: int | None = None, depth: int | None = None
    ) -> None:
        job, depth = _JOB.get() if job is None else job, _DEPTH.get() if depth is None else depth
        with self.lock:
            self.phases.append(Phase(job, depth, name, start, end))


def _wrap(
    owner: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[[], None]:
    original = getattr(owner, attr)
    setattr(owner, attr, make(original))
    return lambda: setattr(owner, attr, original)


def _timed(rec: Recorder, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                rec.phase(name, t0, time.perf_counter())

        return timed

    return make


def _model_call(rec: Recorder, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A policy or PRM call: timed, and its requests tagged with a call number of their own."""
    timed = _timed(rec, name)

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        inner = timed(original)

        def tagged(*args: Any, **kw: Any) -> Any:
            token = _CALL.set(next(rec.calls))
            try:
                return inner(*args, **kw)
            finally:
                _CALL.reset(token)

        return tagged

    return make


def _step(original: Callable[..., Any]) -> Callable[..., Any]:
    def step(self: Any, tree: Any, depth: int) -> Any:
        token = _DEPTH.set(depth)
        try:
            return original(self, tree, depth)
        finally:
            _DEPTH.reset(token)

    return step


def _commit(rec: Recorder) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def commit(self: Any, tree: Any, record: Any) -> Any:
            token = _DEPTH.set(record.depth)
            t0 = time.perf_counter()
            try:
                return original(self, tree, record)
            finally:
                rec.phase("commit", t0, time.perf_counter())
                _DEPTH.reset(token)

        return commit

    return make


def _write(rec: Recorder) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A depth's write, on the writer's own thread while the search goes on (DepthWriter.background)."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def write(self: DepthWriter, tree: Any, handed: Any) -> None:
            t0 = time.perf_counter()
            try:
                original(self, tree, handed)
            finally:
                rec.phase("write", t0, time.perf_counter(), self.job_id, handed.rec.depth)

        return write

    return make


def _role(model: RemoteRole) -> str:
    return "policy" if isinstance(model, RemotePolicy) else "prm"


def _stats(rec: Recorder) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A depth's server figures, read after its scoring: a phase per server."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def server_stats(self: RemoteRole) -> Any:
            return _timed(rec, f"stats:{_role(self)}")(original)(self)

        return server_stats

    return make


def _hop(rec: Recorder) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A model call's wait for the HTTP loop: from the job's thread handing it over to its start."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: RemoteRole, work: Callable[[], Any]) -> Any:
            role, handed = _role(self), time.perf_counter()

            async def started() -> Any:
                rec.phase(f"hop:{role}", handed, time.perf_counter())
                return await work()

            return original(self, started)

        return run

    return make


def _post(rec: Recorder) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        async def post_json(self: ServerClient, path: str, body: dict[str, Any], *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = await original(self, path, body, *a, **kw)
            if path == COMPLETIONS and _CALL.get() >= 0:
                usage = (out or {}).get("usage") or {}
                sent = Sent(
                    self.base_url, body, _JOB.get(), _CALL.get(), t0, time.perf_counter(),
                    int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                )  # fmt: skip
                with rec.lock:
                    rec.sent.append(sent)
            return out

        return post_json

    return make


def _no_scrape(original: Callable[..., Any]) -> Callable[..., Any]:
    async def scrape(self: KVMonitor, owners: tuple[Any, ...] = ()) -> None:
        return None

    return scrape


@contextmanager
def recording(rec: Recorder, kv_monitor: bool = True) -> Iterator[None]:
    """The search's model calls, requests, selects and commits, timed into `rec`; without
    `kv_monitor` the search's KV monitors scrape nothing."""
    undo = [] if kv_monitor else [_wrap(KVMonitor, "scrape", _no_scrape)]
    undo += [
        _wrap(ServerClient, "post_json", _post(rec)),
        _wrap(oc.OpenAIPolicy, "expand", _model_call(rec, "generation")),
        _wrap(oc.OpenAIPRM, "score", _model_call(rec, "scoring")),
        _wrap(RemoteLikelihoodPRM, "score", _model_call(rec, "scoring")),  # the testbed PRM's family
        _wrap(loop.Searcher, "_select", _timed(rec, "select")),
        _wrap(loop.Searcher, "step", _step),
        _wrap(DepthWriter, "__call__", _commit(rec)),
        _wrap(DepthWriter, "_write", _write(rec)),
        _wrap(RemoteRole, "server_stats", _stats(rec)),
        _wrap(RemoteRole, "_run", _hop(rec)),
    ]
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


# --------------------------------------------------------------------------- the search phase


def store_jobs(settings: Settings, args: argparse.Namespace, method: str, urls: dict[str, str]) -> list[int]:
    """A fresh run of `method` on the arith problems in `settings`' store; its job ids."""
    paths = testbed_paths(Path(args.home))
    models = ModelConfig.create(
        "openai", policy_url=urls["policy"], prm_url=urls["prm"], policy=str(paths.policy),
        prm=str(paths.prm), prm_family=PRM_FAMILY,
    )  # fmt: skip
    search = SearchConfig(
        method=method, width=args.width, max_step_tokens=args.max_step_tokens, max_depth=args.max_depth
    )
    spec = RunSpec(dataset="arith", search=search, models=models, limit=args.problems)
    store = Store.open(settings.database_url)
    run_id, _ = create_run(store, spec, prepare(settings, [spec], check=False)[0], [settings.queue])
    with store.session() as s:
        return sorted(j.id for j in s.query(m.Job).filter(m.Job.run_id == run_id))


def _run_one(settings: Settings, job_id: int) -> str:
    _JOB.set(job_id)  # each pool thread runs in a context of its own
    return execute.run_job(job_id, settings, worker="saturation-bench")


def search(
    settings: Settings, jobs: list[int], concurrency: int, rec: Recorder, kv_monitor: bool = True
) -> tuple[float, float]:
    """The jobs searched `concurrency` at a time (the worker's thread pool); (start, end)."""
    with recording(rec, kv_monitor), ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        futures = [pool.submit(contextvars.copy_context().run, _run_one, settings, j) for j in jobs]
        statuses = [f.result() for f in futures]
        end = time.perf_counter()
    if any(s != "done" for s in statuses):
        raise SystemExit(f"some jobs did not finish: {statuses}")
    return start, end


# --------------------------------------------------------------------------- the ceiling phase


def replay_plan(sent: list[Sent], server: str) -> list[list[list[dict[str, Any]]]]:
    """Per job, its model calls in order, each the bodies of its requests (sent at once)."""
    calls: dict[int, dict[int, list[tuple[float, dict[str, Any]]]]] = defaultdict(lambda: defaultdict(list))
    for s in sent:
        if s.server == server:
            calls[s.job][s.call].append((s.start, s.body))
    return [
        [[body for _, body in sorted(reqs, key=lambda r: r[0])] for _, reqs in sorted(per_call.items())]
        for _, per_call in sorted(calls.items())
    ]


@dataclass
class Replayed:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    calls: int = 0
    call_s: float = 0.0  # the calls' durations summed: a model call's mean time beside the search's

    @property
    def mean_call_ms(self) -> float | None:
        return self.call_s / self.calls * 1000 if self.calls else None


class _Replay:
    """One pooled client per server (aiohttp, the cheapest per request, as etsq's own since it moved
    off httpx); each request's server-reported tokens counted per role.  Made on the replay's loop."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.role = {url: role for role, url in urls.items()}
        timeout = aiohttp.ClientTimeout(total=600)
        self.clients = {
            url: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), timeout=timeout)
            for url in urls.values()
        }
        self.done = {role: Replayed() for role in urls}

    async def one(self, url: str, body: dict[str, Any]) -> None:
        for attempt in range(3):  # a dropped keep-alive connection, as the search's client retries
            try:
                async with self.clients[url].post(url + COMPLETIONS, json=body) as response:
                    response.raise_for_status()
                    answer = await response.json()
                break
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise
        usage = answer.get("usage") or {}
        out = self.done[self.role[url]]
        out.prompt_tokens += int(usage.get("prompt_tokens", 0))
        out.completion_tokens += int(usage.get("completion_tokens", 0))
        out.requests += 1

    async def call(self, url: str, bodies: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        await asyncio.gather(*(self.one(url, b) for b in bodies))
        out = self.done[self.role[url]]
        out.calls, out.call_s = out.calls + 1, out.call_s + time.perf_counter() - started

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


async def _lanes(
    plan: list[list[tuple[str, list[dict[str, Any]]]]], concurrency: int, replay: _Replay
) -> None:
    """`concurrency` problems at a time, each problem's calls in order, a call's requests at once."""
    todo = list(reversed(plan))

    async def lane() -> None:
        while todo:
            for url, bodies in todo.pop():
                await replay.call(url, bodies)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def ordered_plan(sent: list[Sent]) -> list[list[tuple[str, list[dict[str, Any]]]]]:
    """Per job, every model call in the order the search made it (generation, then its scoring, depth
    after depth), each with its server and the bodies of its requests."""
    calls: dict[int, dict[int, list[Sent]]] = defaultdict(lambda: defaultdict(list))
    for s in sent:
        calls[s.job][s.call].append(s)
    return [
        [
            (reqs[0].server, [r.body for r in sorted(reqs, key=lambda r: r.start)])
            for _, reqs in sorted(per.items())
        ]
        for _, per in sorted(calls.items())
    ]


def _replayed(
    urls: dict[str, str], run: Callable[[_Replay], Any]
) -> tuple[dict[str, Replayed], float, float]:
    async def go() -> dict[str, Replayed]:
        replay = _Replay(urls)
        try:
            await run(replay)
        finally:
            await replay.close()
        return replay.done

    start = time.perf_counter()
    done = asyncio.run(go())
    return done, start, time.perf_counter()


def ceiling(
    urls: dict[str, str], sent: list[Sent], concurrency: int
) -> tuple[dict[str, Replayed], float, float]:
    """Both servers replayed at once, each on its own: {role: tokens}, (start, end)."""

    def both(replay: _Replay) -> Any:
        return asyncio.gather(
            *(
                _lanes([[(url, call) for call in job] for job in replay_plan(sent, url)], concurrency, replay)
                for url in urls.values()
            )
        )

    return _replayed(urls, both)


def ceiling_in_order(
    urls: dict[str, str], sent: list[Sent], concurrency: int
) -> tuple[dict[str, Replayed], float, float]:
    """Each problem's calls replayed in the search's order (a depth's scoring after its generation):
    the ceiling of a search whose select, commit and bookkeeping took no time."""
    return _replayed(urls, lambda replay: _lanes(ordered_plan(sent), concurrency, replay))


@dataclass
class Replay:
    """One replay: its servers' tokens, (start, end), and the CPU meter's readings around it."""

    done: dict[str, Replayed]
    start: float
    end: float
    cpu_before: dict[str, float]
    cpu_after: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.end - self.start


def measured_replay(
    urls: dict[str, str], meter: CpuMeter, run: Callable[[], tuple[dict[str, Replayed], float, float]]
) -> Replay:
    """`run` (a ceiling), on servers whose prefix caches were just emptied."""
    for url in urls.values():
        reset_prefix_cache(url)
    before = meter.read()
    done, start, end = run()
    return Replay(done, start, end, before, meter.read())


# --------------------------------------------------------------------------- one cell


def timeline(phases: list[Phase], sent: list[Sent]) -> dict[str, Any]:
    """Mean ms per depth of each phase and of the gaps between them (and one example depth)."""
    by_depth: dict[tuple[int, int], dict[str, tuple[float, float]]] = defaultdict(dict)
    for p in phases:
        by_depth[(p.job, p.depth)][p.name] = (p.start, p.end)
    last_sent: dict[tuple[int, int], float] = {}
    for key, ph in by_depth.items():
        if "generation" in ph:
            g0, g1 = ph["generation"]
            inside = [s.start for s in sent if s.job == key[0] and g0 <= s.start <= g1]
            last_sent[key] = max(inside) if inside else g0
    # Depth -1: the server figures a job drops as it starts, before its first depth.
    rows = [_depth_row(ph, last_sent.get(k)) for k, ph in sorted(by_depth.items()) if k[1] >= 0]
    rows = [r for r in rows if r]
    keys = sorted({k for r in rows for k in r})
    means = {k: statistics.fmean(r[k] for r in rows if k in r) for k in keys}
    return {"depths": len(rows), "mean_ms": means, "example": rows[len(rows) // 2] if rows else {}}


ORDER = ("select", "generation", "scoring", "stats:policy", "stats:prm", "commit")
# Parts of the generation and the scoring, and the depth's write, which runs beside the next depth
# (`commit` is the search's handing over of the depth, and its wait for the write before).
WITHIN = ("hop:policy", "hop:prm", "write")


def _depth_row(ph: dict[str, tuple[float, float]], last_sent: float | None) -> dict[str, float]:
    """One depth's phase durations and the gaps between consecutive phases, in ms."""
    present = [(n, ph[n]) for n in ORDER if n in ph]
    if len(present) < 2:
        return {}
    row = {n: (e - s) * 1000 for n, (s, e) in present}
    row.update({n: (ph[n][1] - ph[n][0]) * 1000 for n in WITHIN if n in ph})
    if last_sent is not None and "generation" in ph:
        row["fan_out"] = (last_sent - ph["generation"][0]) * 1000
    for (a, (_, a_end)), (b, (b_start, _)) in itertools.pairwise(present):
        row[f"gap:{a}->{b}"] = (b_start - a_end) * 1000
    return row


CALL_PHASES = {"policy": "generation", "prm": "scoring"}


def _mean_phase_ms(phases: list[Phase], name: str) -> float | None:
    durations = [p.end - p.start for p in phases if p.name == name]
    return statistics.fmean(durations) * 1000 if durations else None


def _mean_span_ms(sent: list[Sent], url: str) -> float | None:
    spans: dict[int, tuple[float, float]] = {}
    for r in sent:
        if r.server == url:
            first, last = spans.get(r.call, (r.start, r.end))
            spans[r.call] = (min(first, r.start), max(last, r.end))
    return statistics.fmean(e - s for s, e in spans.values()) * 1000 if spans else None


def tokens_of(sent: list[Sent], url: str, attr: str) -> int:
    return sum(getattr(s, attr) for s in sent if s.server == url)


def run_cell(
    args: argparse.Namespace, urls: dict[str, str], method: str, k: int, meter: CpuMeter
) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix=f"sat-{method}-{k}-", dir=args.tmp))
    settings = Settings.for_home(home)
    jobs = store_jobs(settings, args, method, urls)
    rec = Recorder()
    for url in urls.values():
        reset_prefix_cache(url)
    if method == "ets":  # each cell embeds its steps afresh: the same problems' texts recur across cells
        embedder = execute.load_embedder(None)
        assert isinstance(embedder, SentenceEmbedder)
        embedder.clear_cache()
    before = load_average()
    with BusySampler(urls, args.sample_ms / 1000) as busy:
        cpu0 = meter.read()
        s0, s1 = search(settings, jobs, k, rec, not args.no_kv_monitor)
        cpu1 = meter.read()
        runs: dict[str, list[Replay]] = {"ceiling": [], "in_order": []}
        for _ in range(args.replays):  # alternating, so that drift hits both alike
            runs["ceiling"].append(measured_replay(urls, meter, lambda: ceiling(urls, rec.sent, k)))
            runs["in_order"].append(measured_replay(urls, meter, lambda: ceiling_in_order(urls, rec.sent, k)))
    # A ceiling is the fastest the servers went: its slower replays are this machine's noise.
    top, inner = (min(runs[name], key=lambda r: r.seconds) for name in ("ceiling", "in_order"))
    search_s, ceiling_s, ordered_s = s1 - s0, top.seconds, inner.seconds
    gen = tokens_of(rec.sent, urls["policy"], "completion_tokens") / search_s
    scored = tokens_of(rec.sent, urls["prm"], "prompt_tokens") / search_s
    gen_ceiling = top.done["policy"].completion_tokens / ceiling_s
    scored_ceiling = top.done["prm"].prompt_tokens / ceiling_s
    return {
        "method": method,
        "concurrency": k,
        "problems": len(jobs),
        "requests": {"policy": sum(s.server == urls["policy"] for s in rec.sent),
                     "prm": sum(s.server == urls["prm"] for s in rec.sent)},
        "search_s": search_s,
        "ceiling_s": ceiling_s,
        "ceiling_runs_s": [r.seconds for r in runs["ceiling"]],
        # The most a search with no etsq time at all reaches of the ceiling: the method's own bound.
        "in_order_of_ceiling": ceiling_s / ordered_s,
        "gen_tok_s": gen,
        "gen_ceiling_tok_s": gen_ceiling,
        "gen_ratio": gen / gen_ceiling if gen_ceiling else None,
        "scored_tok_s": scored,
        "scored_ceiling_tok_s": scored_ceiling,
        "scored_ratio": scored / scored_ceiling if scored_ceiling else None,
        "in_order": {
            "ceiling_s": ordered_s,
            "runs_s": [r.seconds for r in runs["in_order"]],
            "gen_ceiling_tok_s": inner.done["policy"].completion_tokens / ordered_s,
            "scored_ceiling_tok_s": inner.done["prm"].prompt_tokens / ordered_s,
            "ratio": ordered_s / search_s,
        },
        "busy": {
            "search": {r: busy.busy_share(r, s0, s1) for r in urls},
            "ceiling": {r: busy.busy_share(r, top.start, top.end) for r in urls},
            "in_order": {r: busy.busy_share(r, inner.start, inner.end) for r in urls},
        },
        "cpu": {
            "search": meter.spent(cpu0, cpu1, s1 - s0),
            "ceiling": meter.spent(top.cpu_before, top.cpu_after, ceiling_s),
            "in_order": meter.spent(inner.cpu_before, inner.cpu_after, ordered_s),
        },
        "timeline": timeline(rec.phases, rec.sent),
        # A model call's mean ms, in the search and replayed in its order: how much slower the
        # servers answered the same calls while the search ran beside them.
        "call_ms": {
            "search": {r: _mean_phase_ms(rec.phases, p) for r, p in CALL_PHASES.items()},
            # The same calls from their first request's start to their last one's end, on the loop:
            # what the search's call took less the handing over to and from the job's thread.
            "search_http": {r: _mean_span_ms(rec.sent, u) for r, u in urls.items()},
            "in_order": {r: inner.done[r].mean_call_ms for r in urls},
        },
        "phases": [asdict(ph) for ph in rec.phases],  # every timed phase, for a closer look
        "ceiling_tokens": {role: asdict(r) for role, r in top.done.items()},
        "in_order_tokens": {role: asdict(r) for role, r in inner.done.items()},
        "uptime_before": before,
        "uptime_after": load_average(),
    }  # fmt: skip


# --------------------------------------------------------------------------- output


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_table(cells: list[dict[str, Any]]) -> None:
    head = (
        f"{'method':<7} {'K':>3} {'search s':>8} {'ceil s':>7} {'gen t/s':>8} {'ceil':>7} {'ratio':>6} "
        f"{'score t/s':>9} {'ceil':>7} {'ratio':>6} {'pol busy':>8} {'prm busy':>8} {'ceil busy p/r':>13} "
        f"{'in-order s':>10} {'ratio':>6}"
    )
    print(head)
    for c in cells:
        b = c["busy"]
        print(
            f"{c['method']:<7} {c['concurrency']:>3} {c['search_s']:>8.1f} {c['ceiling_s']:>7.1f} "
            f"{c['gen_tok_s']:>8.0f} {c['gen_ceiling_tok_s']:>7.0f} {_pct(c['gen_ratio']):>6} "
            f"{c['scored_tok_s']:>9.0f} {c['scored_ceiling_tok_s']:>7.0f} {_pct(c['scored_ratio']):>6} "
            f"{_pct(b['search']['policy']):>8} {_pct(b['search']['prm']):>8} "
            f"{_pct(b['ceiling']['policy']) + '/' + _pct(b['ceiling']['prm']):>13} "
            f"{c['in_order']['ceiling_s']:>10.1f} {_pct(c['in_order']['ratio']):>6}"
        )
    print("\ntimeline of a depth (mean ms over every depth of every job):")
    for c in cells:
        t = c["timeline"]["mean_ms"]
        parts = " ".join(f"{k}={v:.0f}" for k, v in t.items())
        print(f"  {c['method']} K={c['concurrency']} ({c['timeline']['depths']} depths): {parts}")
    print("\nmean ms of a model call, search | its requests on the loop | replayed in order: policy, PRM")
    for c in cells:
        calls = [c["call_ms"][k] for k in ("search", "search_http", "in_order")]
        pairs = [f"{_ms(ms['policy'])}, {_ms(ms['prm'])}" for ms in calls]
        print(f"  {c['method']} K={c['concurrency']}: " + " | ".join(pairs))
    print("\nCPU seconds (share of the machine's CPU time), search | ceiling | in order:")
    for c in cells:
        shares = [
            " ".join(f"{who}={v:.1f}s ({_pct(ph['machine_share'][who])})" for who, v in ph["cpu_s"].items())
            for ph in (c["cpu"]["search"], c["cpu"]["ceiling"], c["cpu"]["in_order"])
        ]
        print(f"  {c['method']} K={c['concurrency']}: " + " | ".join(shares))
    print(f"\nload: {cells[0]['uptime_before'] if cells else ''} .. {load_average()}")


MEDIANS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "search_s": lambda c: c["search_s"],
    "ceiling_s": lambda c: c["ceiling_s"],
    "in_order_s": lambda c: c["in_order"]["ceiling_s"],
    "of_ceiling": lambda c: c["gen_ratio"],
    "of_in_order": lambda c: c["in_order"]["ratio"],
    "in_order_of_ceiling": lambda c: c["in_order_of_ceiling"],
    "policy_busy": lambda c: c["busy"]["search"]["policy"],
    "prm_busy": lambda c: c["busy"]["search"]["prm"],
}


def medians(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and K, the median over repeats of each figure.  A ratio's median is taken over
    each repeat's own ratio, its search and ceilings measured back to back: on this machine two
    replays of the same requests differ by up to 2x minutes apart, and pairing cancels that drift."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        groups[(c["method"], c["concurrency"])].append(c)
    return [
        {"method": method, "concurrency": k, "repeats": len(group),
         **{name: _median([get(c) for c in group]) for name, get in MEDIANS.items()}, "best": best(group)}
        for (method, k), group in groups.items()
    ]  # fmt: skip


def best(group: list[dict[str, Any]]) -> dict[str, float]:
    """The fastest search, ceiling and in-order replay of a cell's repeats, and their ratios: each
    side at its least disturbed, so that neither side's noise is counted against the other."""
    search_s = min(c["search_s"] for c in group)
    ceiling_s = min(t for c in group for t in c["ceiling_runs_s"])
    in_order_s = min(t for c in group for t in c["in_order"]["runs_s"])
    return {
        "search_s": search_s, "ceiling_s": ceiling_s, "in_order_s": in_order_s,
        "of_ceiling": ceiling_s / search_s, "of_in_order": in_order_s / search_s,
        "in_order_of_ceiling": ceiling_s / in_order_s,
    }  # fmt: skip


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def print_medians(summary: list[dict[str, Any]]) -> None:
    print("\nmedians over repeats (ratios: each repeat's own, then their median):")
    print(f"{'method':<7} {'K':>3} {'n':>2} {'search s':>8} {'ceil s':>7} {'in-order s':>10} "
          f"{'of ceiling':>10} {'of in-order':>11} {'bound':>6} {'pol busy':>8} {'prm busy':>8}")  # fmt: skip
    for r in summary:
        print(
            f"{r['method']:<7} {r['concurrency']:>3} {r['repeats']:>2} {r['search_s']:>8.1f} "
            f"{r['ceiling_s']:>7.1f} {r['in_order_s']:>10.1f} {_pct(r['of_ceiling']):>10} "
            f"{_pct(r['of_in_order']):>11} {_pct(r['in_order_of_ceiling']):>6} "
            f"{_pct(r['policy_busy']):>8} {_pct(r['prm_busy']):>8}"
        )
    print("(bound: the in-order ceiling's share of the ceiling, the most a search with no etsq time reaches)")
    print("\nfastest of every repeat and replay, each side at its least disturbed:")
    print(f"{'method':<7} {'K':>3} {'search s':>8} {'ceil s':>7} {'in-order s':>10} "
          f"{'of ceiling':>10} {'of in-order':>11} {'bound':>6}")  # fmt: skip
    for r in summary:
        b = r["best"]
        print(
            f"{r['method']:<7} {r['concurrency']:>3} {b['search_s']:>8.1f} {b['ceiling_s']:>7.1f} "
            f"{b['in_order_s']:>10.1f} {_pct(b['of_ceiling']):>10} {_pct(b['of_in_order']):>11} "
            f"{_pct(b['in_order_of_ceiling']):>6}"
        )


# --------------------------------------------------------------------------- main


def start_servers(args: argparse.Namespace) -> tuple[dict[str, str], list[HttpServiceHandle]]:
    if args.policy_url and args.prm_url:
        return {"policy": args.policy_url, "prm": args.prm_url}, []
    paths = testbed_paths(Path(args.home))
    policy_cpus, prm_cpus = testbed_server_cpus()
    policy = serve("vllm-policy", paths.policy, Path(args.tmp), policy_cpus)
    prm = serve("vllm-prm", paths.prm, Path(args.tmp), prm_cpus)
    return {"policy": policy.url, "prm": prm.url}, [policy, prm]


def warm(args: argparse.Namespace, urls: dict[str, str]) -> None:
    """Connect the pooled clients and load the embedder before any cell's clock starts."""
    settings = Settings.for_home(Path(args.home))
    paths = testbed_paths(Path(args.home))
    models = ModelConfig.create(
        "openai", policy_url=urls["policy"], prm_url=urls["prm"], policy=str(paths.policy),
        prm=str(paths.prm), prm_family=PRM_FAMILY,
    )  # fmt: skip
    load_models(models, settings)
    if "ets" in args.methods:
        execute.load_embedder(models.embedding)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--max-step-tokens", type=int, default=16)
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--methods", nargs="+", default=["rebase", "ets"])
    parser.add_argument("--repeat", type=int, default=1, help="times each cell runs (medians reported)")
    parser.add_argument(
        "--replays", type=int, default=3,
        help="times each ceiling is replayed after a search; the fastest counts (the rest is noise)",
    )  # fmt: skip
    parser.add_argument("--sample-ms", type=float, default=100.0)
    parser.add_argument(
        "--no-kv-monitor", action="store_true", help="the search scrapes no /metrics (what the monitor costs)"
    )
    parser.add_argument("--policy-url")
    parser.add_argument("--prm-url")
    parser.add_argument("--serve", action="store_true", help="start the servers, write urls.json, wait")
    parser.add_argument("--out", type=Path, default=Path("saturation"))
    args = parser.parse_args()
    if args.replays < 1 or args.repeat < 1:
        parser.error("--replays and --repeat must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="etsq-sat-") as tmp:
        args.tmp, args.home = tmp, str(Path(tmp) / "home")
        os.environ.pop("ETSQ_DATABASE_URL", None)
        urls, handles = start_servers(args)
        try:
            if args.serve:
                (args.out / "urls.json").write_text(json.dumps(urls))
                print(json.dumps(urls), flush=True)
                threading.Event().wait()
            warm(args, urls)
            meter = CpuMeter({role: h.process.pid for role, h in zip(urls, handles, strict=False)})
            cells = []
            for repeat in range(args.repeat):  # repeats interleave the cells: drift hits each alike
                for method in args.methods:
                    for k in args.concurrency:
                        cells.append({"repeat": repeat, **run_cell(args, urls, method, k, meter)})
                        print(f"  {method} K={k}: {cells[-1]['search_s']:.1f} s search, "
                              f"{cells[-1]['ceiling_s']:.1f} s ceiling, "
                              f"{cells[-1]['in_order']['ceiling_s']:.1f} s in order", flush=True)  # fmt: skip
        finally:
            for handle in handles:
                handle.stop()
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tmp", "home")}
    summary = medians(cells)
    (args.out / "saturation.json").write_text(
        json.dumps({"config": config, "summary": summary, "cells": cells}, indent=2)
    )
    print_table(cells)
    print_medians(summary)


if __name__ == "__main__":
    main()
