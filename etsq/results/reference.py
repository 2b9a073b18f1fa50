"""The reference implementation's output format, in (`etsq import`) and out (`export --format reference`).

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
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from etsq.answers import extract_answer, gold_answer
from etsq.datasets import FILENAMES
from etsq.errors import UserError
from etsq.store import schema as m
from etsq.store.runs import config_hash, package_versions, run_ids
from etsq.store.session import ensure_schema, session_scope
from etsq.store.statuses import JobStatus

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
        raise ReferenceFormatError(
            f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"
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


def _gold(entry: Entry) -> str:
    # A GSM8K-style solution ends in `#### 72`; any other ground truth is the answer itself.
    return gold_answer(entry.ground_truth, "") if "####" in entry.ground_truth else entry.ground_truth.strip()


def _config(spec: ImportSpec, entries: list[Entry], stats: dict[str, float] | None) -> dict[str, Any]:
    digest = hashlib.sha256(spec.file.read_bytes())
    if spec.stats is not None:
        digest.update(spec.stats.read_bytes())
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
            k: e.ground_truth for k, e in zip(keys, entries, strict=True) if e.ground_truth != _gold(e)
        },
    }


def import_reference(url: str, spec: ImportSpec) -> tuple[int, bool]:
    """Store a reference file as a run: (run id, True), or (the existing run's id, False) when this
    file was imported with the same options before.  Checked whole before anything is written."""
    if spec.width < 1:
        raise UserError(f"width must be positive, got {spec.width}")
    entries = read_reference(spec.file)
    stats = read_stats(spec.stats) if spec.stats is not None else None
    config = _config(spec, entries, stats)
    ensure_schema(url)
    with session_scope(url) as s:
        existing = s.scalar(select(m.Run.id).where(m.Run.config_hash == config_hash(config)))
        if existing is not None:
            return existing, False
        run = _run_row(spec, config)
        s.add(run)
        s.flush()
        for entry in entries:
            _store_problem(s, run.id, spec.dataset, entry)
        return run.id, True


def _run_row(spec: ImportSpec, config: dict[str, Any]) -> m.Run:
    return m.Run(
        dataset=spec.dataset,
        method=spec.method,
        width=spec.width,
        seed=0,
        config=config,
        config_hash=config_hash(config),
        policy_model=SOURCE,
        prm_model=SOURCE,
        model_info={"source": SOURCE, "file": spec.file.name},
        versions=package_versions(),
        finished_at=m.utcnow(),
    )


def _problem_row(s: Session, dataset: str, entry: Entry) -> m.Problem:
    key, gold = problem_key(dataset, entry.id), _gold(entry)
    row = s.scalar(select(m.Problem).where(m.Problem.dataset == dataset, m.Problem.problem_id == key))
    if row is None:
        row = m.Problem(dataset=dataset, problem_id=key, question=entry.question, answer=gold, meta={})
        s.add(row)
        s.flush()
    elif (row.question, row.answer) != (entry.question, gold):
        raise UserError(
            f"{dataset}/{key} is stored with another question or answer; import under another --dataset label"
        )
    return row


def _store_problem(s: Session, run_id: int, dataset: str, entry: Entry) -> None:
    nodes = answer_tree(entry)
    now = m.utcnow()
    job = m.Job(
        run_id=run_id,
        problem_id=_problem_row(s, dataset, entry).id,
        status=JobStatus.DONE,
        depth=max(n.depth for n in nodes),
        finished_at=now,
    )
    s.add(job)
    s.flush()
    _insert_nodes(s, job.id, nodes)


def _insert_nodes(s: Session, job_id: int, nodes: list[TreeNode]) -> None:
    """Inner nodes depth by depth (parents first), then the leaves in answer order, so that the
    leaves' ids keep the file's order of answers."""
    ids: dict[int, int] = {}
    inner = [i for i, n in enumerate(nodes) if not n.terminal]
    for depth in sorted({nodes[i].depth for i in inner}):
        _insert(s, job_id, nodes, [i for i in inner if nodes[i].depth == depth], ids)
    _insert(s, job_id, nodes, [i for i, n in enumerate(nodes) if n.terminal], ids)


def _insert(s: Session, job_id: int, nodes: list[TreeNode], batch: list[int], ids: dict[int, int]) -> None:
    rows = [_node_row(job_id, nodes[i], ids) for i in batch]
    stmt = insert(m.Node).returning(m.Node.id, sort_by_parameter_order=True)
    for i, db_id in zip(batch, s.scalars(stmt, rows).all(), strict=True):
        ids[i] = db_id


def _node_row(job_id: int, node: TreeNode, ids: dict[int, int]) -> dict[str, Any]:
    # Token counts are not in the file: 0 here; the run's figures come from total_tokens and stats.log.
    return {
        "job_id": job_id,
        "parent_id": None if node.parent is None else ids[node.parent],
        "depth": node.depth,
        "path": node.path,
        "text": node.text,
        "step_tokens": 0,
        "cum_tokens": 0,
        "score": node.score,
        "terminal": node.terminal,
        "terminal_reason": "answer" if node.terminal and node.answer else None,
        "answer": node.answer,
        "kept": None if node.terminal else True,
        "n_children": None if node.terminal else len(node.children),
    }


# --------------------------------------------------------------------------- an imported run's figures


def is_imported(config: dict[str, Any]) -> bool:
    return config.get("source") == SOURCE


def problem_figures(config: dict[str, Any], key: str) -> dict[str, float | None]:
    """An imported problem's figures: its own total_tokens, and stats.log's run totals spread
    evenly over the file's problems (the reference records no per-problem KV, calls or time)."""
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


ExportRow = tuple[int, int | None, str, float | None, bool, int]  # id, parent, text, score, terminal, tokens


def _leaf_paths(rows: list[ExportRow]) -> list[dict[str, Any]]:
    """{text: the whole path's text, step_scores} of every leaf, in id order: model_answer."""
    by_id = {row[0]: row for row in rows}
    out = []
    for node_id, *_, terminal, _ in sorted(rows):
        if not terminal:
            continue
        texts: list[str] = []
        scores: list[float] = []
        current: ExportRow | None = by_id[node_id]
        while current is not None:
            texts.append(current[2])
            if current[1] is not None and current[3] is not None:
                scores.append(current[3])
            current = by_id[current[1]] if current[1] is not None else None
        out.append({"text": "".join(reversed(texts)), "step_scores": scores[::-1]})
    return out


def _export_entry(s: Session, run: m.Run, job: m.Job, position: int) -> dict[str, Any]:
    n = m.Node
    q = select(n.id, n.parent_id, n.text, n.score, n.terminal, n.step_tokens).where(n.job_id == job.id)
    rows = list(s.execute(q).tuples())
    key, config = job.problem.problem_id, run.config
    truth, tokens = job.problem.answer, sum(row[5] for row in rows if row[1] is not None)
    if is_imported(config):
        truth = config["ground_truth"].get(key, truth)
        tokens = int(config["total_tokens"].get(key, 0))
    return {
        "id": reference_id(run.dataset, key, position),
        "question": job.problem.question,
        "model_answer": _leaf_paths(rows),
        "ground_truth_answer": truth,
        "total_tokens": tokens,
    }


def reference_entries(url: str, run_id: int) -> Iterator[dict[str, Any]]:
    """The run's finished problems in the reference's shape, one at a time."""
    ensure_schema(url)
    with session_scope(url) as s:
        run_ids(s, [run_id])
        run = s.get_one(m.Run, run_id)
        jobs = s.scalars(
            select(m.Job).where(m.Job.run_id == run_id, m.Job.status == JobStatus.DONE).order_by(m.Job.id)
        )
        for position, job in enumerate(jobs):
            yield _export_entry(s, run, job, position)


def reference_chunks(entries: Iterator[dict[str, Any]]) -> Iterator[str]:
    """The text `json.dump(entries, fh, indent=4)` writes (the reference's own call), streamed."""
    first = True
    for entry in entries:
        yield ("[\n" if first else ",\n") + textwrap.indent(json.dumps(entry, indent=4), "    ")
        first = False
    yield "[]" if first else "\n]"
