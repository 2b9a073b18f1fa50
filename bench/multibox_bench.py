"""Per-depth orchestration with PostgreSQL on another box: same-box vs across a veth link (issue 21).

The measurement of bench/orchestration_bench.py (a real `etsq worker`, `--backend sim` so the model
costs nothing, Redis on this box, W=256, REBASE and ETS, p50 of each job's wall time per depth), run
against three databases in turn:
- `same-box`: a private Postgres on 127.0.0.1 (tests/services.py `start_postgres`);
- `veth`: a Postgres in a `store` network namespace, reached over a veth pair and a bridge
  (tests/multibox.py `Net`, `StorePostgres`; password login, as a second box would use);
- `veth+proxy`: the same, through a TCP proxy in this process that delays every chunk by
  `--delay-ms` each way (asyncio), standing in for a LAN's latency.
Each row also gives the SELECT 1 round-trip time to that database (p50 of 200, from this process).

`commit p50` is `selection_steps.commit_ms` (the writer's time up to the moment its last statement
goes out; the worker writes a depth while it searches the next), `whole` the whole `DepthWriter._write`
call as the worker times it (answer included).
Round trips per depth commit are counted two ways, in the worker itself (it is started through this
file, which wraps `DepthWriter._write` and listens to SQLAlchemy's events, changing no etsq code):
- `sql`: per commit, pool checkouts (each is one `SELECT 1` ping: the engine has pool_pre_ping) +
  transaction begins (psycopg sends BEGIN as its own query; none on an autocommit connection) +
  `before_cursor_execute` statements (an executemany counted once) + commits (none in autocommit);
- `wire` (the proxied row only): the proxy timestamps every chunk it reads from either side, and the
  worker logs each commit's start, end and its connection's local port; a round trip is a chunk from
  the client that follows a chunk from the server (or opens the window), on that connection, inside
  the commit.  This is what the link's latency multiplies.
Root only (ip netns).  Namespaces, links, servers and the worker are removed on exit, even on failure.
Run: python bench/multibox_bench.py [--width 256] [--limit 10] [--delay-ms 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

COMMITS_LOG = "ETSQ_BENCH_COMMITS_LOG"


# --------------------------------------------------------------------------- inside the worker


def _worker_shim(argv: list[str]) -> None:
    """Run `etsq <argv>` with every depth commit's database round trips logged (one JSON line each)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    from etsq.store.trees import DepthWriter

    out = open(os.environ[COMMITS_LOG], "a", buffering=1)
    local = threading.local()

    def counts() -> dict[str, Any] | None:
        return getattr(local, "counts", None)

    def on_execute(conn: Any, _cursor: Any, _stmt: str, _params: Any, _ctx: Any, many: bool) -> None:
        c = counts()
        if c is None:
            return
        c["statements"] += 1
        c["executemany"] += int(many)
        if c["port"] is None:
            with contextlib.suppress(Exception):
                fd = conn.connection.dbapi_connection.pgconn.socket
                with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as s:
                    c["port"] = s.getsockname()[1]

    def bump(key: str) -> Any:
        def listener(*_a: Any) -> None:
            c = counts()
            if c is not None:
                c[key] += 1

        return listener

    def bump_sent(key: str) -> Any:
        # psycopg sends no BEGIN or COMMIT on an autocommit connection, though SQLAlchemy's events fire.
        def listener(conn: Any) -> None:
            c = counts()
            if c is not None and not conn.connection.dbapi_connection.autocommit:
                c[key] += 1

        return listener

    event.listen(Engine, "before_cursor_execute", on_execute)
    event.listen(Engine, "begin", bump_sent("begin"))
    event.listen(Engine, "commit", bump_sent("commit"))
    event.listen(Pool, "checkout", bump("checkout"))
    original = DepthWriter._write

    def commit(self: DepthWriter, tree: Any, handed: Any) -> None:
        local.counts = dict(statements=0, executemany=0, begin=0, commit=0, checkout=0, port=None)
        t0 = time.time()
        try:
            original(self, tree, handed)
        finally:
            t1 = time.time()
            c, local.counts = local.counts, None
            row = {**c, "job": self.job_id, "depth": handed.rec.depth, "t0": t0, "t1": t1}
            out.write(json.dumps(row) + "\n")

    DepthWriter._write = commit  # type: ignore[method-assign]
    sys.argv = ["etsq", *argv]
    from cli.main import main

    main()


# --------------------------------------------------------------------------- the delaying proxy


