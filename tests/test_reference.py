"""The reference implementation's format: a hand-written file imports as a run, grades to the
hand-computed accuracy, exports back byte for byte, and a bad file is refused at its fault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from etsq.results.reference import split_steps
from etsq.store import schema as m
from etsq.store.session import session_scope
from tests.conftest import DATA_DIR
from tests.helpers import cli, cli_json, one_error_line

DATA = Path(__file__).parent / "data"
FILE = DATA / "reference_small.json"
STATS = DATA / "reference_small_stats.log"

# tests/data/reference_small.json, by hand (gold 72, 1/2 and 5; ids 0, 1, 7):
#  [0] 72 (.9 .8 .4), 96 (.7 .95), 72.0 (.9 .8 .5)   -> the two 72s share their first two steps
#      last: bon 96, majority 72, weighted 96 (.9 < .95)   mean: bon 96 (.825), majority 72, weighted 72
#      prod: bon 96 (.665), majority 72, weighted 96 (.648)   min: bon 96, majority 72, weighted 72 (.9 > .7)
#  [1] 0.5 (.8 .6), 1/2 (.5 .9), 2 (.3 .99), no answer (1 1)
#      last: bon 2 (.99); every other combination 1/2
#  [2] 6 (.4 .5), no answer (.9): every combination wrong, no leaf right
ACCURACY = {
    ("last", "bon"): 0, ("last", "majority"): 2, ("last", "weighted"): 1,
    ("mean", "bon"): 1, ("mean", "majority"): 2, ("mean", "weighted"): 2,
    ("prod", "bon"): 1, ("prod", "majority"): 2, ("prod", "weighted"): 1,
    ("min", "bon"): 1, ("min", "majority"): 2, ("min", "weighted"): 2,
}  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    return {"ETSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'ref.db'}"}


def _import(env: dict[str, str], *extra: str, file: Path = FILE) -> int:
    args = ["import", str(file), "--dataset", "handmade", "--method", "ets", "--width", "4", *extra]
    return int(cli_json(*args, env=env)["run_id"])


def test_a_reference_file_imports_and_grades_to_the_hand_computed_accuracy(db_url: str) -> None:
    env = {"ETSQ_DATABASE_URL": db_url}
    run_id = _import(env, "--stats", str(STATS))
    rows = cli_json("aggregate", str(run_id), "--agg", "all", "--vote", "all", env=env)
    assert {(r["agg"], r["vote"]): r["n_correct"] for r in rows} == ACCURACY
    row = rows[0]
    assert (row["n_problems"], row["coverage"], row["method"], row["width"]) == (
        3,
        pytest.approx(2 / 3),
        "ets",
        4,
    )
    # stats.log's totals over the file's 3 problems; tokens from each problem's total_tokens
    assert row["kv_before"] == 300 and row["policy_calls"] == 10 and row["seconds"] == pytest.approx(12.5 / 3)
    assert row["tokens"] == pytest.approx((61 + 40 + 12) / 3)
    assert row["kv_after"] is None and row["nodes_per_s"] is None


def test_export_gives_back_the_same_file(db_url: str, tmp_path: Path) -> None:
    env = {"ETSQ_DATABASE_URL": db_url}
    run_id = _import(env)
    out = tmp_path / "back.json"
    assert cli("export", str(run_id), "--format", "reference", "-o", str(out), env=env).exit_code == 0
    assert out.read_bytes() == FILE.read_bytes()
    printed = cli("export", str(run_id), "--format", "reference", env=env).stdout
    assert json.loads(printed) == json.loads(FILE.read_text())


def test_answers_sharing_steps_share_nodes(tmp_path: Path) -> None:
    env = _env(tmp_path)
    run_id = _import(env)
    with session_scope(env["ETSQ_DATABASE_URL"]) as s:
        job = s.scalars(select(m.Job).where(m.Job.run_id == run_id).order_by(m.Job.id)).first()
        assert job is not None
        nodes = s.scalars(select(m.Node).where(m.Node.job_id == job.id).order_by(m.Node.id)).all()
        # root, the 72s' two shared steps, 96's first step, then the three leaves in file order
        assert len(nodes) == 7
        leaves = [n for n in nodes if n.terminal]
        assert [n.answer for n in leaves] == ["72", "96", "72.0"]
        assert leaves[0].parent_id == leaves[2].parent_id
        assert nodes[0].text.endswith("April and May?\n") and nodes[0].parent_id is None


def test_importing_the_same_file_again_finds_its_run(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = _import(env)
    again = cli("import", str(FILE), "--dataset", "handmade", "--method", "ets", "--width", "4", env=env)
    assert again.exit_code == 0 and int(again.stdout) == first
    assert "holds this file already" in again.stderr
    assert _import(env, "--stats", str(STATS)) != first  # other figures: another run


def test_steps_are_cut_at_delimiters_and_join_back() -> None:
    assert split_steps("a ки b ки c", 3) == ["a ки", " b ки", " c"]
    assert split_steps("one\n\ntwo\n\nthree", 2) == ["one\n\ntwo\n\n", "three"]
    assert split_steps("only", 3) == ["", "", "only"]


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _good() -> list[dict[str, Any]]:
    return list(json.loads(FILE.read_text()))


def _edit(change: Any) -> list[dict[str, Any]]:
    data = _good()
    change(data)
    return data


BAD_FILES = [
    ("[{", "line 1 column 3: invalid JSON"),
    ({"id": 0}, "expected a JSON list of problems, got an object"),
    ([], "the list of problems is empty"),
    (_edit(lambda d: d[1].pop("question")), "[1]: missing key 'question'"),
    (_edit(lambda d: d[2].update(id="7")), "[2].id: expected an integer, got a string"),
    (_edit(lambda d: d[2].update(id=0)), "[2].id: duplicate id 0 (also at [0])"),
    (_edit(lambda d: d[1]["model_answer"][1].update(step_scores="high")),
     "[1].model_answer[1].step_scores: expected a list of numbers"),
    (_edit(lambda d: d[1]["model_answer"][1].update(step_scores=[0.5, True])),
     "[1].model_answer[1].step_scores: expected a list of numbers"),
    (_edit(lambda d: d[0]["model_answer"][2].pop("text")), "[0].model_answer[2]: missing key 'text'"),
    (_edit(lambda d: d[0].update(model_answer={})), "[0].model_answer: expected a list, got an object"),
    (_edit(lambda d: d[0].update(total_tokens=-1)), "[0].total_tokens: expected a count >= 0, got -1"),
    (_edit(lambda d: d[0].update(ground_truth_answer=72)), "[0].ground_truth_answer: expected a string"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "fault"), BAD_FILES)
def test_a_bad_file_is_refused_at_its_fault_and_nothing_is_written(
    tmp_path: Path, data: Any, fault: str
) -> None:
    path = _write(tmp_path, data)
    line = one_error_line(
        cli("import", str(path), "--dataset", "x", "--method", "ets", "--width", "4", env=_env(tmp_path))
    )
    assert line == f"etsq: error: {path}: {fault}" or line.startswith(f"etsq: error: {path}: {fault}")
    assert not (tmp_path / "ref.db").exists()


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("Total KV cache size: 9\nNumber of Model Calls: 3\nTime: 1\n", "missing the line 'Number of"),
        ("Total KV cache size: lots\n", "line 1: Total KV cache size: expected an integer, got 'lots'"),
        ("Total tokens: 5\n", "line 1: expected one of"),
    ],
)  # fmt: skip
def test_a_bad_stats_log_is_refused(tmp_path: Path, text: str, fault: str) -> None:
    stats = tmp_path / "stats.log"
    stats.write_text(text)
    line = one_error_line(
        cli("import", str(FILE), "--dataset", "x", "--method", "ets", "--width", "4", "--stats", str(stats),
            env=_env(tmp_path))
    )  # fmt: skip
    assert f"{stats}: {fault}" in line
    assert not (tmp_path / "ref.db").exists()


def test_a_clash_with_stored_problems_writes_nothing(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _import(env)
    other = _edit(lambda d: d[2].update(question="How many sides does a hexagon have?"))
    line = one_error_line(
        cli("import", str(_write(tmp_path, other)), "--dataset", "handmade", "--method", "rebase",
            "--width", "4", env=env)
    )  # fmt: skip
    assert "handmade/7 is stored with another question or answer" in line
    with session_scope(env["ETSQ_DATABASE_URL"]) as s:
        assert s.scalar(select(func.count()).select_from(m.Run)) == 1
        assert s.scalar(select(func.count()).select_from(m.Problem)) == 3


def test_a_built_in_dataset_label_shares_problems_with_etsq_runs(tmp_path: Path) -> None:
    """Reference answers to GSM8K's first problems land on the rows etsq's own runs use."""
    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k_test.jsonl").read_text().splitlines()[:2]]
    data = [
        {"id": i, "question": r["question"], "model_answer": [{"text": r["question"] + "\nThe answer is 3.",
         "step_scores": [0.5]}], "ground_truth_answer": r["answer"], "total_tokens": 9}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    env = _env(tmp_path)
    run_id = int(cli_json("import", str(_write(tmp_path, data)), "--dataset", "gsm8k", "--method", "rebase",
                          "--width", "1", env=env)["run_id"])  # fmt: skip
    with session_scope(env["ETSQ_DATABASE_URL"]) as s:
        keys = s.scalars(select(m.Problem.problem_id).order_by(m.Problem.id)).all()
        answers = s.scalars(select(m.Problem.answer).order_by(m.Problem.id)).all()
    assert keys == ["gsm8k-0", "gsm8k-1"] and answers == ["18", "3"]
    [row] = cli_json("aggregate", str(run_id), env=env)
    assert (row["n_problems"], row["n_correct"]) == (2, 1)
    out = tmp_path / "back.json"
    cli("export", str(run_id), "--format", "reference", "-o", str(out), env=env)
    assert json.loads(out.read_text()) == data


def test_an_etsq_run_exports_and_imports_back_to_the_same_grades(tmp_path: Path) -> None:
    from tests.test_results import sim_run

    env = _env(tmp_path)
    run_id = sim_run(env["ETSQ_DATABASE_URL"], "rebase", width=6, limit=3)
    out = tmp_path / "answers.json"
    assert cli("export", str(run_id), "--format", "reference", "-o", str(out), env=env).exit_code == 0
    exported = json.loads(out.read_text())
    assert [e["id"] for e in exported] == [0, 1, 2]
    with session_scope(env["ETSQ_DATABASE_URL"]) as s:
        leaves = s.scalar(select(func.count()).select_from(m.Node).join(m.Job).where(
            m.Job.run_id == run_id, m.Node.terminal.is_(True)))  # fmt: skip
    assert sum(len(e["model_answer"]) for e in exported) == leaves
    assert all(a["text"].startswith("Question: ") for e in exported for a in e["model_answer"])
    back = int(cli_json("import", str(out), "--dataset", "gsm8k", "--method", "rebase", "--width", "6",
                        env=env)["run_id"])  # fmt: skip
    original = cli_json("aggregate", str(run_id), "--agg", "all", "--vote", "all", env=env)
    reimported = cli_json("aggregate", str(back), "--agg", "all", "--vote", "all", env=env)
    assert [(r["n_correct"], r["coverage"]) for r in reimported] == [
        (r["n_correct"], r["coverage"]) for r in original
    ]
    assert reimported[0]["tokens"] == original[0]["tokens"]


def test_binary_files_are_refused(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\xff\xfe\x00\x81")
    for args in (["import", str(blob)], ["import", str(FILE), "--stats", str(blob)]):
        line = one_error_line(
            cli(*args, "--dataset", "x", "--method", "ets", "--width", "4", env=_env(tmp_path))
        )
        assert f"{blob}: not UTF-8 text" in line
    assert not (tmp_path / "ref.db").exists()


def test_an_import_on_a_problems_file_pairs_with_a_run_submitted_on_it(tmp_path: Path) -> None:
    """Reference answers to a custom .jsonl map to that file's rows, as a submitted run stores them, so
    `compare` finds the problems both finished; a question that is not its row's is refused."""
    from tests.test_results import sim_run

    problems = tmp_path / "mine.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = _env(tmp_path)
    submitted = sim_run(env["ETSQ_DATABASE_URL"], "rebase", width=2, limit=3, dataset=str(problems))
    answer = [{"text": "So {n}.\n\nThe answer is {n}.", "step_scores": [0.5, 0.9]}]
    data = [
        {"id": i, "question": r["question"], "ground_truth_answer": r["answer"], "total_tokens": 9,
         "model_answer": [{**answer[0], "text": answer[0]["text"].format(n=i + 1)}]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    options = ["--dataset", str(problems), "--method", "ets", "--width", "2"]
    imported = int(cli_json("import", str(_write(tmp_path, data)), *options, env=env)["run_id"])
    compared = cli_json("compare", str(submitted), str(imported), env=env)
    assert compared["n_common"] == 3
    [row] = cli_json("aggregate", str(imported), env=env)
    assert (row["n_problems"], row["n_correct"]) == (3, 3)
    data[1]["question"] = "What is 7 + 7?"
    line = one_error_line(cli("import", str(_write(tmp_path, data)), *options, env=env))
    assert "[1] (id 1)" in line and "mine" in line
