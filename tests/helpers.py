"""Small builders shared by tests: a searcher over the tiny model, a stored run, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import Result

from etsq.models.config import ModelConfig
from etsq.models.registry import load_local_models
from etsq.search.config import SearchConfig
from etsq.search.loop import DepthCommit, Searcher
from etsq.search.methods import get_method
from etsq.search.tree import Tree
from etsq.settings import Settings
from etsq.store.runs import RunSpec, create_run, load_problems, queued_jobs
from etsq.store.session import Store

# Small enough that a whole search over the tiny model takes well under a second.
FAST = {"max_step_tokens": 6, "max_tokens": 30, "max_depth": 6}


def tiny_config(method: str = "rebase", width: int = 4, seed: int = 0, **kw: Any) -> SearchConfig:
    return SearchConfig(method=method, width=width, seed=seed, **{**FAST, **kw})


def tiny_searcher(model: Path, cfg: SearchConfig, question: str = "What is 2 + 3?") -> Searcher:
    policy, prm = load_local_models(str(model), str(model), Path("/nonexistent"), "judge")
    return Searcher(question, "test/0", policy, prm, cfg, get_method(cfg.method).select)


def run_recorded(searcher: Searcher) -> tuple[Tree, list[DepthCommit]]:
    records: list[DepthCommit] = []
    tree = searcher.run(searcher.new_tree(), lambda _tree, rec: records.append(rec))
    return tree, records


def tiny_models(model: Path) -> ModelConfig:
    return ModelConfig.create("local", policy=str(model), prm=str(model), prm_family="judge")


def store_run(
    url: str, model: Path, cfg: SearchConfig, dataset: str = "gsm8k", limit: int = 2
) -> tuple[int, list[int]]:
    """A new run stored with its jobs queued (nothing enqueued): (run id, job ids)."""
    spec = RunSpec(dataset=dataset, search=cfg, models=tiny_models(model), limit=limit)
    store = Store.open(url)
    run_id, created = create_run(store, spec, load_problems(Settings.from_env(), spec), ["etsq"])
    assert created, "tests store each configuration once"
    return run_id, queued_ids(store, run_id)


def queued_ids(store: Store, run_id: int) -> list[int]:
    """The ids of the run's queued jobs."""
    with store.session() as s:
        return [job_id for job_id, _ in queued_jobs(s, run_id, "etsq")]


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the `etsq` CLI in this process through click's test runner (stdout and stderr apart)."""
    from click.testing import CliRunner

    from cli.main import cli as etsq_group

    return CliRunner().invoke(etsq_group, list(args), env=env, catch_exceptions=False)


def cli_json(*args: str, env: dict[str, str] | None = None) -> Any:
    result = cli(*args, "--json", env=env)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result: Result) -> str:
    """The single `etsq: error:` line a refused command printed (asserting exit status 2)."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etsq: error: "), result.stderr
    return lines[0]


def etsq(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real `etsq` CLI in a child process (for what needs a real process: workers, --wait)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def etsq_json(*args: str, env: dict[str, str] | None = None) -> Any:
    proc = etsq(*args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def tiny_submit_args(model: Path, method: str = "rebase", width: int = 4, limit: int = 3) -> list[str]:
    return [
        "--method", method, "--width", str(width), "--limit", str(limit),
        "--policy-model", str(model), "--max-step-tokens", str(FAST["max_step_tokens"]),
        "--max-tokens", str(FAST["max_tokens"]), "--max-depth", str(FAST["max_depth"]),
    ]  # fmt: skip
