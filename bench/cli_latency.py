"""Wall time of each CLI command at idle on the embedded default (sim backend): min of N runs.

    python bench/cli_latency.py [--repeat 5] [--home DIR]

Sets up a fresh ETSQ_HOME with one sim run (3 problems, no worker), then times each command that
enqueues nothing (their messages wait already) and `status`, each as a new process, as a user runs it.
Prints a table and the load average; the machine may be shared, so say it with the numbers.

Issue 22, on a shared 2-core box (min of 5, seconds; before = f075a2f at load 2.4, after at load 3.4-4.0):
submit (existing run) 3.64 -> 0.99, resume (nothing to send) 3.52 -> 0.95, sweep (existing grid)
3.64 -> 0.83, sweep --dry-run 1.45 -> 0.87, status 1.17 -> 0.60, status --json 1.16 -> 0.63,
aggregate 1.16 -> 0.69, broker status 0.57 -> 0.30, --help 0.43 -> 0.17.  The 3 s were a 1.5 s
broker broadcast for live queues (submit) or a ping (resume), Alembic imported to compare revisions,
and the search (numpy, the ILP) and Celery imported by every command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = "datasets: [gsm8k]\nmethods: [rebase]\nwidths: [2]\nlimit: 3\nmodels: {backend: sim}\n"
SUBMIT = ["submit", "gsm8k", "--method", "rebase", "--width", "2", "--limit", "3", "--backend", "sim"]


def commands(home: Path) -> dict[str, list[str]]:
    return {
        "submit (existing run)": SUBMIT,
        "resume (nothing to send)": ["resume", "1"],
        "sweep (existing grid)": ["sweep", str(home / "sweep.yaml")],
        "sweep --dry-run": ["sweep", str(home / "sweep.yaml"), "--dry-run"],
        "status": ["status"],
        "status --json": ["status", "--json"],
        "aggregate": ["aggregate"],
        "broker status": ["broker", "status"],
        "--help": ["--help"],
    }


def etsq(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"etsq {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="etsq-latency-"))
    env = {**os.environ, "ETSQ_HOME": str(home)}
    for key in ("ETSQ_DATABASE_URL", "ETSQ_BROKER_URL"):
        env.pop(key, None)
    (home / "sweep.yaml").write_text(SWEEP)
    etsq(SUBMIT, env)  # the run, its broker and its database
    print(f"load average before: {os.getloadavg()}")
    print(f"| command | min of {args.repeat} (s) |\n| --- | --- |")
    try:
        for name, cmd in commands(home).items():
            best = min(etsq(cmd, env) for _ in range(args.repeat))
            shown = " ".join(a for a in cmd if not a.startswith("/"))
            print(f"| `etsq {shown}` {name} | {best:.2f} |")
    finally:
        subprocess.run([sys.executable, "-m", "cli", "broker", "stop"], env=env, capture_output=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
