"""The reference implementation's output format, read and written: no database here.

`etsq import` (`etsq.results.reference_runs`) stores a file read here through the store's run path;
`export --format reference` writes a run back in this format.

The reference writes one JSON list per run, one object per problem:
`{"id", "question", "model_answer": [{"text", "step_scores"}], "ground_truth_answer", "total_tokens"}`,
and a four-line `stats.log` (see ETS.md, "Reference output").  An import stores the file as a run:
each answer becomes a leaf path whose steps carry its step scores, paths that share steps share
nodes, and the per-problem `total_tokens` and the stats.log totals are kept in the run's config
(they are what the reference measured; the imported tree lacks the pruned nodes).  A bad file is
refused with the position of its first fault before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from etsq.answers import extract_answer, gold_answer
from etsq.datasets import FILENAMES
from etsq.errors import UserError

SOURCE = "reference"
_STATS_LINES = {
    "Total KV cache size": ("kv_cache", int),
    "Number of Model Calls": ("model_calls", int),
    "Number of Tokens Generated": ("tokens_generated", int),
    "Time": ("seconds", float),
}
_STEP_TAG = "ки"


class ReferenceFormatError(UserError):
    """A reference output file (or its stats.log) is not in the reference's format."""


@dataclass(frozen=True)
class Answer:
    text: str
    step_scores: tuple[float, ...]


@dataclass(frozen=True)
class Entry:
    """One problem of a reference file."""

    id: int
    question: str
    answers: tuple[Answer, ...]
    ground_truth: str
    total_tokens: int


# --------------------------------------------------------------------------- reading and checking


def read_reference(path: Path) -> list[Entry]:
    """The file's problems, or a ReferenceFormatError naming the first fault's position."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        hint = (
            "; import reads the reference format (one JSON list: `etsq export RUN --format reference`), "
            "not jsonl"
            if exc.msg == "Extra data"
            else ""
        )
        raise ReferenceFormatError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}{hint}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ReferenceFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, list):
        raise ReferenceFormatError(f"{path}: expected a JSON list of problems, got {_kind(data)}")
    if not data:
        raise ReferenceFormatError(f"{path}: the list of problems is empty")
    entries = [_entry(path, item, f"[{i}]") for i, item in enumerate(data)]
    _check_unique_ids(path, entries)
    return entries


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _field(path: Path, item: dict[str, Any], where: str, key: str) -> Any:
    if key not in item:
        raise ReferenceFormatError(f"{path}: {where}: missing key {key!r}")
    return item[key]


def _typed(path: Path, item: dict[str, Any], where: str, key: str, kind: type) -> Any:
    value = _field(path, item, where, key)
    is_int = kind is int and isinstance(value, int) and not isinstance(value, bool)
    if not (is_int or (kind is not int and isinstance(value, kind))):
        names = {int: "an integer", str: "a string", list: "a list"}
        raise ReferenceFormatError(f"{path}: {where}.{key}: expected {names[kind]}, got {_kind(value)}")
    return value


def _entry(path: Path, item: Any, where: str) -> Entry:
    if not isinstance(item, dict):
        raise ReferenceFormatError(f"{path}: {where}: expected an object, got {_kind(item)}")
    entry_id = _typed(path, item, where, "id", int)
    question = _typed(path, item, where, "question", str)
    answers = _typed(path, item, where, "model_answer", list)
    parsed = tuple(_answer(path, a, f"{where}.model_answer[{j}]") for j, a in enumerate(answers))
    truth = _typed(path, item, where, "ground_truth_answer", str)
    tokens = _typed(path, item, where, "total_tokens", int)
    if tokens < 0:
        raise ReferenceFormatError(f"{path}: {where}.total_tokens: expected a count >= 0, got {tokens}")
    return Entry(entry_id, question, parsed, truth, tokens)


def _answer(path: Path, item: Any, where: str) -> Answer:
    if not isinstance(item, dict):
        raise ReferenceFormatError(f"{path}: {where}: expected an object, got {_kind(item)}")
    text = _typed(path, item, where, "text", str)
    scores = _field(path, item, where, "step_scores")
    if not isinstance(scores, list) or not scores or not all(_is_number(s) for s in scores):
        raise ReferenceFormatError(f"{path}: {where}.step_scores: expected a list of numbers")
    return Answer(text, tuple(float(s) for s in scores))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_unique_ids(path: Path, entries: list[Entry]) -> None:
    first: dict[int, int] = {}
    for i, entry in enumerate(entries):
        if entry.id in first:
            raise ReferenceFormatError(
                f"{path}: [{i}].id: duplicate id {entry.id} (also at [{first[entry.id]}])"
            )
        first[entry.id] = i


def read_stats(path: Path) -> dict[str, float]:
    """The four figures of a reference stats.log, by etsq's names."""
    found: dict[str, float] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ReferenceFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, sep, value = line.partition(":")
        if not sep or label.strip() not in _STATS_LINES:
            raise ReferenceFormatError(
                f"{path}: line {lineno}: expected one of {', '.join(map(repr, _STATS_LINES))}"
            )
        name, kind = _STATS_LINES[label.strip()]
        try:
            found[name] = kind(value.strip())
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ReferenceFormatError(
                f"{path}: line {lineno}: {label.strip()}: expected {what}, got {value.strip()!r}"
            ) from None
    missing = [label for label, (name, _) in _STATS_LINES.items() if name not in found]
    if missing:
        raise ReferenceFormatError(f"{path}: missing the line {missing[0]!r}")
    return found


