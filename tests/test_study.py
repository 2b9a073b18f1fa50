"""`etsq study`, compare's warnings, the problems list, tree by index, the reference round trip with
stats.log, and the README's notebook example, on one small sim sweep (ets and rebase at W = 4, 8, 16)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import cli, cli_json
from tests.test_results import sim_run

WIDTHS = (4, 8, 16)
PROBLEMS = 6


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[tuple[str, int], int]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('study') / 's.db'}"
    runs = {(m, w): sim_run(url, m, width=w, limit=PROBLEMS) for w in WIDTHS for m in ("ets", "rebase")}
    return url, runs


def _env(url: str) -> dict[str, str]:
    return {"ETSQ_DATABASE_URL": url}


def test_study_prints_one_row_per_width_with_intervals(sweep: tuple[str, dict[tuple[str, int], int]]) -> None:
    url, runs = sweep
    result = cli_json("study", "--resamples", "500", env=_env(url))
    rows = result["rows"]
    assert [r["width"] for r in rows] == list(WIDTHS)
    for row in rows:
        assert (row["base_run"], row["other_run"]) == (
            runs["rebase", row["width"]],
            runs["ets", row["width"]],
        )
        assert row["n_common"] == PROBLEMS and row["differs"] == "method rebase -> ets"
        for name in ("kv_before", "kv_after", "kv_peak", "tokens", "policy_calls", "prm_calls", "seconds"):
            low, mid, high = (row[f"{name}_ratio{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert low <= mid <= high, name
        assert row["accuracy_diff_ci_low"] <= row["accuracy_diff"] <= row["accuracy_diff_ci_high"]
        assert row["accuracy_diff"] == pytest.approx(row["accuracy_other"] - row["accuracy_base"])
    assert result["unpaired"] == []
    text = cli("study", "--resamples", "500", env=_env(url))
    assert text.exit_code == 0 and "ets against rebase" in text.stdout
    csv = cli("study", "--csv", "--agg", "all", "--resamples", "200", env=_env(url)).stdout.splitlines()
    assert len(csv) == 1 + 3 * 4 and "kv_before_ratio_ci_low" in csv[0]


def test_study_names_runs_it_cannot_pair(sweep: tuple[str, dict[tuple[str, int], int]]) -> None:
    url, runs = sweep
    wanted = [str(runs["ets", 4]), str(runs["rebase", 4]), str(runs["ets", 8])]
    result = cli("study", *wanted, "--json", "--resamples", "200", env=_env(url))
    assert len(json.loads(result.stdout)["rows"]) == 1
    assert (
        f"run {runs['ets', 8]} (ets W=8" in result.stderr and "no rebase run on gsm8k at W=8" in result.stderr
    )


def test_compare_warns_when_runs_differ_in_more_than_the_method(
    sweep: tuple[str, dict[tuple[str, int], int]],
) -> None:
    url, runs = sweep
    same = cli("compare", str(runs["rebase", 4]), str(runs["rebase", 4]), env=_env(url))
    assert "compared with itself" in same.stderr
    widths = cli("compare", str(runs["rebase", 4]), str(runs["rebase", 8]), env=_env(url))
    assert "differ in more than the method: width 4 -> 8" in widths.stderr
    paired = cli("compare", str(runs["rebase", 4]), str(runs["ets", 4]), env=_env(url))
    assert paired.exit_code == 0 and "warning" not in paired.stderr


def test_problems_lists_ids_and_tree_takes_an_index(
    sweep: tuple[str, dict[tuple[str, int], int]], tmp_path: Path
) -> None:
    url, runs = sweep
    listed = cli_json("problems", str(runs["ets", 4]), env=_env(url))
    assert [p["index"] for p in listed] == list(range(PROBLEMS)) and listed[0]["problem"] == "gsm8k-0"
    assert all(p["status"] == "done" and p["correct"] in (True, False) for p in listed)
    by_index, by_id = tmp_path / "a.html", tmp_path / "b.html"
    assert (
        cli("tree", str(runs["ets", 4]), "--problem", "2", "--out", str(by_index), env=_env(url)).exit_code
        == 0
    )
    cli("tree", str(runs["ets", 4]), "--problem", "gsm8k-2", "--out", str(by_id), env=_env(url))
    assert by_index.read_text() == by_id.read_text()


def test_a_reference_round_trip_keeps_kv_and_calls(
    sweep: tuple[str, dict[tuple[str, int], int]], tmp_path: Path
) -> None:
    url, runs = sweep
    out = tmp_path / "ref" / "answers.json"
    out.parent.mkdir()
    assert (
        cli(
            "export", str(runs["rebase", 8]), "--format", "reference", "-o", str(out), env=_env(url)
        ).exit_code
        == 0
    )
    stats = out.parent / "stats.log"
    assert stats.exists()
    target = f"sqlite:///{tmp_path / 'other.db'}"
    args = (
        "import",
        str(out),
        "--dataset",
        "gsm8k",
        "--method",
        "rebase",
        "--width",
        "8",
        "--stats",
        str(stats),
    )
    imported = cli_json(*args, env=_env(target))["run_id"]
    [before] = cli_json("aggregate", str(runs["rebase", 8]), env=_env(url))
    [after] = cli_json("aggregate", str(imported), env=_env(target))
    for name in ("kv_before", "policy_calls", "tokens", "seconds"):
        assert after[name] == pytest.approx(before[name]), name


def test_the_readme_notebook_example_runs(sweep: tuple[str, dict[tuple[str, int], int]]) -> None:
    url, runs = sweep
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### In a notebook") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    scope: dict[str, object] = {}
    exec(code.group(1).replace("sqlite:///etsq.db", url), scope)
    assert len(scope["runs"]) == len(runs)  # type: ignore[arg-type]
    assert len(scope["table"]) == len(runs) * 12  # type: ignore[arg-type]
    study = scope["study"]
    assert list(study.width) == list(WIDTHS) and "seconds_ratio_ci_high" in study.columns  # type: ignore[attr-defined]
    tree = scope["tree"]
    assert tree.number_of_nodes() > 1 and tree.number_of_edges() == tree.number_of_nodes() - 1  # type: ignore[attr-defined]
