"""A run is what its method reads (the registry's `params`), and every view labels it by what sets it
apart from the defaults (`etsq.store.labels`)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from etsq.models.config import ModelConfig
from etsq.queue.execute import run_job
from etsq.search.config import SearchConfig
from etsq.search.methods import METHODS, SEARCH_PARAMS, SHARED_PARAMS, ignored_params, stored_search
from etsq.settings import Settings
from etsq.store.labels import run_label, shown_label, sim_note, without_width
from etsq.store.runs import RunSpec, config_hash, create_run, load_problems
from etsq.store.session import Store
from etsq.sweep import sweep_grid
from tests.helpers import cli, cli_json, queued_ids


def test_every_method_reads_known_fields_beyond_the_shared_ones() -> None:
    names = {f.name for f in fields(SearchConfig)}
    for name, method in METHODS.items():
        assert set(method.params) <= names - set(SHARED_PARAMS), name
        assert set(SHARED_PARAMS) <= set(stored_search(SearchConfig(method=name)))
    assert set(SEARCH_PARAMS) == names - {"extra"}


@pytest.mark.parametrize(
    ("method", "own"),
    [
        ("rebase", {"softmax_temp"}),
        ("ets", {"softmax_temp", "lambda_b", "lambda_s", "cost", "cluster_threshold"}),
        ("beam", {"beam_k"}),
        ("dvts", {"dvts_subtrees"}),
        ("bon", set()),
    ],
)
def test_a_run_stores_its_methods_parameters_and_the_shared_ones(method: str, own: set[str]) -> None:
    assert set(stored_search(SearchConfig(method=method))) == set(SHARED_PARAMS) | own
    spec = RunSpec("gsm8k", SearchConfig(method=method), ModelConfig.create("local", embedding="e"))
    assert ("embedding" in spec.settings()["models"]) == (method == "ets")


def test_a_parameter_the_method_ignores_does_not_change_its_identity(tmp_path: Path) -> None:
    settings = Settings.from_env()
    base = RunSpec("gsm8k", SearchConfig(method="rebase", width=4), ModelConfig.create("sim"), limit=2)
    data = load_problems(settings, base)

    def identity(method: str, **changes: object) -> str:
        search = SearchConfig(method=method, width=4, **changes)  # type: ignore[arg-type]
        return config_hash(RunSpec("gsm8k", search, ModelConfig.create("sim"), limit=2).config(data))

    assert identity("rebase", lambda_b=2.0, beam_k=3, cost="tokens") == identity("rebase")
    assert identity("rebase", softmax_temp=0.5) != identity("rebase")
    assert identity("ets", lambda_b=2.0) != identity("ets")
    assert identity("bon", softmax_temp=0.5, dvts_subtrees=2) == identity("bon")
    assert ignored_params("rebase", ["lambda_b", "softmax_temp", "width", "embedding"]) == [
        "lambda_b",
        "embedding",
    ]
    assert ignored_params("ets", ["lambda_b", "embedding"]) == []


def _config(method: str, backend: str = "local", **search: object) -> dict[str, object]:
    spec = RunSpec("gsm8k", SearchConfig(method=method, **search), ModelConfig.create(backend))  # type: ignore[arg-type]
    return spec.settings()


def test_labels_name_what_differs_from_the_defaults() -> None:
    assert run_label(_config("ets", width=16)) == "ets W=16"
    assert run_label(_config("ets", "sim", width=16, lambda_b=2.0)) == "ets W=16 λb=2 · sim"
    assert run_label(_config("rebase", width=4, lambda_b=2.0)) == "rebase W=4"  # rebase never reads it
    assert run_label(_config("rebase", width=4, softmax_temp=0.5, seed=3)) == "rebase W=4 T=0.5 seed=3"
    assert run_label(_config("beam", width=8, beam_k=2)) == "beam W=8 k=2"
    assert run_label(_config("dvts", width=8, dvts_subtrees=2)) == "dvts W=8 subtrees=2"
    ets = _config("ets", width=64, lambda_s=1.2, cost="tokens", cluster_threshold=0.1)
    assert run_label(ets) == "ets W=64 λs=1.2 cost=tokens thr=0.1"
    models = ModelConfig.create("local", embedding="math-similarity/Bert-MLM_arXiv-MP-class_zbMath")
    spec = RunSpec("gsm8k", SearchConfig(method="ets", width=16), models)
    assert spec.label == "ets W=16 emb=Bert-MLM_arXiv-MP-class_zbMath"
    imported = {
        "source": "reference",
        "search": {"method": "ets", "width": 16},
        "models": {"backend": "reference"},
    }
    assert run_label(imported) == "ets W=16 · reference"
    assert without_width("ets W=16 λb=2 · sim", 16) == "ets λb=2 · sim"
    assert shown_label({"label": "rebase W=4", "duplicate_of": 3}) == "rebase W=4 (duplicate of run 3)"
    assert sim_note([{"run_id": 1, "backend": "local"}]) is None
    assert sim_note([{"run_id": 1, "backend": "sim"}, {"run_id": 1, "backend": "sim"}]) == (
        "all runs on the sim backend (synthetic models)"
    )
    assert sim_note([{"run_id": 1, "backend": "sim"}, {"run_id": 2, "backend": "local"}]) == (
        "1 of 2 runs on the sim backend (synthetic models)"
    )


def test_a_sweep_grid_collapses_points_whose_method_ignores_the_difference(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "datasets: [gsm8k]\nmethods: [ets, rebase]\nwidths: [4, 8, 16]\nparams: {lambda_b: [1.0, 2.0]}\n"
    )
    grid = sweep_grid(path)
    assert (grid.points, len(grid.specs)) == (12, 9)
    assert [s.label for s in grid.specs][:3] == ["ets W=4", "ets W=4 λb=2", "ets W=8"]


def test_the_sweep_help_example_wastes_no_run(tmp_path: Path) -> None:
    help_text = cli("sweep", "--help").stdout
    example = help_text[help_text.index("datasets:") : help_text.index("Then:")]
    path = tmp_path / "help.yaml"
    path.write_text("\n".join(line.strip() for line in example.splitlines()) + "\nmodels: {backend: sim}\n")
    grid = sweep_grid(path)
    assert grid.points == len(grid.specs) == 8
    env = {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}"}
    result = cli("sweep", str(path), "--dry-run", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert len({row["label"] for row in json.loads(result.stdout)}) == 8


def _sim_run(url: str, **search: object) -> int:
    spec = RunSpec(
        "gsm8k",
        SearchConfig(method="ets", width=4, **search),  # type: ignore[arg-type]
        ModelConfig.create("sim"),
        limit=1,
    )
    settings = Settings.from_env().with_(database_url=url)
    run_id, created = create_run(Store.open(url), spec, load_problems(settings, spec), ["etsq"])
    assert created
    for job_id in queued_ids(Store.open(url), run_id):
        assert run_job(job_id, settings) == "done"
    return run_id


def test_every_view_labels_two_runs_that_differ_only_in_lambda_b(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    env = {"ETSQ_DATABASE_URL": url}
    one, two = _sim_run(url), _sim_run(url, lambda_b=2.0)
    rows = cli_json("aggregate", env=env)
    assert {r["run_id"]: r["label"] for r in rows} == {one: "ets W=4 · sim", two: "ets W=4 λb=2 · sim"}
    assert all(r["backend"] == "sim" and r["duplicate_of"] is None for r in rows)
    csv_out = cli("aggregate", "--csv", env=env).stdout
    assert "label" in csv_out.splitlines()[0] and "ets W=4 λb=2 · sim" in csv_out
    table = cli("aggregate", env=env).stdout
    assert "ets W=4 λb=2 · sim" in table and "all runs on the sim backend" in table
    status = cli_json("status", env=env)
    assert [r["label"] for r in status] == ["ets W=4 · sim", "ets W=4 λb=2 · sim"]
    assert "all runs on the sim backend" in cli("status", env=env).stdout
    compared = cli_json("compare", str(one), str(two), env=env)
    assert (compared["base"]["label"], compared["other"]["label"]) == ("ets W=4 · sim", "ets W=4 λb=2 · sim")
    assert "OTHER run 2: ets W=4 λb=2 · sim gsm8k" in cli("compare", str(one), str(two), env=env).stdout
    out = tmp_path / "report"
    assert cli("report", "--out", str(out), env=env).exit_code == 0
    page = (out / "index.html").read_text()
    assert "<title>etsq report (all runs on the sim backend (synthetic models))</title>" in page
    assert "<td>ets W=4 λb=2 · sim</td>" in page
    assert "ETS pruning per depth, run 2 (ets W=4 λb=2 · sim, gsm8k)." in page
    tree = tmp_path / "t.html"
    assert cli("tree", str(two), "--problem", "gsm8k-0", "--out", str(tree), env=env).exit_code == 0
    assert "<title>run 2: ets W=4 λb=2 · sim, gsm8k / gsm8k-0 (sim backend: synthetic models)</title>" in (
        tree.read_text()
    )
