"""The results table: per run and agg x vote, accuracy beside the KV, token, call and time figures.

Pure functions over `ProblemRecord`s (one graded problem of a run, see `etsq.results.evaluate`): every
figure is a mean per finished problem unless its name says otherwise; README "Results" defines
each one.  Runs still in progress are summarised over their done problems and say so.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from etsq.store.labels import shown_label

SIG3 = -3  # a SHORT_COLUMNS digits value: three significant figures (times, whose scale varies by width)


def significant(value: float, figures: int = 3) -> str:
    """`value` to `figures` significant figures, never in exponent form: 0.273, 2.20, 948, 1,283."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.{figures - 1}f}" if value == 0 else str(value)
    digits = max(0, figures - 1 - math.floor(math.log10(abs(value))))
    return f"{round(value, digits):,.{digits}f}"


# Columns of the printed table and the report (JSON and CSV carry every key of a row).
TABLE_COLUMNS = (
    "run_id", "label", "dataset", "method", "width", "agg", "vote", "n_problems", "n_total", "accuracy",
    "coverage", "n_failed", "kv_before", "kv_after", "kv_peak", "server_kv_peak", "tokens", "policy_calls",
    "prm_calls", "seconds", "nodes_per_s",
)  # fmt: skip
# The terminal's narrower headers: (header, key, digits after the point; None for text; SIG3 for three
# significant figures).
SHORT_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("run", "run_id", None), ("dataset", "dataset", None), ("label", "shown_label", None),
    ("agg", "agg", None), ("vote", "vote", None), ("done", "n_problems", None), ("of", "n_total", None),
    ("acc", "accuracy", 3), ("cover", "coverage", 3), ("failed", "n_failed", None),
    ("kv_before", "kv_before", 0), ("kv_after", "kv_after", 0), ("kv_peak", "kv_peak", 0),
    ("srv_kv", "server_kv_peak", 0), ("tokens", "tokens", 0), ("policy", "policy_calls", 1),
    ("prm", "prm_calls", 1), ("s/prob", "seconds", SIG3), ("nodes/s", "nodes_per_s", 1),
)  # fmt: skip
MEAN_FIGURES = ("kv_before", "kv_after", "kv_peak", "tokens", "policy_calls", "prm_calls", "seconds")


@dataclass(frozen=True)
class RunFilter:
    """Which runs a table covers: empty tuples admit everything."""

    runs: tuple[int, ...] = ()
    datasets: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    widths: tuple[int, ...] = ()


@dataclass(frozen=True)
class ProblemFilter:
    """Which problems count, by their dataset row's `level` / `subject` (MATH500 has both)."""

    levels: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.levels or self.subjects)

    def admits(self, meta: dict[str, Any]) -> bool:
        return _matches(meta, "level", self.levels) and _matches(meta, "subject", self.subjects)


def _matches(meta: dict[str, Any], key: str, wanted: tuple[str, ...]) -> bool:
    if not wanted:
        return True
    value = meta.get(key)
    return value is not None and str(value).lower() in {w.lower() for w in wanted}


@dataclass(frozen=True)
class RunInfo:
    run_id: int
    dataset: str
    method: str
    width: int
    source: str  # "etsq", or "reference" for an imported run
    label: str = ""  # etsq.store.labels.run_label: what sets the run apart
    backend: str | None = None  # its models' backend ("sim": synthetic)
    duplicate_of: int | None = None  # the older run of its identity (migration 0006)


@dataclass
class ProblemRecord:
    """One finished problem of a run, graded under the requested combinations, with its figures.

    A figure the run did not record is None (server KV on in-process models; kept-set KV and
    nodes on imported runs).
    """

    job_id: int
    problem: int  # problems.id: what two runs' records are matched on
    key: str  # the dataset's problem id
    correct: tuple[bool, ...]
    covered: bool
    nodes: int | None
    tokens: float | None
    policy_calls: float | None
    prm_calls: float | None
    kv_before: float | None
    kv_after: float | None
    kv_peak: float | None
    server_kv_peak: float | None
    seconds: float | None
    # Per combination: whether the chosen answer was graded by the cheap value test (True), by
    # math-verify (False), or had no answer (None); empty for records made before it was counted.
    graded_by_value: tuple[bool | None, ...] = ()


@dataclass
class RunCounts:
    """The run's jobs that pass the problem filter, by outcome."""

    total: int = 0
    done: int = 0
    failed: int = 0
    unfinished: int = 0  # queued or running


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the recorded values; None when none was recorded."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarise(
    run: RunInfo, records: Sequence[ProblemRecord], counts: RunCounts, combos: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """One row per (agg, vote): accuracy of that combination beside the run's shared figures."""
    shared = _figures(records, counts)
    base = {
        "run_id": run.run_id, "dataset": run.dataset, "method": run.method, "width": run.width,
        "source": run.source, "label": run.label, "backend": run.backend, "duplicate_of": run.duplicate_of,
    }  # fmt: skip
    rows = []
    for i, (agg, vote) in enumerate(combos):
        n_correct = sum(r.correct[i] for r in records)
        graders = [r.graded_by_value[i] for r in records if i < len(r.graded_by_value)]
        rows.append(
            {
                **base,
                "agg": agg,
                "vote": vote,
                "n_problems": len(records),
                "n_correct": n_correct,
                "accuracy": n_correct / len(records) if records else 0.0,
                "graded_by_value": sum(g is True for g in graders),
                "graded_by_math_verify": sum(g is False for g in graders),
                **shared,
            }
        )
    return rows


def _figures(records: Sequence[ProblemRecord], counts: RunCounts) -> dict[str, Any]:
    n = len(records)
    figures: dict[str, Any] = {
        "n_failed": counts.failed,
        "n_total": counts.total,
        "partial": counts.unfinished > 0,
        "coverage": sum(r.covered for r in records) / n if n else 0.0,
    }
    for name in MEAN_FIGURES:
        figures[name] = mean([getattr(r, name) for r in records])
    peaks = [r.server_kv_peak for r in records if r.server_kv_peak is not None]
    figures["server_kv_peak"] = max(peaks) if peaks else None
    figures["nodes_per_s"] = _rate([r.nodes for r in records], [r.seconds for r in records])
    return figures


def _rate(nodes: Sequence[int | None], seconds: Sequence[float | None]) -> float | None:
    pairs = [(n, s) for n, s in zip(nodes, seconds, strict=True) if n is not None and s is not None]
    total_s = sum(s for _, s in pairs)
    return sum(n for n, _ in pairs) / total_s if total_s > 0 else None


def partial_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per run still in progress, saying which problems its figures cover."""
    seen: dict[int, str] = {}
    for row in rows:
        if row.get("partial") and row["run_id"] not in seen:
            seen[row["run_id"]] = (
                f"run {row['run_id']}: {row['n_problems']} of {row['n_total']} problems done "
                f"({row['n_failed']} failed); its figures cover the done problems only"
            )
    return list(seen.values())


def short_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, str]]]:
    """The rows as the terminal table shows them: short headers, rounded figures, '-' for none."""
    headers = [header for header, _, _ in SHORT_COLUMNS]
    out = []
    for row in rows:
        cells = {}
        for header, key, digits in SHORT_COLUMNS:
            value = shown_label(row) if key == "shown_label" else row.get(key)
            if value is None:
                cells[header] = "-"
            else:
                cells[header] = _cell(value, digits)
        out.append(cells)
    return headers, out


def _cell(value: Any, digits: int | None) -> str:
    if digits is None:
        return str(value)
    return significant(value) if digits == SIG3 else f"{value:,.{digits}f}"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Every key of the rows, one header line, floats as Python prints them."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
