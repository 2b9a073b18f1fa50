"""The study in miniature: every method at W = 4, 16, 64 on the testbed, through vLLM's CPU server.

Starts one vLLM OpenAI-compatible server on the testbed policy and one on its PRM (the CPU build the
test suite uses, `scripts/vllm_env.sh`), submits a sweep over `arith` (bon, beam, dvts, rebase, ets,
particle x the widths) with the `openai` backend, runs one `etsq worker` until every run is done, and
writes into --out: `study.json` (`etsq study`: every method against REBASE, with intervals),
`results.json` (`etsq aggregate`), `report/` (`etsq report`), and prints the results table.  Everything
runs under a fresh ETSQ_HOME (embedded Redis, SQLite), so nothing of the user's is touched.

    python bench/testbed_study.py --problems 200 --widths 4 16 64 --out /tmp/study
    python bench/testbed_study.py --problems 20 --widths 4 16 --methods rebase ets   # a quick look
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

from etsq.testbed.build import PRM_FAMILY, testbed_paths  # noqa: E402
from tests.model_servers import testbed_server_cpus, testbed_vllm_argv  # noqa: E402
from tests.services import HttpServiceHandle, start_http_service  # noqa: E402

METHODS = ("bon", "beam", "dvts", "rebase", "ets", "particle")


def etsq(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"etsq {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def serve(name: str, model: Path, tmp: Path, cpus: str) -> HttpServiceHandle:
    argv = testbed_vllm_argv(model)
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = cpus  # a CPU of its own (tests.model_servers.testbed_server_cpus)
    return start_http_service(name, argv, tmp / name, start_timeout=420.0, env=env)


def sweep_file(
    path: Path, args: argparse.Namespace, policy: HttpServiceHandle, prm: HttpServiceHandle
) -> Path:
    paths = testbed_paths(Path(args.home))
    models = {
        "backend": "openai",
        "policy_url": policy.url,
        "prm_url": prm.url,
        "policy": str(paths.policy),  # the chat template's tokenizer
        "prm": str(paths.prm),
        "prm_family": PRM_FAMILY,
    }
    grid = {
        "datasets": ["arith"],
        "methods": list(args.methods),
        "widths": list(args.widths),
        "limit": args.problems,
        "params": {"max_step_tokens": 16, "max_depth": 12},
        "models": models,
    }
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


def wait_for_runs(
    env: dict[str, str], deadline: float, servers: list[HttpServiceHandle]
) -> list[dict[str, Any]]:
    while True:
        dead = [s for s in servers if s.process.poll() is not None]
        if dead:  # the jobs would retry until the deadline
            tail = dead[0].log.read_text(errors="replace").splitlines()[-20:]
            raise SystemExit(f"{dead[0].name} exited; the end of its log:\n" + "\n".join(tail))
        rows = json.loads(etsq(env, "status", "--json"))
        if rows and all(r["status"] in ("done", "failed", "cancelled") for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise SystemExit("the runs did not finish in time: " + json.dumps(rows)[:2000])
        done = sum(r["problems_done"] for r in rows)
        total = sum(r["problems"] for r in rows)
        print(f"  {done}/{total} problems done", flush=True)
        time.sleep(15)


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'run':<28} {'acc':>6} {'cover':>6} {'kv_after':>10} {'tokens':>8} {'s/prob':>8}")
    for r in results:
        print(
            f"{r['label']:<28} {r['accuracy']:>6.3f} {r['coverage']:>6.3f} {r['kv_after'] or 0:>10.0f} "
            f"{r['tokens'] or 0:>8.0f} {r['seconds'] or 0:>8.3g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout-min", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("testbed-study"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="etsq-study-") as tmp_name:
        tmp = Path(tmp_name)
        args.home = str(tmp / "home")
        env = {**os.environ, "ETSQ_HOME": args.home, "PYTHONPATH": str(REPO)}
        env.pop("ETSQ_DATABASE_URL", None)
        env.pop("ETSQ_BROKER_URL", None)
        paths = testbed_paths(Path(args.home))
        policy_cpus, prm_cpus = testbed_server_cpus()
        policy = serve("vllm-policy", paths.policy, tmp, policy_cpus)
        prm = serve("vllm-prm", paths.prm, tmp, prm_cpus)
        worker = None
        try:
            print(f"servers up in {time.monotonic() - started:.0f} s; submitting", flush=True)
            etsq(env, "sweep", str(sweep_file(tmp / "sweep.yaml", args, policy, prm)))
            log = open(args.out / "worker.log", "w")
            worker = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--concurrency", str(args.concurrency)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            searched = time.monotonic()
            wait_for_runs(env, searched + args.timeout_min * 60, [policy, prm])
            print(f"searched in {time.monotonic() - searched:.0f} s", flush=True)
            (args.out / "study.json").write_text(etsq(env, "study", "--json"))
            results = json.loads(etsq(env, "aggregate", "--json"))
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
            etsq(env, "report", "--out", str(args.out / "report"))
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(60)
            policy.stop()
            prm.stop()
    print_table(results)
    print(f"total {time.monotonic() - started:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
