"""Per-step orchestration overhead: queue + database writes + selection, with a zero-latency backend.

Starts a private Redis and PostgreSQL (the test harness's helpers) and a real `etsq worker`,
submits `--backend sim` runs (synthetic steps returned instantly), and reads the stored timings:
- per depth: the job's wall time divided by its depths (everything the worker does per step);
- select_ms of every selection row; commit cost = per-depth wall - select - expand - score;
- queue latency: the gap between one job's end and the next job's start on the same worker.
The same is then measured on SQLite for REBASE.  Every figure carries the machine's load averages.
Run: python bench/orchestration_bench.py [--width 256] [--limit 10] [--methods rebase ets] [--json PATH]
`--json PATH` writes {"rebase_step_ms_p50", "ets_step_ms_p50", "sqlite_rebase_step_ms_p50", and the
figures behind them}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from etsq.store import schema as m  # noqa: E402
from etsq.store.session import session_scope, upgrade  # noqa: E402
from etsq.store.statuses import JobStatus  # noqa: E402
from tests.services import start_postgres, start_redis  # noqa: E402


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _submit(env: dict[str, str], method: str, width: int, limit: int) -> int:
    # Trajectories end about every 25th step, so frontiers stay near W for many depths.
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "submit",
        "gsm8k",
        "--backend",
        "sim",
        "--method",
        method,
        "--width",
        str(width),
        "--limit",
        str(limit),
        "--sim-answer-every",
        "25",
        "--max-depth",
        "12",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"submit failed: {out.stderr.strip()}")
    return int(out.stdout.strip().splitlines()[-1])


def _wait(url: str, run_id: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(url) as s:
            statuses = list(s.scalars(select(m.Job.status).where(m.Job.run_id == run_id)))
        if all(JobStatus(st).finished for st in statuses):
            return
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} did not finish")


def _figures(url: str, run_id: int) -> dict[str, Any]:
    with session_scope(url) as s:
        jobs = s.scalars(select(m.Job).where(m.Job.run_id == run_id).order_by(m.Job.started_at)).all()
        steps = s.scalars(
            select(m.SelectionStep)
            .join(m.Job, m.Job.id == m.SelectionStep.job_id)
            .where(m.Job.run_id == run_id)
        ).all()
        walls = {j.id: (j.finished_at - j.started_at).total_seconds() * 1000 for j in jobs}
        per_depth = [walls[j.id] / (j.depth + 1) for j in jobs]
        gaps = [(b.started_at - a.finished_at).total_seconds() * 1000 for a, b in itertools.pairwise(jobs)]
        model = [(st.expand_ms or 0) + (st.score_ms or 0) for st in steps]
        # What the stored timings do not cover: the commit, tree bookkeeping, claim and model load.
        timed = {j.id: 0.0 for j in jobs}
        for st in steps:
            timed[st.job_id] += st.select_ms + (st.expand_ms or 0) + (st.score_ms or 0)
        other = [(walls[j.id] - timed[j.id]) / (j.depth + 1) for j in jobs]
        return {
            "jobs": len(jobs),
            "depths": len(steps),
            "step_wall_ms_p50": _p50(per_depth),
            "select_ms_p50": _p50([st.select_ms for st in steps if st.frontier_size > 1]),
            "sim_model_ms_p50": _p50(model),
            "untimed_ms_p50": _p50(other),
            "queue_gap_ms_p50": _p50(gaps),
            "frontier_p50": _p50([float(st.frontier_size) for st in steps]),
        }


def _load() -> list[float]:
    """The 1, 5 and 15 minute load averages: the machine is shared, so every figure carries them."""
    return [round(x, 2) for x in os.getloadavg()]


def _measure(url: str, env: dict[str, str], methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Start one worker on `url`, warm it up, and time a W=`args.width` run of each method."""
    env = {**env, "ETSQ_DATABASE_URL": url}
    log = open(Path(env["ETSQ_HOME"]) / "worker.log", "ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    results = {}
    try:
        for method in methods:
            _wait(url, _submit(env, method, 16, 1))  # warm-up: imports, embedder load
            run_id = _submit(env, method, args.width, args.limit)
            _wait(url, run_id)
            results[method] = {**_figures(url, run_id), "load": _load()}
    finally:
        worker.kill()
        worker.wait()
        log.close()
    return results


def _print(title: str, results: dict[str, Any]) -> None:
    print(title)
    for method, fig in results.items():
        print(
            f"  {method:7s} "
            + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in fig.items())
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["rebase", "ets"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="etsq-bench-"))
    redis, pg = start_redis(tmp / "redis"), start_postgres(tmp / "pg")
    env = {
        "ETSQ_DATA_DIR": str(REPO.parent / "shared" / "data"),
        **os.environ,
        "ETSQ_BROKER_URL": redis.url,
        "ETSQ_HOME": str(tmp / "home"),
    }
    Path(env["ETSQ_HOME"]).mkdir(parents=True, exist_ok=True)
    try:
        pg_url = pg.create_database("bench")
        upgrade(pg_url)
        postgres = _measure(pg_url, env, args.methods, args)
        sqlite_url = f"sqlite:///{tmp / 'bench.db'}"
        upgrade(sqlite_url)
        sqlite = _measure(sqlite_url, env, ["rebase"], args)
    finally:
        redis.stop()
        pg.stop()
    where = f"W={args.width}, {args.limit} problems, sim backend (zero latency), Redis, one worker"
    _print(f"{where}, PostgreSQL", postgres)
    _print(f"{where}, SQLite", sqlite)
    summary = {f"{k}_step_ms_p50": v["step_wall_ms_p50"] for k, v in postgres.items()}
    summary["sqlite_rebase_step_ms_p50"] = sqlite["rebase"]["step_wall_ms_p50"]
    print(json.dumps(summary))
    if args.json:
        out = {**summary, "width": args.width, "limit": args.limit, "postgres": postgres, "sqlite": sqlite}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
