"""The results table, compare, report and tree view on real stored runs (the sim backend and the
tiny model, searched in-process), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from etsq.models.config import ModelConfig
from etsq.queue.execute import run_job
from etsq.results.compare import RESAMPLES, paired_bootstrap
from etsq.search.config import SearchConfig
from etsq.settings import Settings
from etsq.store import schema as m
from etsq.store.runs import RunSpec, cancel_run, create_run, load_problems
from etsq.store.session import Store, session_scope
from tests.helpers import cli, cli_json, one_error_line, queued_ids, store_run, tiny_config


def sim_run(url: str, method: str = "rebase", width: int = 4, limit: int = 3, dataset: str = "gsm8k",
            finish: int | None = None, seed: int = 0) -> int:  # fmt: skip
    """A `--backend sim` run searched in this process; only its first `finish` jobs are run."""
    search = SearchConfig(method=method, width=width, seed=seed, max_depth=8)
    spec = RunSpec(dataset=dataset, search=search, models=ModelConfig.create("sim"), limit=limit)
    settings = Settings.from_env().with_(database_url=url)
    run_id, _ = create_run(Store.open(url), spec, load_problems(settings, spec), ["etsq"])
    for job_id in queued_ids(Store.open(url), run_id)[:finish]:
        assert run_job(job_id, settings) == "done"
    return run_id


def _env(url: str) -> dict[str, str]:
    return {"ETSQ_DATABASE_URL": url}


def _stored_figures(url: str, run_id: int) -> dict[str, float]:
    """The figures computed straight from the tables, to check the table's against."""
    done = select(m.Job.id).where(m.Job.run_id == run_id, m.Job.status == "done").scalar_subquery()
    step, node = m.SelectionStep, m.Node
    with session_scope(url) as s:
        n = s.scalar(select(func.count()).select_from(m.Job).where(m.Job.id.in_(done)))
        kv_before, kv_after = s.execute(
            select(func.sum(step.kv_before), func.sum(step.kv_after)).where(step.job_id.in_(done))
        ).one()
        peaks = s.execute(select(func.max(step.kv_before)).where(step.job_id.in_(done)).group_by(step.job_id))
        tokens, sampled = s.execute(
            select(func.sum(node.step_tokens), func.count()).where(
                node.job_id.in_(done), node.parent_id.is_not(None)
            )
        ).one()
    return {
        "kv_before": kv_before / n, "kv_after": kv_after / n, "kv_peak": sum(p for (p,) in peaks) / n,
        "tokens": tokens / n, "policy_calls": sampled / n,
    }  # fmt: skip


def test_the_table_has_every_combination_and_figure(db_url: str) -> None:
    rebase = sim_run(db_url, "rebase")
    beam = sim_run(db_url, "beam")
    rows = cli_json("aggregate", "--agg", "all", "--vote", "all", env=_env(db_url))
    assert len(rows) == 24
    assert {(r["agg"], r["vote"]) for r in rows if r["run_id"] == beam} == {
        (a, v) for a in ("last", "mean", "prod", "min") for v in ("bon", "majority", "weighted")
    }
    for run_id in (rebase, beam):
        row = next(r for r in rows if r["run_id"] == run_id)
        stored = _stored_figures(db_url, run_id)
        for name, value in stored.items():
            assert row[name] == pytest.approx(value), name
        assert row["prm_calls"] == pytest.approx(stored["policy_calls"])  # the sim PRM scores every step
        assert row["kv_after"] <= row["kv_before"] and row["server_kv_peak"] is None
        assert (row["n_problems"], row["n_total"], row["n_failed"], row["partial"]) == (3, 3, 0, False)
        assert 0 <= row["accuracy"] <= row["coverage"] <= 1
        assert row["seconds"] > 0 and row["nodes_per_s"] > 0


