"""Comparing two runs on the problems both finished: cost ratios and a paired accuracy difference.

The accuracy difference (OTHER - BASE) gets a paired bootstrap 95% interval: the common problems
are resampled with replacement `RESAMPLES` times (numpy, fixed seed), and the interval is the
2.5th..97.5th percentile of the resampled mean differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select

from etsq.errors import UserError
from etsq.results.evaluate import combos_of, run_records, select_runs
from etsq.results.table import ProblemRecord, RunFilter, RunInfo, mean, significant
from etsq.store import schema as m
from etsq.store.labels import shown_label, sim_note
from etsq.store.session import Store

RESAMPLES = 10_000
SEED = 0
_CHUNK = 1_000  # resamples drawn at once: bounded memory at any problem count
RATIO_FIGURES = ("kv_before", "kv_after", "kv_peak", "tokens", "policy_calls", "prm_calls", "seconds")


def paired_bootstrap(
    diffs: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """95% percentile interval of the mean of `diffs` under resampling of its items."""
    values = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        means.append(values[rng.integers(0, len(values), size=(size, len(values)))].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(low), float(high)


def _ratio(base: float | None, other: float | None) -> float | None:
    if base is None or other is None or base == 0:
        return None
    return other / base


def _describe(run: RunInfo) -> dict[str, Any]:
    return {
        "run_id": run.run_id, "dataset": run.dataset, "method": run.method, "width": run.width,
        "label": run.label, "backend": run.backend, "duplicate_of": run.duplicate_of,
    }  # fmt: skip


def _figure_means(records: Sequence[ProblemRecord]) -> dict[str, float | None]:
    return {name: mean([getattr(r, name) for r in records]) for name in RATIO_FIGURES}


def compare(store: Store, base_id: int, other_id: int, agg: str, vote: str) -> dict[str, Any]:
    """BASE against OTHER on the problems both finished (matched by problem, not by position)."""
    [combo] = combos_of([agg], [vote])
    with store.session() as s:
        runs = {r.run_id: r for r in select_runs(s, RunFilter(runs=(base_id, other_id)))}
        base = run_records(s, runs[base_id], [combo])
        other = run_records(s, runs[other_id], [combo])
        configs = {r.id: r.config for r in s.scalars(select(m.Run).where(m.Run.id.in_([base_id, other_id])))}
    warnings = _warnings(base_id, other_id, configs)
    by_problem = {r.problem: r for r in base.records}
    pairs = [(by_problem[o.problem], o) for o in other.records if o.problem in by_problem]
    if not pairs:
        raise UserError(f"runs {base_id} and {other_id} have no finished problem in common")
    base_recs, other_recs = [b for b, _ in pairs], [o for _, o in pairs]
    diffs = [float(o.correct[0]) - float(b.correct[0]) for b, o in pairs]
    low, high = paired_bootstrap(diffs)
    base_means, other_means = _figure_means(base_recs), _figure_means(other_recs)
    return {
        "warnings": warnings,
        "base": _describe(base.run),
        "other": _describe(other.run),
        "agg": combo[0],
        "vote": combo[1],
        "n_common": len(pairs),
        "n_base_only": len(base.records) - len(pairs),
        "n_other_only": len(other.records) - len(pairs),
        "accuracy_base": sum(b.correct[0] for b in base_recs) / len(pairs),
        "accuracy_other": sum(o.correct[0] for o in other_recs) / len(pairs),
        "accuracy_diff": sum(diffs) / len(diffs),
        "accuracy_diff_ci95": [low, high],
        "bootstrap": {"resamples": RESAMPLES, "seed": SEED, "method": "paired, percentile"},
        "base_means": base_means,
        "other_means": other_means,
        "ratios": {name: _ratio(base_means[name], other_means[name]) for name in RATIO_FIGURES},
    }


def _warnings(base_id: int, other_id: int, configs: dict[int, dict[str, Any]]) -> list[str]:
    """What makes the comparison not a comparison of methods: one run against itself, or two runs
    that differ in more than the method and its own parameters (`etsq.results.study.differences`)."""
    from etsq.results.study import differences

    if base_id == other_id:
        return [f"run {base_id} is compared with itself"]
    diff = differences(configs[base_id], configs[other_id])
    if not diff:
        return []
    return [f"runs {base_id} and {other_id} differ in more than the method: {'; '.join(diff)}"]


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """The comparison as a few lines of text: the accuracy difference, then one line per figure."""
    b, o = result["base"], result["other"]
    low, high = result["accuracy_diff_ci95"]
    note = sim_note([b, o])
    lines = [
        *([f"({note})"] if note else []),
        f"BASE  run {b['run_id']}: {shown_label(b)} {b['dataset']}",
        f"OTHER run {o['run_id']}: {shown_label(o)} {o['dataset']}",
        f"{result['n_common']} problems finished by both ({result['agg']} / {result['vote']})",
        f"accuracy: base {result['accuracy_base']:.3f}, other {result['accuracy_other']:.3f}, "
        f"difference {result['accuracy_diff']:+.3f} (95% CI {low:+.3f} .. {high:+.3f}; paired bootstrap, "
        f"{result['bootstrap']['resamples']} resamples, seed {result['bootstrap']['seed']})",
        f"{'per problem':<14} {'base':>12} {'other':>12} {'other/base':>11}",
    ]
    for name in RATIO_FIGURES:
        base, other, ratio = result["base_means"][name], result["other_means"][name], result["ratios"][name]
        shown = _time if name == "seconds" else _num
        lines.append(f"{name:<14} {shown(base):>12} {shown(other):>12} {_num(ratio, 3):>11}")
    return lines


def _time(value: float | None) -> str:
    return "-" if value is None else significant(value)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"
