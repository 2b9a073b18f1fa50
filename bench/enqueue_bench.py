"""Store + enqueue and resume of a 40-run sweep over MATH500 (20,000 jobs, sim backend), embedded Redis.

For SQLite and for PostgreSQL (a private server, the test harness's), each on a fresh ETSQ_HOME whose
embedded Redis is started (and the database migrated) before the clock runs:
- `sweep`: `etsq sweep FILE` storing and enqueueing the 40 new runs (the command's wall time);
- `sweep_again`: the same again, every message still waiting (nothing stored or sent);
- `resume_one`: `etsq resume RUN` of one run, every message still waiting (it reads the queue);
- `resume_all_flushed`: after a FLUSHALL, `etsq resume --all`: 20,000 jobs sent again, each queue
  read once for the 40 runs;
- `resume_each_flushed` (with `--resume-each`): after another FLUSHALL, every run's `resume_run`
  (what `etsq resume RUN` calls) in one process, one run after another, each run reading the
  messages the runs before it sent (quadratic in the runs, as 40 `etsq resume RUN`s are);
- `sweep_flushed`: after another FLUSHALL, `etsq sweep FILE` again: the resubmission resumes each run.
After each step the queue is checked to hold every job's message exactly once.  Each figure carries
the load averages (the machine is shared) and the CPU seconds its process used.
Run: python bench/enqueue_bench.py [--only sqlite|postgres] [--json PATH] [--profile] [--resume-each]
[--src DIR]
`--src DIR`: run the commands of another checkout (e.g. `git archive` of an older commit), for
before/after figures from one sitting.  `--profile`: the first sweep under cProfile, top entries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SWEEP = """\
datasets: [math500]
methods: [ets, rebase, beam, dvts, bon]
widths: [4, 8, 16, 32, 64, 128, 256, 512]
models: {backend: sim}
"""
JOBS = 40 * 500

# The child of `resume_each_flushed`: every run's resume in one process, timed there (no start-up).
_RESUME_EACH = """
import json, sys, time
from etsq.settings import Settings
from etsq.store.session import Store
from etsq.submit import resume_run
settings = Settings.from_env()
store = Store.open(settings.database_url)
runs = json.loads(sys.argv[1])
started = time.perf_counter()
sent = sum(resume_run(settings, store, run).resumed.enqueued for run in runs)
print(json.dumps({"seconds": time.perf_counter() - started, "enqueued": sent}))
"""


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str], env: dict[str, str], src: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one command run from checkout `src`."""
    cpu, started = _child_cpu(), time.perf_counter()
    out = subprocess.run(argv, env={**env, "PYTHONPATH": str(src)}, cwd=src, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[:4])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return wall, _child_cpu() - cpu, out.stdout


def _cli(args: list[str], env: dict[str, str], src: Path, profile: Path | None = None) -> tuple[float, float]:
    prefix = [sys.executable, *(["-m", "cProfile", "-o", str(profile)] if profile else []), "-m", "cli"]
    wall, cpu, _ = _run([*prefix, *args], env, src)
    return wall, cpu


def _queue_check(url: str, expected: set[int]) -> None:
    """Every job's message waits in the queue exactly once, and nothing else does."""
    import redis

    from etsq.queue.messages import message_job_id

    client = redis.Redis.from_url(url)
    ids = Counter(message_job_id(raw) for raw in client.lrange("etsq", 0, -1))
    client.close()
    twice = [job for job, n in ids.items() if n > 1]
    if set(ids) != expected or twice:
        raise SystemExit(f"queue: {len(ids)} distinct jobs for {len(expected)} expected, {len(twice)} twice")


def _jobs(url: str) -> tuple[list[int], set[int]]:
    from sqlalchemy import select

    from etsq.store import schema as m
    from etsq.store.session import session_scope

    with session_scope(url) as s:
        runs = list(s.scalars(select(m.Run.id).order_by(m.Run.id)))
        return runs, set(s.scalars(select(m.Job.id)))


