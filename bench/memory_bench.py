"""A worker's peak memory: one `etsq worker --concurrency 8` searching 8 problems at W=1024 at once.

Starts a private Redis and PostgreSQL (the test harness's; `--db sqlite` for a SQLite file), a real
worker, warms it up with a W=16 problem (imports, first connections), then submits `--limit 8`
problems of gsm8k at `--width` on the sim backend (zero latency; trajectories end about every 25th
step, so frontiers stay near W until `--max-depth`) and samples the worker's resident memory until
the run is done.  Reported: the RSS after warm-up, the peak RSS (the kernel's VmHWM of the worker
process, which runs the searches in its threads), the nodes stored, the wall time and load averages.
Run: python bench/memory_bench.py [--width 1024] [--limit 8] [--method rebase] [--json PATH] [--src DIR]
`--src DIR`: run the worker of another checkout, for before/after figures from one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from etsq.store import schema as m  # noqa: E402
from etsq.store.session import session_scope, upgrade  # noqa: E402
from etsq.store.statuses import JobStatus  # noqa: E402
from tests.services import start_postgres, start_redis  # noqa: E402

GIB = 1024**3


def _status_kib(pid: int, field: str) -> int:
    """A `/proc/PID/status` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _submit(env: dict[str, str], src: Path, args: argparse.Namespace, width: int, limit: int) -> int:
    cmd = [sys.executable, "-m", "cli", "submit", "gsm8k", "--backend", "sim", "--method", args.method]
    cmd += ["--width", str(width), "--limit", str(limit), "--sim-answer-every", "25"]
    cmd += ["--max-depth", str(args.max_depth)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src)
    if out.returncode:
        raise SystemExit(f"submit failed: {out.stderr.strip()}")
    return int(out.stdout.strip().splitlines()[-1])


def _finished(url: str, run_id: int) -> bool:
    with session_scope(url) as s:
        statuses = list(s.scalars(select(m.Job.status).where(m.Job.run_id == run_id)))
    failed = [st for st in statuses if JobStatus(st) == JobStatus.FAILED]
    if failed:
        raise SystemExit(f"run {run_id}: {len(failed)} jobs failed")
    return all(JobStatus(st).finished for st in statuses)


def _follow(url: str, run_id: int, pid: int, timeout_s: float) -> int:
    """Wait for the run, sampling the worker's RSS; the largest sample in KiB."""
    deadline, peak = time.monotonic() + timeout_s, 0
    while not _finished(url, run_id):
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run_id} did not finish in {timeout_s:.0f} s")
        peak = max(peak, _status_kib(pid, "VmRSS"))
        time.sleep(0.2)
    return peak


def _nodes(url: str, run_id: int) -> int:
    with session_scope(url) as s:
        q = select(func.count(m.Node.id)).join(m.Job, m.Job.id == m.Node.job_id).where(m.Job.run_id == run_id)
        return int(s.scalar(q) or 0)


def _measure(url: str, env: dict[str, str], src: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**env, "ETSQ_DATABASE_URL": url, "PYTHONPATH": str(src)}
    log = open(Path(env["ETSQ_HOME"]) / "worker.log", "ab")
    argv = [
        sys.executable,
        "-m",
        "cli",
        "worker",
        "--concurrency",
        str(args.concurrency),
        "--loglevel",
        "WARNING",
    ]
    worker = subprocess.Popen(argv, env=env, cwd=src, stdout=subprocess.DEVNULL, stderr=log)
    try:
        warm = _submit(env, src, args, 16, 1)
        _follow(url, warm, worker.pid, args.timeout)
        rss_warm = _status_kib(worker.pid, "VmRSS")
        started = time.perf_counter()
        run_id = _submit(env, src, args, args.width, args.limit)
        sampled = _follow(url, run_id, worker.pid, args.timeout)
        wall = time.perf_counter() - started
        hwm = _status_kib(worker.pid, "VmHWM")
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
    return {
        "rss_after_warmup_mib": round(rss_warm / 1024, 1),
        "peak_rss_mib": round(hwm / 1024, 1),
        "peak_rss_sampled_mib": round(sampled / 1024, 1),
        "under_4_gib": hwm * 1024 < 4 * GIB,
        "nodes": _nodes(url, run_id),
        "seconds": round(wall, 1),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=8, help="problems (all searched at once)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--method", default="rebase")
    parser.add_argument("--max-depth", type=int, default=12)
    parser.add_argument("--db", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--src", type=Path, default=REPO, help="the checkout whose worker is measured")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    src = args.src.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="etsq-membench-"))
    redis = start_redis(tmp / "redis")
    pg = start_postgres(tmp / "pg") if args.db == "postgres" else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETSQ_")}
    env |= {"ETSQ_DATA_DIR": str(REPO.parent / "shared" / "data"), "ETSQ_BROKER_URL": redis.url,
            "ETSQ_HOME": str(tmp / "home")}  # fmt: skip
    Path(env["ETSQ_HOME"]).mkdir(parents=True)
    try:
        url = pg.create_database("bench") if pg else f"sqlite:///{tmp / 'bench.db'}"
        upgrade(url)
        result = _measure(url, env, src, args)
    finally:
        redis.stop()
        if pg:
            pg.stop()
    where = f"W={args.width}, {args.limit} problems, concurrency {args.concurrency}, {args.method}, {args.db}"
    print(f"{where}: " + "  ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({**options, "src": str(src), **result}, indent=2))


if __name__ == "__main__":
    main()