def stats_text(stats: dict[str, float]) -> str:
    """A stats.log as the reference writes it: its four lines, which `read_stats` reads back."""
    lines = []
    for label, (name, kind) in _STATS_LINES.items():
        value = stats[name]
        lines.append(f"{label}: {round(value) if kind is int else repr(float(value))}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- answers as trees


@dataclass
class TreeNode:
    """A node of the tree an import builds: parent index, text, score, and leaf details."""

    parent: int | None
    depth: int
    text: str
    score: float | None
    path: str
    answer: str | None = None
    terminal: bool = False
    children: list[int] = field(default_factory=list)


def root_text(entry: Entry) -> str:
    """The prompt the answers share: the question (and its newline) when every text starts with it."""
    for candidate in (entry.question + "\n", entry.question):
        if all(a.text.startswith(candidate) for a in entry.answers):
            return candidate
    return ""


def split_steps(rest: str, n: int) -> list[str]:
    """`rest` (a path's text after the prompt) cut into `n` steps whose concatenation is `rest`.

    Cut after each step delimiter (Math-Shepherd's tag, else a blank line); surplus leading pieces
    join the first step, and missing pieces are empty steps before the first one.
    """
    delimiter = _STEP_TAG if _STEP_TAG in rest else "\n\n"
    pieces = [p for p in re.split(f"(?<={re.escape(delimiter)})", rest) if p]
    if len(pieces) >= n:
        cut = len(pieces) - n + 1
        return ["".join(pieces[:cut]), *pieces[cut:]]
    return [""] * (n - len(pieces)) + pieces


def answer_tree(entry: Entry) -> list[TreeNode]:
    """The problem's tree: answers' paths share nodes while their steps and scores agree; every
    answer ends in a leaf of its own, so leaves are the answers, in order."""
    prompt = root_text(entry)
    nodes = [TreeNode(None, 0, prompt, None, "0")]
    shared: dict[tuple[int, str, float], int] = {}
    for answer in entry.answers:
        steps = split_steps(answer.text[len(prompt) :], len(answer.step_scores))
        parent = 0
        for depth, (step, score) in enumerate(zip(steps[:-1], answer.step_scores[:-1], strict=True), start=1):
            key = (parent, step, score)
            if key not in shared:
                shared[key] = _add(nodes, parent, depth, step, score)
            parent = shared[key]
        leaf = _add(nodes, parent, len(steps), steps[-1], answer.step_scores[-1])
        nodes[leaf].terminal, nodes[leaf].answer = True, extract_answer(answer.text[len(prompt) :])
    return nodes


def _add(nodes: list[TreeNode], parent: int, depth: int, text: str, score: float) -> int:
    siblings = nodes[parent].children
    nodes.append(TreeNode(parent, depth, text, score, f"{nodes[parent].path}.{len(siblings)}"))
    siblings.append(len(nodes) - 1)
    return len(nodes) - 1


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportSpec:
    file: Path
    dataset: str
    method: str
    width: int
    stats: Path | None = None


def problem_key(dataset: str, entry_id: int) -> str:
    """The stored problem id: built-in datasets number their rows `gsm8k-12`, files keep theirs."""
    return f"{dataset}-{entry_id}" if dataset in FILENAMES else str(entry_id)


def gold(entry: Entry) -> str:
    """The answer stored for the problem."""
    # A GSM8K-style solution ends in `#### 72`; any other ground truth is the answer itself.
    return gold_answer(entry.ground_truth, "") if "####" in entry.ground_truth else entry.ground_truth.strip()


def run_config(spec: ImportSpec, entries: list[Entry], stats: dict[str, float] | None) -> dict[str, Any]:
    """An imported run's config: its identity (the file's and stats.log's content, the options it
    came with) and what the reference measured, which the imported tree lacks."""
    digest = hashlib.sha256(spec.file.read_bytes())
    if spec.stats is not None:
        digest.update(spec.stats.read_bytes())
    # The file is one run per dataset label: the same file under another --dataset is another run
    # (method and width are in the identity through `search`).
    digest.update(f"\0dataset={spec.dataset}".encode())
    keys = [problem_key(spec.dataset, e.id) for e in entries]
    return {
        "source": SOURCE,
        "dataset": spec.dataset,
        "method": spec.method,
        "width": spec.width,
        "sha256": digest.hexdigest(),
        # A run's identity (etsq.store.runs.IDENTITY_KEYS): the file's content and the options it came with.
        "data_hash": digest.hexdigest(),
        "search": {"method": spec.method, "width": spec.width},
        "models": {"backend": SOURCE},
        "file": spec.file.name,
        "stats": stats,
        "n_problems": len(entries),
        "total_tokens": {k: e.total_tokens for k, e in zip(keys, entries, strict=True)},
        # Ground truths that are not the stored answer (a `####` solution), for the way back out.
        "ground_truth": {
            k: e.ground_truth for k, e in zip(keys, entries, strict=True) if e.ground_truth != gold(e)
        },
    }


# --------------------------------------------------------------------------- an imported run's figures


def is_imported(config: dict[str, Any]) -> bool:
    return config.get("source") == SOURCE


def problem_figures(config: dict[str, Any], key: str) -> dict[str, float | None]:
    """An imported problem's figures: its own total_tokens, and stats.log's run totals spread
    evenly over the file's problems (the reference records no per-problem KV, calls or time).
    Nothing for a run etsq searched: its figures come from its tree."""
    if not is_imported(config):
        return {}
    stats, n = config.get("stats"), config["n_problems"]
    tokens = config["total_tokens"].get(key)

    def share(name: str) -> float | None:
        return None if stats is None else float(stats[name]) / n

    return {
        "tokens": None if tokens is None else float(tokens),
        "kv_before": share("kv_cache"),
        "policy_calls": share("model_calls"),
        "prm_calls": share("model_calls"),  # the reference scores every sampled step once
        "seconds": share("seconds"),
        "kv_after": None,
        "kv_peak": None,
        "server_kv_peak": None,
        "nodes": None,
    }


# --------------------------------------------------------------------------- export


def reference_id(dataset: str, key: str, position: int) -> int:
    """The integer id the reference format wants: the row number of `gsm8k-12`, a numeric id, or
    else the problem's position in the run."""
    match = re.fullmatch(rf"{re.escape(dataset)}-(\d+)", key)
    if match:
        return int(match.group(1))
    return int(key) if re.fullmatch(r"-?\d+", key) else position


class ExportRow(NamedTuple):
    """What the export reads of one stored node."""

    id: int
    parent_id: int | None
    text: str
    score: float | None
    terminal: bool
    step_tokens: int


def _leaf_paths(rows: list[ExportRow]) -> list[dict[str, Any]]:
    """{text: the whole path's text, step_scores} of every leaf, in id order: model_answer."""
    by_id = {row.id: row for row in rows}
    out = []
    for leaf in sorted(rows):
        if not leaf.terminal:
            continue
        texts: list[str] = []
        scores: list[float] = []
        current: ExportRow | None = leaf
        while current is not None:
            texts.append(current.text)
            if current.parent_id is not None and current.score is not None:
                scores.append(current.score)
            current = by_id[current.parent_id] if current.parent_id is not None else None
        out.append({"text": "".join(reversed(texts)), "step_scores": scores[::-1]})
    return out


@dataclass(frozen=True)
class StoredProblem:
    """What the export reads of one finished problem of a run besides its nodes."""

    key: str  # the dataset's problem id
    question: str
    answer: str  # the stored gold answer


def export_entry(
    dataset: str, config: dict[str, Any], problem: StoredProblem, rows: list[ExportRow], position: int
) -> dict[str, Any]:
    """One finished problem in the reference's shape; an imported run gives back its file's ground
    truth and total_tokens."""
    truth, tokens = problem.answer, sum(row.step_tokens for row in rows if row.parent_id is not None)
    if is_imported(config):
        truth = config["ground_truth"].get(problem.key, truth)
        tokens = int(config["total_tokens"].get(problem.key, 0))
    return {
        "id": reference_id(dataset, problem.key, position),
        "question": problem.question,
        "model_answer": _leaf_paths(rows),
        "ground_truth_answer": truth,
        "total_tokens": tokens,
    }


def reference_chunks(entries: Iterator[dict[str, Any]]) -> Iterator[str]:
    """The text `json.dump(entries, fh, indent=4)` writes (the reference's own call), streamed."""
    first = True
    for entry in entries:
        yield ("[\n" if first else ",\n") + textwrap.indent(json.dumps(entry, indent=4), "    ")
        first = False
    yield "[]" if first else "\n]"
