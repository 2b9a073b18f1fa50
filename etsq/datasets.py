"""Datasets: benchmark problems (question + ground-truth answer) loaded from JSON-lines files.

Built-in names: `math500` (the MATH test split of PRM800K) and `gsm8k` (GSM8K test). Their file
is looked up in the data directory, then in the cache directory, and only then downloaded from
its public source into the cache. Any existing `*.jsonl` path is loaded as a generic dataset.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etsq.errors import DatasetError
from etsq.grading import gold_answer

# Public sources of the built-in datasets; a module-level dict so tests and mirrors can redirect.
_GITHUB = "https://raw.githubusercontent.com/openai"
DOWNLOAD_URLS: dict[str, str] = {
    "math500": f"{_GITHUB}/prm800k/main/prm800k/math_splits/test.jsonl",
    "gsm8k": f"{_GITHUB}/grade-school-math/master/grade_school_math/data/test.jsonl",
}
FILENAMES: dict[str, str] = {"math500": "math500.jsonl", "gsm8k": "gsm8k_test.jsonl"}
DOWNLOAD_TIMEOUT_S = 30.0

_QUESTION_FIELDS = ("problem", "question")
_ID_FIELDS = ("unique_id", "id")


@dataclass(frozen=True)
class Problem:
    """One dataset row: a question and its ground-truth answer; `meta` keeps the other fields."""

    problem_id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def dataset_name(name_or_path: str) -> str:
    """The name a dataset is recorded under: the built-in name, or a file's stem."""
    if name_or_path.lower() in FILENAMES:
        return name_or_path.lower()
    return Path(name_or_path).stem


def load_dataset(name_or_path: str, data_dir: Path | None, cache_dir: Path) -> list[Problem]:
    """All problems of a built-in dataset (`math500`, `gsm8k`) or of an existing `.jsonl` file."""
    name = dataset_name(name_or_path)
    if name_or_path.lower() in FILENAMES:
        return _load_builtin(name, data_dir, cache_dir)
    if name_or_path.endswith(".jsonl"):
        path = Path(name_or_path)
        if not path.is_file():
            raise DatasetError(f"dataset file {path} does not exist")
        return _load_file(path, name)
    known = ", ".join(sorted(FILENAMES))
    raise DatasetError(f"unknown dataset {name_or_path!r}; known: {known}, or a .jsonl path")


def _load_builtin(name: str, data_dir: Path | None, cache_dir: Path) -> list[Problem]:
    filename = FILENAMES[name]
    for directory in (data_dir, cache_dir):
        if directory is not None and (directory / filename).is_file():
            return _load_file(directory / filename, name)
    return _download_and_load(name, cache_dir / filename)


# --------------------------------------------------------------------------- download


def _download_and_load(name: str, dest: Path) -> list[Problem]:
    """Download `name` into `dest` atomically, keeping it only if every row is well formed."""
    url = DOWNLOAD_URLS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_fetch(name, url, dest))
        problems = _load_downloaded(tmp, name, url)
        os.replace(tmp, dest)  # atomic: concurrent loaders see no file or a whole one
    finally:
        tmp.unlink(missing_ok=True)
    return problems


def _load_downloaded(tmp: Path, name: str, url: str) -> list[Problem]:
    try:
        return _load_file(tmp, name)
    except DatasetError as exc:
        raise DatasetError(
            f"dataset {name} downloaded from {url} is malformed ({exc}); place "
            f"{FILENAMES[name]} in a directory and point ETSQ_DATA_DIR at it"
        ) from None


def _fetch(name: str, url: str, dest: Path) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return bytes(response.read())
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts are OSErrors
        reason = " ".join(str(exc).split())
        raise DatasetError(
            f"cannot download dataset {name} from {url} ({reason}); place {dest.name} in a "
            f"directory and point ETSQ_DATA_DIR at it"
        ) from exc


# --------------------------------------------------------------------------- parsing


def _load_file(path: Path, name: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for lineno, row in _rows(path):
        try:
            problem = _to_problem(row, name, lineno - 1)
        except DatasetError as exc:
            raise DatasetError(f"{path}:{lineno}: {exc}") from None
        if problem.problem_id in seen:
            raise DatasetError(f"{path}:{lineno}: duplicate problem id {problem.problem_id!r}")
        seen.add(problem.problem_id)
        problems.append(problem)
    return problems


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, JSON object) for every non-blank line of `path`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _to_problem(row: dict[str, Any], name: str, index: int) -> Problem:
    question_key = next((key for key in _QUESTION_FIELDS if key in row), None)
    if question_key is None:
        raise DatasetError("missing field 'problem' (or 'question')")
    question = _text_field(row, question_key)
    raw_answer = _text_field(row, "answer")
    answer = gold_answer(raw_answer, name)
    meta = {key: value for key, value in row.items() if key not in (question_key, "answer")}
    if answer != raw_answer.strip():
        meta["solution"] = raw_answer  # GSM8K-style field: the worked solution is worth keeping
    return Problem(_problem_id(row, name, index), question, answer, meta)


def _text_field(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise DatasetError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"field {key!r} is empty")
    return value


def _problem_id(row: dict[str, Any], name: str, index: int) -> str:
    if name in FILENAMES:
        # Built-in datasets: positional ids, because the shared copy of MATH500 lacks the
        # `unique_id` the downloaded one has, and a problem must keep one id wherever it came from.
        return f"{name}-{index}"
    for key in _ID_FIELDS:
        if key in row:
            value = row[key]
            # Integer ids are common in hand-made files; bools are ints but never ids.
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
                raise DatasetError(f"field {key!r} must be a non-empty string or integer")
            return str(value)
    return f"{name}-{index}"
