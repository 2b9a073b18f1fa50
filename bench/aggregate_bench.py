"""Offline grading at scale: all 12 agg x vote combinations over about 1,000,000 stored nodes.

Builds one finished run per database by bulk insert: `--problems` problems (default 1,000) searched
at W=256, REBASE-shaped (each depth has `remaining` new nodes, about a quarter of them finish), so
about 1,000 nodes per problem.  Answers are MATH-like: integers, fractions and surds, each problem
with its own values, equivalent forms of the right answer (72 / 72.0 / $72$, 3/4 / \\frac{3}{4} /
0.75, \\sqrt{20} / 2\\sqrt{5}), several wrong ones, some leaves without an answer and some steps
without a score.  Then `etsq aggregate --agg all --vote all` (the library call behind it) runs in a
fresh process per database, which reports its seconds and peak RSS.

Run: python bench/aggregate_bench.py [--problems 1000] [--width 256] [--pg-url URL] [--json PATH]
Without --pg-url a private PostgreSQL is started (tests/services.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from etsq.store import schema as m  # noqa: E402
from etsq.store.session import Store, get_engine, upgrade  # noqa: E402

NODE_COLUMNS = (
    "id", "job_id", "parent_id", "depth", "path", "text", "step_tokens", "cum_tokens", "score", "terminal",
    "terminal_reason", "finish_reason", "answer", "kept", "n_children", "cluster",
)  # fmt: skip
STEP_TEXT = "Multiply both sides by two and simplify the resulting expression."


# --------------------------------------------------------------------------- answers


def answer_pool(i: int) -> tuple[str, list[str], list[str]]:
    """(gold, forms equivalent to it, wrong answers) of problem i: its own values, so nothing is
    shared between problems but what MATH answers share.  Kinds in MATH500's rough proportions:
    integers, fractions, surds and pi, points, complex numbers."""
    kind = i % 20
    if kind < 10:
        g = 10 + i
        return str(g), [str(g), f"{g}.0", f"${g}$"], [str(g + 1), str(2 * g), str(g - 7), str(g * 10)]
    if kind < 15:
        a, b = 1 + i % 7, 8 + i % 5
        wrong = [f"\\frac{{{a + 1}}}{{{b}}}", f"{b}/{a}", f"{a / (b + 1):.4f}"]
        return f"\\frac{{{a}}}{{{b}}}", [f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\dfrac{{{a}}}{{{b}}}"], wrong
    c, r = 2 + i % 9, 3 + 2 * (i % 5)
    if kind < 17:
        wrong = [f"{c + 1}\\sqrt{{{r}}}", f"\\sqrt{{{r + 2}}}", f"\\frac{{{c}\\pi}}{{{r}}}"]
        return f"{c}\\sqrt{{{r}}}", [f"{c}\\sqrt{{{r}}}", f"{c} \\sqrt {r}", f"\\sqrt{{{c * c * r}}}"], wrong
    if kind < 19:
        right = [f"({c}, -{r})", f"\\left( {c}, -{r} \\right)", f"({c}, -\\frac{{{2 * r}}}{{2}})"]
        return f"({c}, -{r})", right, [f"({r}, -{c})", f"({c}, {r})", f"(-{c}, -{r})"]
    right = [f"{c}-{r}i", f"-{r}i+{c}", f"{c} - {r} i"]
    return f"{c}-{r}i", right, [f"{c}+{r}i", f"{r}-{c}i", f"{c}-{r + 1}i"]


def leaf_answer(rng: random.Random, right: list[str], wrong: list[str]) -> str | None:
    roll = rng.random()
    if roll < 0.05:
        return None
    return rng.choice(right) if roll < 0.4 else rng.choice(wrong)


# --------------------------------------------------------------------------- trees


def problem_nodes(
    job_id: int, first_id: int, width: int, rng: random.Random, pool: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    """One REBASE-shaped tree: each depth has `remaining` new nodes; about a quarter finish."""
    _, right, wrong = pool
    root = (
        first_id,
        job_id,
        None,
        0,
        "0",
        "Question: ...",
        40,
        40,
        None,
        False,
        None,
        None,
        None,
        True,
        width,
        None,
    )
    rows = [root]
    frontier = [(first_id, "0", 40)]
    remaining, depth, next_id = width, 0, first_id + 1
    while remaining > 0 and frontier:
        depth += 1
        parents = rng.sample(frontier, k=min(len(frontier), max(1, remaining // 3)))
        frontier = []
        for n in range(remaining):
            parent_id, parent_path, cum = parents[n % len(parents)]
            tokens = rng.randint(8, 64)
            path = f"{parent_path}.{n // len(parents)}"
            score = None if rng.random() < 0.01 else rng.random()
            done = depth >= 12 or rng.random() < 0.25
            answer = leaf_answer(rng, right, wrong) if done else None
            reason = "answer" if done else None
            rows.append((next_id, job_id, parent_id, depth, path, STEP_TEXT, tokens, cum + tokens, score,
                         done, reason, "stop", answer, None, None, None))  # fmt: skip
            if done:
                remaining -= 1
            else:
                frontier.append((next_id, path, cum + tokens))
            next_id += 1
    return rows


def build(url: str, problems: int, width: int, seed: int = 0) -> int:
    """A finished run of `problems` problems stored in `url`; returns its node count."""
    upgrade(url)
    rng = random.Random(seed)
    engine = get_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        run_id = conn.execute(insert(m.Run).returning(m.Run.id), [_run_row(width)]).scalar_one()
        pools = [answer_pool(i) for i in range(problems)]
        conn.execute(insert(m.Problem), [_problem_row(i, pools[i][0]) for i in range(problems)])
        conn.execute(insert(m.Job), [_job_row(i + 1, run_id, i + 1, start) for i in range(problems)])
    total = 0
    chunk: list[tuple[Any, ...]] = []
    steps: list[dict[str, Any]] = []
    next_id = 1
    for i in range(problems):
        rows = problem_nodes(i + 1, next_id, width, rng, pools[i])
        next_id += len(rows)
        chunk.extend(rows)
        steps.extend(_steps(i + 1, rows))
        if len(chunk) >= 100_000:
            total += _insert_nodes(url, chunk)
            chunk = []
    total += _insert_nodes(url, chunk)
    with engine.begin() as conn:
        conn.execute(insert(m.SelectionStep), steps)
    return total


def _run_row(width: int) -> dict[str, Any]:
    return {"dataset": "bench", "method": "rebase", "width": width, "seed": 0, "config": {"bench": True},
            "config_hash": "bench", "policy_model": "sim", "prm_model": "sim", "versions": {}}  # fmt: skip


def _problem_row(i: int, gold: str) -> dict[str, Any]:
    meta = {"level": 1 + i % 5, "subject": ("Algebra", "Geometry", "Number Theory")[i % 3]}
    return {"id": i + 1, "dataset": "bench", "problem_id": f"bench-{i}", "question": f"Problem {i}?",
            "answer": gold, "meta": meta}  # fmt: skip


def _job_row(job_id: int, run_id: int, problem: int, start: datetime) -> dict[str, Any]:
    began = start + timedelta(seconds=30 * job_id)
    return {"id": job_id, "run_id": run_id, "problem_id": problem, "status": "done", "depth": 12,
            "started_at": began, "finished_at": began + timedelta(seconds=25)}  # fmt: skip


def _steps(job_id: int, rows: list[tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    by_depth: dict[int, int] = {}
    for row in rows:
        by_depth[row[3]] = by_depth.get(row[3], 0) + row[6]
    for depth, tokens in sorted(by_depth.items()):
        yield {"job_id": job_id, "depth": depth, "remaining": 1, "frontier_size": 1, "kept_size": 1,
               "children": 1, "kv_before": tokens * 3, "kv_after": tokens * 2, "select_ms": 1.0,
               "expand_ms": 10.0, "score_ms": 5.0, "info": {}}  # fmt: skip


def _insert_nodes(url: str, rows: list[tuple[Any, ...]]) -> int:
    if not rows:
        return 0
    if make_url(url).get_backend_name() == "postgresql":
        # COPY: the bulk path Postgres offers (executemany is ~5x slower at a million rows).
        raw = get_engine(url).raw_connection()
        try:
            with raw.cursor() as cur, cur.copy(f"COPY nodes ({', '.join(NODE_COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            raw.commit()
        finally:
            raw.close()
    else:
        with get_engine(url).begin() as conn:
            conn.execute(insert(m.Node), [dict(zip(NODE_COLUMNS, row, strict=True)) for row in rows])
    return len(rows)


# --------------------------------------------------------------------------- measuring


def measure(url: str) -> dict[str, Any]:
    """Run in a fresh process: grade every combination, report seconds and peak RSS."""
    from etsq.results.evaluate import evaluate

    t0 = time.perf_counter()
    rows = evaluate(Store.open(url), None, ["all"], ["all"])
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(_peak_rss_kib() / 1024, 1),
        "combinations": len(rows),
        "problems": rows[0]["n_problems"],
        "accuracy_last_weighted": next(
            r["accuracy"] for r in rows if (r["agg"], r["vote"]) == ("last", "weighted")
        ),
        "coverage": rows[0]["coverage"],
    }


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM): unlike ru_maxrss, not inherited from the parent
    that forked it (which built a million rows in memory)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure_in_child(url: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", url], capture_output=True, text=True, cwd=REPO, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _bench(name: str, url: str, problems: int, width: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    nodes = build(url, problems, width)
    built = time.perf_counter() - t0
    get_engine(url).dispose()
    result = {"database": name, "nodes": nodes, "build_s": round(built, 1), **_measure_in_child(url)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=1000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pg-url", default=None, help="an empty PostgreSQL database [default: start one]")
    parser.add_argument("--only", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    print(
        f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="etsq-aggbench-") as tmp:
        if args.only != "postgres":
            results.append(_bench("sqlite", f"sqlite:///{tmp}/bench.db", args.problems, args.width))
        if args.only != "sqlite":
            results.append(_bench_postgres(args, Path(tmp)))
    print(
        f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _bench_postgres(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    if args.pg_url:
        return _bench("postgres", args.pg_url, args.problems, args.width)
    from tests.services import start_postgres

    with start_postgres(tmp / "pg") as pg:
        return _bench("postgres", pg.create_database("aggbench"), args.problems, args.width)


if __name__ == "__main__":
    main()