class DelayProxy:
    """TCP proxy on 127.0.0.1 to `target`, every chunk held `delay_s` before it is passed on, in order.
    Records (time, 'c' | 's') per chunk read, per client port ('c': from the client)."""

    def __init__(self, host: str, port: int, delay_s: float) -> None:
        self.target, self.delay = (host, port), delay_s
        self.events: dict[int, list[tuple[float, str]]] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    def start(self) -> int:
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.thread.start()
        return int(self.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    async def _client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        events = self.events.setdefault(cwriter.get_extra_info("peername")[1], [])
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(
            self._pipe(creader, swriter, events, "c"), self._pipe(sreader, cwriter, events, "s")
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[Any], side: str
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                events.append((time.time(), side))
                queue.put_nowait((loop.time() + self.delay, data))
        except OSError:
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await sender
            writer.close()


def wire_round_trips(events: list[tuple[float, str]], t0: float, t1: float) -> int:
    """Client chunks inside [t0, t1] that follow a server chunk (or open the window): round trips."""
    trips, last = 0, "s"
    for t, side in events:
        if t < t0:
            continue
        if t > t1:
            break
        trips += side == "c" and last == "s"
        last = side
    return trips


# --------------------------------------------------------------------------- the bench


@contextlib.contextmanager
def _namespace_net(tag: str) -> Iterator[Any]:
    """A `store` namespace on a bridge, reached from this namespace over one veth (no other boxes)."""
    from tests.multibox import Net, sh

    used = sh("ip", "-4", "route").stdout
    n = next(n for n in range(20 + os.getpid() % 150, 250) if f"10.200.{n}." not in used)
    net = Net(tag, f"10.200.{n}", boxes=())
    try:
        net.up()
        yield net
    finally:
        net.down()


def _rtt_ms(url: str, n: int = 200) -> float:
    """p50 of `SELECT 1` on one open connection: the round trip to that database."""
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as c:
        c.execute("SELECT 1")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            c.execute("SELECT 1").fetchone()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _commit_ms(url: str, run_id: int) -> float:
    from sqlalchemy import select

    from etsq.store import schema as m
    from etsq.store.session import session_scope

    with session_scope(url) as s:
        rows = s.scalars(
            select(m.SelectionStep.commit_ms)
            .join(m.Job, m.Job.id == m.SelectionStep.job_id)
            .where(m.Job.run_id == run_id)
        ).all()
    return statistics.median([r for r in rows if r is not None] or [float("nan")])


def _usual_parts(commits: list[dict[str, Any]]) -> dict[str, int]:
    """The most common (checkout, begin, statements, commit) counts of one commit."""
    keys = ("checkout", "begin", "statements", "commit")
    parts = Counter(tuple(c[k] for k in keys) for c in commits).most_common(1)[0][0]
    return dict(zip(keys, parts, strict=True))


def _job_ids(url: str, run_id: int) -> set[int]:
    """The run's jobs, all of which must be done."""
    from sqlalchemy import select

    from etsq.store import schema as m
    from etsq.store.session import session_scope

    with session_scope(url) as s:
        jobs = s.execute(select(m.Job.id, m.Job.status, m.Job.error).where(m.Job.run_id == run_id)).all()
    bad = [(j.id, str(j.status), j.error) for j in jobs if str(j.status) != "done"]
    if bad:
        raise RuntimeError(f"run {run_id}: jobs not done: {bad[:3]}")
    return {j.id for j in jobs}


def _measure(
    name: str,
    url: str,
    worker_url: str,
    env: dict[str, str],
    args: argparse.Namespace,
    proxy: DelayProxy | None = None,
) -> dict[str, Any]:
    """One worker on `worker_url` (the same database as `url`): a warm-up, then each method's run."""
    import orchestration_bench as ob

    log_path = Path(env["ETSQ_HOME"]) / f"commits-{name}.jsonl"
    wenv = {**env, "ETSQ_DATABASE_URL": worker_url, COMMITS_LOG: str(log_path)}
    results: dict[str, Any] = {}
    with open(Path(env["ETSQ_HOME"]) / f"worker-{name}.log", "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--worker-shim", "worker", "--loglevel", "WARNING"],
            env=wenv,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        try:
            senv = {**env, "ETSQ_DATABASE_URL": url}
            rtt = _rtt_ms(worker_url)
            for method in args.methods:
                ob._wait(url, ob._submit(senv, method, 16, 1), timeout=300)  # warm-up
                run_id = ob._submit(senv, method, args.width, args.limit)
                ob._wait(url, run_id, timeout=600)
                fig = ob._figures(url, run_id)
                jobs = _job_ids(url, run_id)
                commits = [c for c in map(json.loads, log_path.read_text().splitlines()) if c["job"] in jobs]
                sql = [c["checkout"] + c["begin"] + c["statements"] + c["commit"] for c in commits]
                row = {
                    "step_ms_p50": fig["step_wall_ms_p50"],
                    "commit_ms_p50": _commit_ms(url, run_id),
                    "commit_wall_ms_p50": statistics.median([(c["t1"] - c["t0"]) * 1000 for c in commits]),
                    "select1_rtt_ms": rtt,
                    "commits": len(commits),
                    "sql_trips_p50": statistics.median(sql),
                    "sql_trips_max": max(sql),
                    "sql_trips_counts": dict(sorted(Counter(sql).items())),
                    "sql_parts_usual": _usual_parts(commits),
                    "executemany": sum(c["executemany"] for c in commits),
                    "figures": fig,
                    "load": ob._load(),
                }
                if proxy is not None:
                    wire = [
                        wire_round_trips(proxy.events.get(c["port"], []), c["t0"], c["t1"]) for c in commits
                    ]
                    row.update(wire_trips_p50=statistics.median(wire), wire_trips_max=max(wire))
                    row["wire_trips_counts"] = dict(sorted(Counter(wire).items()))
                results[method] = row
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, 9)
            worker.wait(30)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-shim":
        _worker_shim(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["rebase", "ets"])
    ap.add_argument("--delay-ms", type=float, default=1.0, help="the proxy's delay each way; 0: no proxy row")
    ap.add_argument("--configs", nargs="+", default=["same-box", "veth", "proxy"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from etsq.store.session import upgrade
    from tests.multibox import StorePostgres, can_make_namespaces
    from tests.services import start_postgres, start_redis

    if not can_make_namespaces():
        raise SystemExit("multibox_bench: needs root, ip and setpriv (network namespaces)")
    tmp = Path(tempfile.mkdtemp(prefix="etsq-mbench-"))
    env = {
        "ETSQ_DATA_DIR": str(REPO.parent / "shared" / "data"),
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "ETSQ_HOME": str(tmp / "home"),
        "PYTHONPATH": str(REPO),
    }
    Path(env["ETSQ_HOME"]).mkdir(parents=True)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        redis = start_redis(tmp / "redis")
        stack.callback(redis.stop)
        env["ETSQ_BROKER_URL"] = redis.url
        if "same-box" in args.configs:
            pg = start_postgres(tmp / "pg")
            stack.callback(pg.stop)
            local_url = pg.create_database("bench")
            upgrade(local_url)
            results["same-box"] = _measure("same-box", local_url, local_url, env, args)
            pg.stop()  # one Postgres at a time on the shared cores

        net = stack.enter_context(_namespace_net(f"mbn{os.getpid() % 100000}"))
        store = StorePostgres(net, "pgBench5c1e07aa", tmp)
        stack.callback(store.stop)
        store.start()
        remote_url = store.url()
        upgrade(remote_url)
        if "veth" in args.configs:
            results["veth"] = _measure("veth", remote_url, remote_url, env, args)
        if "proxy" in args.configs and args.delay_ms > 0:
            proxy = DelayProxy(net.addr("store"), 5432, args.delay_ms / 1000)
            port = proxy.start()
            stack.callback(proxy.stop)
            # A database of its own: a run submitted again with the same config is the stored run.
            with store.connect() as c:
                c.execute("CREATE DATABASE proxied")
            remote_url = remote_url.rsplit("/", 1)[0] + "/proxied"
            upgrade(remote_url)
            proxied = remote_url.replace(f"{net.addr('store')}:5432", f"127.0.0.1:{port}")
            results[f"veth+proxy {args.delay_ms:g}ms"] = _measure(
                "proxy", remote_url, proxied, env, args, proxy
            )

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"W={args.width}, {args.limit} problems, sim backend (zero latency), Redis on this box, one worker")
    head = f"{'database':22s} {'method':7s} {'depth p50':>9s} {'commit p50':>10s} {'whole':>7s} {'RTT':>6s} "
    print(head + f"{'trips sql':>9s} {'trips wire':>10s}  load (1/5/15 min)")
    for where, rows in results.items():
        for method, r in rows.items():
            wire = f"{r['wire_trips_p50']:g} (max {r['wire_trips_max']})" if "wire_trips_p50" in r else "-"
            print(
                f"{where:22s} {method:7s} {r['step_ms_p50']:7.1f}ms {r['commit_ms_p50']:8.1f}ms "
                f"{r['commit_wall_ms_p50']:5.1f}ms "
                f"{r['select1_rtt_ms']:4.2f}ms {r['sql_trips_p50']:9g} {wire:>10s}  {r['load']}"
            )
    for where, rows in results.items():
        for method, r in rows.items():
            wire = f", wire {r['wire_trips_counts']}" if "wire_trips_counts" in r else ""
            print(f"round trips per commit -> commits: {where} {method}: sql {r['sql_trips_counts']}{wire}")
    first = next(iter(next(iter(results.values())).values()))
    print(f"a usual commit's parts (sql count): {first['sql_parts_usual']}")
    if args.json:
        args.json.write_text(json.dumps({"width": args.width, "limit": args.limit, **results}, indent=2))


if __name__ == "__main__":
    main()