def test_default_and_repeated_choices_keep_their_order(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    sim_run(url)
    [row] = cli_json("aggregate", env=_env(url))
    assert (row["agg"], row["vote"]) == ("last", "weighted")
    rows = cli_json("aggregate", "--agg", "prod", "--agg", "min", "--vote", "majority", env=_env(url))
    assert [(r["agg"], r["vote"]) for r in rows] == [("prod", "majority"), ("min", "majority")]


def test_filters_select_runs_and_problems(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    env = _env(url)
    gsm = sim_run(url, "rebase", width=4)
    wide = sim_run(url, "rebase", width=8)
    beam = sim_run(url, "beam", width=4)
    math = sim_run(url, "rebase", width=4, dataset="math500", limit=5)
    ids = lambda rows: sorted({r["run_id"] for r in rows})  # noqa: E731
    assert ids(cli_json("aggregate", "--method", "rebase", env=env)) == [gsm, wide, math]
    nothing = one_error_line(cli("aggregate", "--width", "8", "--method", "beam", env=env))
    assert "no run matches --method beam --width 8" in nothing and "methods beam, rebase" in nothing
    assert ids(cli_json("aggregate", "--width", "4", "--dataset", "gsm8k", env=env)) == [gsm, beam]
    levels = _math_levels(url, math)
    [row] = cli_json("aggregate", "--level", "5", env=env)
    assert row["run_id"] == math and row["n_problems"] == levels.count("5") == row["n_total"]
    [row] = cli_json("aggregate", "--level", "2", "--level", "3", "--subject", "algebra", env=env)
    assert row["n_problems"] == len(_math_problems(url, math, {"2", "3"}, "algebra")) > 0
    line = one_error_line(cli("aggregate", "--level", "9", env=env))
    assert "no problem of the selected runs has the --level / --subject asked for" in line


def _math_levels(url: str, run_id: int) -> list[str]:
    with session_scope(url) as s:
        metas = s.scalars(select(m.Problem.meta).join(m.Job).where(m.Job.run_id == run_id)).all()
    return [str(meta["level"]) for meta in metas]


def _math_problems(url: str, run_id: int, levels: set[str], subject: str) -> list[dict[str, Any]]:
    with session_scope(url) as s:
        metas = s.scalars(select(m.Problem.meta).join(m.Job).where(m.Job.run_id == run_id)).all()
    return [x for x in metas if str(x["level"]) in levels and x["subject"].lower() == subject]


def test_csv_carries_every_figure(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    sim_run(url)
    out = cli("aggregate", "--agg", "all", "--csv", env=_env(url))
    assert out.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert len(rows) == 4 and {"coverage", "kv_before", "kv_after", "kv_peak", "nodes_per_s"} <= set(rows[0])
    assert one_error_line(cli("aggregate", "--csv", "--json", env=_env(url))).endswith(
        "choose one of --json and --csv"
    )
    table = cli("aggregate", env=_env(url)).stdout
    assert "kv_before" in table and "cover" in table and "…" not in table


def test_a_run_in_progress_counts_its_done_problems_and_says_so(db_url: str) -> None:
    run_id = sim_run(db_url, limit=3, finish=2)
    result = cli("aggregate", "--json", env=_env(db_url))
    [row] = json.loads(result.stdout)
    assert (row["run_id"], row["n_problems"], row["n_total"], row["partial"]) == (run_id, 2, 3, True)
    assert (
        f"run {run_id}: 2 of 3 problems done (0 failed); its figures cover the done problems only"
        in result.stderr
    )
    with Store.open(db_url).session() as s:
        cancel_run(s, run_id)  # nothing left to wait for: no longer partial
    [row] = cli_json("aggregate", env=_env(db_url))
    assert (row["n_problems"], row["n_total"], row["partial"]) == (2, 3, False)


def test_compare_pairs_the_problems_both_runs_finished(db_url: str) -> None:
    env = _env(db_url)
    base = sim_run(db_url, "rebase", limit=3)
    other = sim_run(db_url, "beam", limit=4, finish=3)
    result = cli_json("compare", str(base), str(other), "--agg", "min", "--vote", "majority", env=env)
    assert result["n_common"] == 3 and (result["agg"], result["vote"]) == ("min", "majority")
    assert result["bootstrap"]["resamples"] == RESAMPLES == 10_000
    rows = {r["run_id"]: r for r in cli_json("aggregate", "--agg", "min", "--vote", "majority", env=env)}
    assert result["accuracy_diff"] == pytest.approx(rows[other]["accuracy"] - rows[base]["accuracy"])
    for name in ("kv_before", "kv_after", "tokens", "seconds"):
        assert result["ratios"][name] == pytest.approx(rows[other][name] / rows[base][name]), name
    low, high = result["accuracy_diff_ci95"]
    assert low <= result["accuracy_diff"] <= high
    text = cli("compare", str(base), str(other), env=env).stdout
    assert "paired bootstrap, 10000 resamples" in text and "kv_before" in text
    itself = cli_json("compare", str(base), str(base), env=env)
    assert itself["accuracy_diff_ci95"] == [0.0, 0.0] and set(itself["ratios"].values()) <= {1.0, None}


def test_compare_refuses_runs_without_common_problems(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    a = sim_run(url, dataset="gsm8k", limit=1)
    b = sim_run(url, dataset="math500", limit=1)
    assert "have no finished problem in common" in one_error_line(
        cli("compare", str(a), str(b), env=_env(url))
    )
    assert "no run with id 99" in one_error_line(cli("compare", str(a), "99", env=_env(url)))


def test_paired_bootstrap() -> None:
    assert paired_bootstrap([1.0] * 20) == (1.0, 1.0)
    low, high = paired_bootstrap([1.0, 0.0] * 50)
    assert 0.38 < low < 0.45 and 0.55 < high < 0.62
    assert paired_bootstrap([1.0, 0.0] * 50) == (low, high)  # a fixed seed: the same interval


def test_report_writes_a_page_and_its_plots(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    env = _env(url)
    runs = [sim_run(url, "rebase", width=w, limit=2) for w in (2, 4)] + [
        sim_run(url, "ets", limit=2, finish=1)
    ]
    out = tmp_path / "report"
    files = cli_json("report", "--out", str(out), env=env)["files"]
    names = sorted(Path(f).name for f in files)
    # the study first (ets W=4 against rebase W=4), then W=4's depths, then each run not in a pair
    pngs = ["ratio_vs_width", "accuracy_vs_width", "accuracy_vs_kv", "width_4", f"ets_run{runs[2]}",
            f"time_run{runs[0]}"]  # fmt: skip
    assert names == sorted(["index.html", *(f"{p}.png" for p in pngs), *(f"{p}.csv" for p in pngs)])
    page = (out / "index.html").read_text()
    for name in (n for n in names if n.endswith(".png")):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'src="{name}"' in page
    assert f"run {runs[2]}: 1 of 2 problems done" in page  # the ETS run is still in progress
    assert "http" not in page.replace("http-equiv", "")  # nothing loaded from elsewhere


def test_report_and_tree_refuse_unknown_runs_and_problems(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    env = _env(url)
    run_id = sim_run(url, limit=2)
    assert "no run with id 9" in one_error_line(cli("report", "9", "--out", str(tmp_path / "r"), env=env))
    assert not (tmp_path / "r").exists()
    line = one_error_line(
        cli("tree", str(run_id), "--problem", "gsm8k-7", "--out", str(tmp_path / "t.html"), env=env)
    )
    assert "has no problem 'gsm8k-7'; its problems include gsm8k-0, gsm8k-1" in line
    assert not list(tmp_path.glob("t.html*"))


def test_tree_writes_one_page_with_the_whole_tree(db_url: str, tmp_path: Path) -> None:
    run_id = sim_run(db_url, limit=1)
    target = tmp_path / "tree.html"
    assert (
        cli("tree", str(run_id), "--problem", "gsm8k-0", "--out", str(target), env=_env(db_url)).exit_code
        == 0
    )
    page = target.read_text()
    with session_scope(db_url) as s:
        texts = s.scalars(select(m.Node.text).join(m.Job).where(m.Job.run_id == run_id)).all()
    assert page.count('"path":') == len(texts) and "<script src" not in page and "<link" not in page


def test_compare_and_report_on_tiny_model_runs(tmp_path: Path, tiny_model: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    settings = Settings.from_env().with_(database_url=url)
    runs = []
    for method in ("rebase", "beam"):
        run_id, jobs = store_run(url, tiny_model, tiny_config(method, width=3), limit=2)
        for job_id in jobs:
            assert run_job(job_id, settings) == "done"
        runs.append(run_id)
    result = cli_json("compare", *map(str, runs), env=_env(url))
    assert result["n_common"] == 2 and result["ratios"]["tokens"] is not None
    files = cli_json("report", *map(str, runs), "--out", str(tmp_path / "rep"), env=_env(url))["files"]
    # index.html; ratios, accuracy vs width and vs KV, W=3 (beam against rebase): each PNG with its CSV
    assert len(files) == 9 and all(Path(f).stat().st_size > 0 for f in files)


def test_failed_problems_are_counted_not_graded(tmp_path: Path) -> None:
    from etsq.store.jobs import fail_job

    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_id = sim_run(url, limit=3, finish=2)
    [job_id] = queued_ids(Store.open(url), run_id)
    with Store.open(url).session() as s:
        fail_job(s, job_id, "ModelError: no label tokens")
    result = cli("aggregate", "--json", env=_env(url))
    [row] = json.loads(result.stdout)
    assert (row["n_problems"], row["n_failed"], row["n_total"], row["partial"]) == (2, 1, 3, False)
    assert result.stderr == ""
