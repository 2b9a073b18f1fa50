"""Tests for etsq.datasets: the shipped benchmark files, overrides, generic files, content hashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from etsq.datasets import SHIPPED_HASHES, Problem, content_hash, dataset_name, load_dataset
from etsq.errors import DatasetError

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
GSM8K_ROW = {
    "question": "Janet has 3 ducks. How many?",
    "answer": "She has <<3=3>>3 ducks.\n#### 1,003",
}


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_shipped_math500_loads_without_a_data_dir() -> None:
    problems = load_dataset("math500", None)
    assert len(problems) == 500
    assert problems.path.parent == REPO / "etsq" / "data"
    first = problems[0]
    assert first.question.startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta["subject"] == "Precalculus" and first.meta["level"] == 2
    assert len({p.problem_id for p in problems}) == 500
    assert (problems.name, problems.source, problems.namespace) == ("math500", "math500", "math500")


def test_shipped_gsm8k_loads_in_any_case() -> None:
    problems = load_dataset("GSM8K", None)
    assert len(problems) == 1319
    first = problems[0]
    assert first.problem_id == "gsm8k-0"
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.answer == "18"
    assert first.meta["solution"].endswith("#### 18")
    assert all("," not in p.answer and p.answer for p in problems)
    assert problems.content_hash == load_dataset("gsm8k", None).content_hash


def test_shipped_files_are_the_shared_benchmark_files_and_their_hashes_are_recorded() -> None:
    for name, filename in (("gsm8k", "gsm8k_test.jsonl"), ("math500", "math500.jsonl")):
        shipped = load_dataset(name, None)
        assert (REPO / "etsq" / "data" / filename).read_bytes() == (SHARED_DATA / filename).read_bytes()
        assert shipped.content_hash == SHIPPED_HASHES[name]
        # ETSQ_DATA_DIR holding the same content: the same problems, stored under the plain name.
        from_dir = load_dataset(name, SHARED_DATA)
        assert from_dir.path == SHARED_DATA / filename
        assert (from_dir.content_hash, from_dir.namespace) == (shipped.content_hash, name)
    notice = (REPO / "etsq" / "data" / "NOTICE").read_text()
    assert "MIT License" in notice and "openai/grade-school-math" in notice and "openai/prm800k" in notice


def test_a_built_wheel_ships_the_data(tmp_path: Path) -> None:
    """What `pip install etsq` installs: the package data, not only the repository checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    src = tmp_path / "src"
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, env={**os.environ, "PIP_NO_INDEX": "1"})
    [wheel] = (src / "dist").glob("etsq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"etsq/data/gsm8k_test.jsonl", "etsq/data/math500.jsonl", "etsq/data/NOTICE"} <= names


def test_data_dir_overrides_the_shipped_copy_and_changed_content_gets_its_own_namespace(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_jsonl(data_dir / "gsm8k_test.jsonl", [json.dumps(GSM8K_ROW)])
    problems = load_dataset("gsm8k", data_dir)
    assert [(p.problem_id, p.answer) for p in problems] == [("gsm8k-0", "1003")]
    assert problems.namespace == f"gsm8k@{problems.content_hash[:12]}"
    # A data dir without the file falls back to the shipped copy.
    assert len(load_dataset("math500", data_dir)) == 500
    with pytest.raises(DatasetError, match=r"ETSQ_DATA_DIR=.*not a directory"):
        load_dataset("gsm8k", tmp_path / "nowhere")


def test_generic_jsonl_with_ids_and_question_field(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"problem": "1+1?", "answer": "2", "id": 7, "source": "hand"}),
            "",
            json.dumps({"question": "2+2?", "answer": "4", "unique_id": "u-4"}),
            json.dumps({"question": "3+3?", "answer": "6"}),
        ],
    )
    problems = load_dataset(str(path), None)
    assert dataset_name(str(path)) == "mine"
    assert list(problems) == [
        Problem("7", "1+1?", "2", {"id": 7, "source": "hand"}),
        Problem("u-4", "2+2?", "4", {"unique_id": "u-4"}),
        Problem("mine-3", "3+3?", "6", {}),
    ]
    assert (problems.name, problems.source) == ("mine", str(path.resolve()))


def test_content_hash_follows_the_data_not_the_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [json.dumps({"question": f"{i}+1?", "answer": str(i + 1), "id": i}) for i in range(3)]
    path = _write_jsonl(tmp_path / "x.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    relative, absolute = load_dataset("./x.jsonl", None), load_dataset(str(path), None)
    assert relative.content_hash == absolute.content_hash and relative.source == absolute.source
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copy(path, copy / "x.jsonl")
    assert load_dataset(str(copy / "x.jsonl"), None).content_hash == absolute.content_hash
    _write_jsonl(path, [*rows[:2], json.dumps({"question": "2+1?", "answer": "4", "id": 2})])
    changed = load_dataset(str(path), None)
    assert changed.content_hash != absolute.content_hash and changed.namespace != absolute.namespace
    assert absolute.head(2).content_hash == changed.head(2).content_hash  # the first two rows agree
    assert content_hash([]) != content_hash(absolute.head(1))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"problem": "x", "answer": ', "invalid JSON"),
        ('["problem", "answer"]', "expected a JSON object"),
        ('{"answer": "1"}', "missing field 'problem'"),
        ('{"problem": "x"}', "missing field 'answer'"),
        ('{"problem": "x", "answer": 3}', "'answer' must be a string"),
        ('{"problem": "x", "answer": " "}', "'answer' is empty"),
        ('{"problem": "x", "answer": "1", "id": null}', "'id' must be"),
        ('{"problem": "x", "answer": "1", "id": "a"}', "duplicate problem id 'a'"),
        ('{"problem": "x\\u0000", "answer": "1"}', "NUL"),
        ('{"problem": "x", "answer": "1", "id": "' + "i" * 151 + '"}', "longer than 150"),
        ("[" * 100_000, "invalid JSON"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    good = json.dumps({"problem": "ok", "answer": "1", "id": "a"})
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DatasetError) as info:
        load_dataset(str(path), None)
    assert str(info.value).startswith(f"{path}:2: ")
    assert reason in str(info.value)


def test_gsm8k_row_without_marker_names_file_and_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [json.dumps(GSM8K_ROW), json.dumps({"question": "q", "answer": "no marker"})]
    _write_jsonl(data_dir / "gsm8k_test.jsonl", rows)
    with pytest.raises(DatasetError, match=r"gsm8k_test\.jsonl:2: .*####"):
        load_dataset("gsm8k", data_dir)


def test_unknown_name_missing_file_directory_empty_file_and_bad_bytes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="known: arith, gsm8k, math500"):
        load_dataset("aime", None)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "absent.jsonl"), None)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DatasetError, match="is not a file"):
        load_dataset(str(tmp_path / "dir.jsonl"), None)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="has no rows"):
        load_dataset(str(tmp_path / "empty.jsonl"), None)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset(str(tmp_path / "latin1.jsonl"), None)