def _flush(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()


def _figure(wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {"seconds": round(wall, 3), "cpu_s": round(cpu, 3), "load": _load(), **extra}


def _bench(name: str, db_url: str, home: Path, src: Path, profile: bool, resume_each: bool) -> dict[str, Any]:
    from etsq.queue.broker import ensure_local_redis, stop_local_redis
    from etsq.store.session import upgrade

    upgrade(db_url)
    broker = ensure_local_redis(home)  # started before the clock: the sweep's figure is store + enqueue
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETSQ_")}
    env |= {"ETSQ_HOME": str(home), "ETSQ_DATABASE_URL": db_url}
    sweep = home / "sweep.yaml"
    sweep.write_text(SWEEP)
    out: dict[str, Any] = {"database": name}
    try:
        prof = home / "sweep.prof" if profile else None
        out["sweep"] = _figure(*_cli(["sweep", str(sweep)], env, src, prof), jobs=JOBS)
        runs, jobs = _jobs(db_url)
        _queue_check(broker, jobs)
        out["sweep_again"] = _figure(*_cli(["sweep", str(sweep)], env, src))
        out["resume_one"] = _figure(*_cli(["resume", str(runs[0])], env, src))
        _queue_check(broker, jobs)
        _flush(broker)
        out["resume_all_flushed"] = _figure(*_cli(["resume", "--all"], env, src))
        _queue_check(broker, jobs)
        if resume_each:
            _flush(broker)
            wall, cpu, text = _run([sys.executable, "-c", _RESUME_EACH, json.dumps(runs)], env, src)
            inner = json.loads(text)
            figure = _figure(inner["seconds"], cpu, enqueued=inner["enqueued"], process_s=wall)
            out["resume_each_flushed"] = figure
            _queue_check(broker, jobs)
        _flush(broker)
        out["sweep_flushed"] = _figure(*_cli(["sweep", str(sweep)], env, src))
        _queue_check(broker, jobs)
        if prof is not None:
            _print_profile(prof)
    finally:
        stop_local_redis(home)
    return out


def _print_profile(path: Path) -> None:
    import pstats

    print(f"profile of the first sweep ({path}), by cumulative time:")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(30)


def _bench_postgres(tmp: Path, src: Path, profile: bool, resume_each: bool) -> dict[str, Any]:
    from tests.services import start_postgres

    server = start_postgres(tmp / "pg")
    try:
        url = server.create_database("bench")
        return _bench("postgres", url, tmp / "home-pg", src, profile, resume_each)
    finally:
        server.stop()


def _print(result: dict[str, Any]) -> None:
    print(f"{result['database']}:", flush=True)
    for step, fig in result.items():
        if isinstance(fig, dict):
            extra = "".join(f" {k}={v}" for k, v in fig.items() if k not in ("seconds", "cpu_s", "load"))
            load = " ".join(f"{x:.2f}" for x in fig["load"])
            print(f"  {step:20s} {fig['seconds']:7.2f} s  cpu {fig['cpu_s']:6.2f} s  load {load}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--profile", action="store_true", help="profile the first sweep of each database")
    parser.add_argument("--resume-each", action="store_true", help="also resume the 40 runs one by one")
    parser.add_argument("--src", type=Path, default=REPO, help="the checkout whose commands are timed")
    args = parser.parse_args()
    src = args.src.resolve()
    results = []
    with tempfile.TemporaryDirectory(prefix="etsq-enqbench-") as name:
        tmp = Path(name)
        if args.only != "postgres":
            sqlite = f"sqlite:///{tmp}/bench.db"
            results.append(_bench("sqlite", sqlite, tmp / "home-sqlite", src, args.profile, args.resume_each))
            _print(results[-1])
        if args.only != "sqlite":
            results.append(_bench_postgres(tmp, src, args.profile, args.resume_each))
            _print(results[-1])
    if args.json:
        args.json.write_text(json.dumps({"src": str(src), "results": results}, indent=2))


if __name__ == "__main__":
    main()
