"""Datasets: benchmark problems (question + ground-truth answer) loaded from JSON-lines files.

Built-in names: `math500` (the MATH test split of PRM800K), `gsm8k` (GSM8K test) and `arith` (the
testbed's synthetic arithmetic, etsq.testbed.arith), in any case.  All ship inside the package
(`etsq/data/`, sources and MIT licences in `etsq/data/NOTICE`); a file of the same name in
`ETSQ_DATA_DIR` is read instead.  Any existing `*.jsonl` path is loaded as a generic dataset.

A dataset is identified by its content: `content_hash` covers every problem's id, question and
answer, in order, so the same data under any spelling (`GSM8K`, `./x.jsonl`, its absolute path)
hashes the same and changed data hashes differently.  Problems are stored under a namespace
(`problems.dataset`): the built-in name for the shipped content, else `name@<hash prefix>`, so an
edited file never collides with the rows stored from its earlier version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, overload

from etsq.answers import gold_answer
from etsq.errors import DatasetError

FILENAMES: dict[str, str] = {
    "math500": "math500.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "arith": "arith_test.jsonl",  # the testbed's synthetic split (etsq.testbed.arith)
}
# content_hash of the shipped files (tests/test_datasets.py checks them): that content is stored
# under the plain built-in name, as every run before content hashes stored it.
SHIPPED_HASHES: dict[str, str] = {
    "gsm8k": "48cc54a36d1ae478bd113a61d1ba9256ef62b4eed119364e74251771899373e5",
    "math500": "8383219ce43d70a9e4e3d4cc6684ed50b1e2e1860c9ead7305c780bbb6764464",
    "arith": "684cdd693aed6eba56bce9fe1075d884debf196942eda26603f9f5dc5f3d0a75",
}
NAMESPACE_HASH_CHARS = 12
MAX_ID_CHARS = 150  # problems.problem_id holds 200; the file's stem goes into positional ids

_QUESTION_FIELDS = ("problem", "question")
_ID_FIELDS = ("unique_id", "id")


@dataclass(frozen=True)
class Problem:
    """One dataset row: a question and its ground-truth answer; `meta` keeps the other fields."""

    problem_id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def content_hash(problems: Iterable[Problem]) -> str:
    """SHA-256 over each problem's [id, question, answer] as one JSON line, in order.

    Migration 0005 computes the same hash from stored rows; keep the two in step.
    """
    digest = hashlib.sha256()
    for p in problems:
        line = json.dumps([p.problem_id, p.question, p.answer], ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Dataset:
    """Problems with where they came from: what a run searches (a sequence of `Problem`)."""

    name: str  # the built-in name, or a file's stem: what `etsq status` shows
    source: str  # canonical: the built-in name, or the file's resolved absolute path
    path: Path  # the file read
    namespace: str  # `problems.dataset` of its stored rows
    problems: tuple[Problem, ...]

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    @overload
    def __getitem__(self, index: int) -> Problem: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Problem, ...]: ...
    def __getitem__(self, index: int | slice) -> Problem | tuple[Problem, ...]:
        return self.problems[index]

    @cached_property
    def content_hash(self) -> str:
        return content_hash(self.problems)

    def head(self, limit: int | None) -> Dataset:
        """The first `limit` problems (all with None); the namespace stays the whole file's."""
        return self if limit is None else replace(self, problems=self.problems[:limit])


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.lower() in FILENAMES


def dataset_name(name_or_path: str) -> str:
    """The name a dataset is shown under: the built-in name, or a file's stem."""
    if is_builtin(name_or_path):
        return name_or_path.lower()
    return Path(name_or_path).stem


def load_dataset(name_or_path: str, data_dir: Path | None) -> Dataset:
    """All problems of a built-in dataset (`math500`, `gsm8k`) or of an existing `.jsonl` file."""
    if is_builtin(name_or_path):
        name = name_or_path.lower()
        return _dataset(name, name, builtin_path(name, data_dir))
    if not name_or_path.endswith(".jsonl"):
        known = ", ".join(sorted(FILENAMES))
        raise DatasetError(f"unknown dataset {name_or_path!r}; known: {known}, or a .jsonl path")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DatasetError(f"dataset file {path} {what}")
    if len(path.stem) > MAX_ID_CHARS - 20:
        raise DatasetError(f"dataset file {path}: its name is longer than {MAX_ID_CHARS - 20} characters")
    resolved = path.resolve()
    return _dataset(path.stem, str(resolved), resolved)


def builtin_path(name: str, data_dir: Path | None) -> Path:
    """The file of a built-in dataset: `ETSQ_DATA_DIR`'s copy when it has one, else the shipped one."""
    filename = FILENAMES[name]
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DatasetError(f"ETSQ_DATA_DIR={data_dir}: not a directory")
        if (data_dir / filename).is_file():
            return (data_dir / filename).resolve()
    return Path(str(resources.files("etsq") / "data" / filename))


def _dataset(name: str, source: str, path: Path) -> Dataset:
    problems = tuple(_load_file(path, name))
    if not problems:
        raise DatasetError(f"dataset {source} has no rows")
    digest = content_hash(problems)
    shipped = SHIPPED_HASHES.get(name) == digest and source == name
    namespace = name if shipped else f"{name}@{digest[:NAMESPACE_HASH_CHARS]}"
    return Dataset(name, source, path, namespace, problems)


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
    except UnicodeDecodeError as exc:
        raise DatasetError(f"cannot read dataset file {path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc.strerror}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        except RecursionError:
            raise DatasetError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
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
    if "\x00" in value:
        raise DatasetError(f"field {key!r} contains a NUL character")
    return value


def _problem_id(row: dict[str, Any], name: str, index: int) -> str:
    if name in FILENAMES:
        # Built-in datasets: positional ids, because the shipped MATH500 lacks the `unique_id` the
        # PRM800K file has, and a problem must keep one id wherever it came from.
        return f"{name}-{index}"
    for key in _ID_FIELDS:
        if key in row:
            value = row[key]
            # Integer ids are common in hand-made files; bools are ints but never ids.
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
                raise DatasetError(f"field {key!r} must be a non-empty string or integer")
            return _checked_id(key, str(value))
    return f"{name}-{index}"


def _checked_id(key: str, value: str) -> str:
    if len(value) > MAX_ID_CHARS:
        raise DatasetError(f"field {key!r} is longer than {MAX_ID_CHARS} characters")
    if "\x00" in value:
        raise DatasetError(f"field {key!r} contains a NUL character")
    return value
