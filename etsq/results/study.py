"""The study: a baseline method against the others, paired run by run on the axes where they differ.

`etsq study` answers "at each width, how much KV cache and time does ETS save against REBASE, and
at what accuracy?" in one command.  Runs are paired when they search the same problems with the
same shared configuration (the same width, seed, temperature, token and depth limits and models;
`pairing_axes`), so a pair differs in its method and that method's own parameters only.  Each pair
is compared on the problems both runs finished (matched by problem row, as `compare` does): each
run's accuracy and the difference with a paired bootstrap 95% interval, and the OTHER/BASE ratios
of the mean KV, tokens, calls and seconds per problem, each with a paired bootstrap 95% interval
(the ratio of means over the same resampled problems).  Runs that cannot be paired are named with
the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from etsq.errors import UserError
from etsq.results.compare import RESAMPLES, SEED
from etsq.results.evaluate import RunRecords, combos_of, run_records, select_runs
from etsq.results.table import ProblemRecord, RunFilter, RunInfo
from etsq.search.methods import SHARED_PARAMS
from etsq.store import schema as m
from etsq.store.labels import without_width
from etsq.store.session import Store

RATIO_FIGURES = ("kv_before", "kv_after", "kv_peak", "tokens", "policy_calls", "prm_calls", "seconds")
DEFAULT_BASELINE = "rebase"
# Model-config fields one method reads and another does not (ETS's sentence embedder): not an axis.
_METHOD_MODEL_FIELDS = {"embedding"}


# --------------------------------------------------------------------------- pairing


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def pairing_axes(config: dict[str, Any]) -> dict[str, Any]:
    """What two runs must share to be paired: their problems, the shared search fields and models.

    The method and the method's own parameters are left out: they are what a pair compares.
    """
    search, models = _section(config, "search"), _section(config, "models")
    axes: dict[str, Any] = {"problems": config.get("data_hash") or config.get("dataset")}
    for name in SHARED_PARAMS:
        if name != "method" and name in search:
            axes[name] = search[name]
    axes.update({f"models.{k}": v for k, v in sorted(models.items()) if k not in _METHOD_MODEL_FIELDS})
    return axes


def differences(a: dict[str, Any], b: dict[str, Any], with_method: bool = False) -> list[str]:
    """The axes on which two stored configs differ, besides the method and its own parameters
    (and the method too with `with_method`), as `name a -> b`."""
    left, right = pairing_axes(a), pairing_axes(b)
    if left.get("problems") != right.get("problems") and a.get("dataset") == b.get("dataset"):
        left.pop("problems"), right.pop("problems")  # the same dataset by name: problems pair by row
    out = []
    if with_method:
        ma, mb = _method(a), _method(b)
        if ma != mb:
            out.append(f"method {ma} -> {mb}")
    for key in sorted(set(left) | set(right), key=_axis_order):
        if left.get(key) != right.get(key):
            name = "dataset" if key == "problems" else key
            shown = (
                (a.get("dataset"), b.get("dataset")) if key == "problems" else (left.get(key), right.get(key))
            )
            out.append(f"{name} {shown[0]} -> {shown[1]}")
    return out


def _axis_order(key: str) -> tuple[int, str]:
    return (0 if key == "problems" else 1 if key == "width" else 2, key)


def _method(config: dict[str, Any]) -> str:
    search = _section(config, "search")
    return str(search.get("method", config.get("method", "?")))


def _pair_key(config: dict[str, Any], dataset: str) -> str:
    axes = pairing_axes(config)
    if config.get("source") == "reference":
        # An imported file records no models or limits: it pairs by dataset and width alone.
        axes = {"width": axes.get("width")}
    axes.pop("problems", None)
    return repr((dataset, sorted((k, repr(v)) for k, v in axes.items())))


# --------------------------------------------------------------------------- the bootstrap


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """`resamples` x `n` problem positions drawn with replacement (one draw shared by every figure
    of a pair, so the intervals are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None, None
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def mean_interval(values: Sequence[float], idx: np.ndarray) -> tuple[float | None, float | None]:
    """95% percentile interval of the mean of `values` over the resampled positions."""
    return _interval(np.asarray(values, dtype=float)[idx].mean(axis=1))


def ratio_interval(
    base: Sequence[float | None], other: Sequence[float | None], idx: np.ndarray
) -> tuple[float | None, float | None, float | None]:
    """(ratio of means OTHER/BASE, 95% interval) over the problems where both recorded the figure."""
    b = np.asarray([math.nan if v is None else v for v in base], dtype=float)
    o = np.asarray([math.nan if v is None else v for v in other], dtype=float)
    both = np.isfinite(b) & np.isfinite(o)
    if not both.any() or b[both].sum() == 0:
        return None, None, None
    if not both.all():  # resample the problems that have the figure only
        b, o = b[both], o[both]
        idx = np.random.default_rng(SEED).integers(0, len(b), size=(idx.shape[0], len(b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = o[idx].mean(axis=1) / b[idx].mean(axis=1)
    low, high = _interval(resampled)
    return float(o.mean() / b.mean()), low, high


# --------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Pair:
    base: RunRecords
    other: RunRecords
    differs: list[str]


def _describe(prefix: str, run: RunInfo) -> dict[str, Any]:
    return {
        f"{prefix}_run": run.run_id, f"{prefix}_method": run.method, f"{prefix}_label": run.label,
        f"{prefix}_backend": run.backend,
    }  # fmt: skip


def _pair_rows(pair: Pair, combos: Sequence[tuple[str, str]], resamples: int) -> list[dict[str, Any]]:
    by_problem = {r.problem: r for r in pair.base.records}
    common: list[tuple[ProblemRecord, ProblemRecord]] = [
        (by_problem[o.problem], o) for o in pair.other.records if o.problem in by_problem
    ]
    n = len(common)
    idx = bootstrap_indices(n, resamples)
    shared: dict[str, Any] = {
        "dataset": pair.other.run.dataset,
        "width": pair.other.run.width,
        **_describe("base", pair.base.run),
        **_describe("other", pair.other.run),
        "differs": "; ".join(pair.differs),
        "n_common": n,
        "n_base_only": len(pair.base.records) - n,
        "n_other_only": len(pair.other.records) - n,
    }
    figures: dict[str, Any] = {}
    for name in RATIO_FIGURES:
        base_values = [getattr(b, name) for b, _ in common]
        other_values = [getattr(o, name) for _, o in common]
        ratio, low, high = ratio_interval(base_values, other_values, idx)
        figures[f"{name}_base"] = _mean(base_values)
        figures[f"{name}_other"] = _mean(other_values)
        figures[f"{name}_ratio"] = ratio
        figures[f"{name}_ratio_ci_low"], figures[f"{name}_ratio_ci_high"] = low, high
    rows = []
    for i, (agg, vote) in enumerate(combos):
        base_ok = [float(b.correct[i]) for b, _ in common]
        other_ok = [float(o.correct[i]) for _, o in common]
        diffs = [o - b for b, o in zip(base_ok, other_ok, strict=True)]
        b_low, b_high = mean_interval(base_ok, idx)
        o_low, o_high = mean_interval(other_ok, idx)
        d_low, d_high = mean_interval(diffs, idx)
        rows.append(
            {
                **shared,
                "agg": agg,
                "vote": vote,
                "accuracy_base": sum(base_ok) / n,
                "accuracy_base_ci_low": b_low,
                "accuracy_base_ci_high": b_high,
                "accuracy_other": sum(other_ok) / n,
                "accuracy_other_ci_low": o_low,
                "accuracy_other_ci_high": o_high,
                "accuracy_diff": sum(diffs) / n,
                "accuracy_diff_ci_low": d_low,
                "accuracy_diff_ci_high": d_high,
                **figures,
            }
        )
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _configs(s: Session, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    return {
        run_id: config
        for run_id, config in s.execute(select(m.Run.id, m.Run.config).where(m.Run.id.in_(ids)))
    }


def study(
    store: Store,
    runs: RunFilter,
    aggs: Sequence[str] = (),
    votes: Sequence[str] = (),
    baseline: str = DEFAULT_BASELINE,
    resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """Pair `baseline` runs with the other methods' runs and compare each pair (module docstring).

    Returns {"baseline", "bootstrap", "rows": [one per pair and agg x vote, by width],
    "unpaired": [{"run_id", "label", "reason"}]}.
    """
    combos = combos_of(aggs, votes)
    if runs.methods and baseline not in runs.methods:
        runs = RunFilter(runs.runs, runs.datasets, (*runs.methods, baseline), runs.widths)
    with store.session() as s:
        infos = [r for r in select_runs(s, runs) if r.duplicate_of is None]
        configs = _configs(s, [r.run_id for r in infos])
        bases = [r for r in infos if r.method == baseline]
        others = [r for r in infos if r.method != baseline]
        unpaired: list[dict[str, Any]] = []
        if not bases:
            raise UserError(
                f"no {baseline} run among the selected runs to pair the others with; "
                f"choose the baseline with --baseline (methods here: "
                f"{', '.join(sorted({r.method for r in infos})) or 'none'})"
            )
        keyed: dict[str, list[RunInfo]] = {}
        for b in bases:
            keyed.setdefault(_pair_key(configs[b.run_id], b.dataset), []).append(b)
        pairs: list[tuple[RunInfo, RunInfo]] = []
        used: set[int] = set()
        for o in others:
            matches = keyed.get(_pair_key(configs[o.run_id], o.dataset), [])
            if not matches:
                unpaired.append(_unpaired(o, _no_partner(o, baseline, bases, configs)))
            for b in matches:
                pairs.append((b, o))
                used.add(b.run_id)
        for b in bases:
            if b.run_id not in used:
                unpaired.append(_unpaired(b, f"no other method's run on {b.dataset} at W={b.width} "
                                              "with the same shared settings"))  # fmt: skip
        records: dict[int, RunRecords] = {}
        for run in {r.run_id: r for pair in pairs for r in pair}.values():
            records[run.run_id] = run_records(s, run, combos)
    rows: list[dict[str, Any]] = []
    for b, o in sorted(pairs, key=lambda p: (p[1].dataset, p[1].width, p[1].label, p[0].run_id)):
        base, other = records[b.run_id], records[o.run_id]
        common = {r.problem for r in base.records} & {r.problem for r in other.records}
        if not common:
            unpaired.append(_unpaired(o, f"no finished problem in common with {baseline} run {b.run_id}"))
            continue
        differs = differences(configs[b.run_id], configs[o.run_id], with_method=True)
        rows.extend(_pair_rows(Pair(base, other, differs), combos, resamples))
    return {
        "baseline": baseline,
        "bootstrap": {"resamples": resamples, "seed": SEED, "method": "paired over problems, percentile"},
        "rows": rows,
        "unpaired": sorted(unpaired, key=lambda u: u["run_id"]),
    }


def _unpaired(run: RunInfo, reason: str) -> dict[str, Any]:
    return {"run_id": run.run_id, "label": run.label, "method": run.method, "width": run.width,
            "dataset": run.dataset, "reason": reason}  # fmt: skip


def _no_partner(
    run: RunInfo, baseline: str, bases: Sequence[RunInfo], configs: dict[int, dict[str, Any]]
) -> str:
    same = [b for b in bases if b.dataset == run.dataset and b.width == run.width]
    if not same:
        return f"no {baseline} run on {run.dataset} at W={run.width}"
    diff = differences(configs[same[0].run_id], configs[run.run_id])
    return f"{baseline} run {same[0].run_id} at W={run.width} differs in {', '.join(diff) or 'its settings'}"


# --------------------------------------------------------------------------- text and CSV

_SHOWN_RATIOS = (("kv_before", "kv_before"), ("kv_after", "kv_after"), ("kv_peak", "kv_peak"),
                 ("tokens", "tokens"), ("policy_calls", "calls"), ("seconds", "seconds"))  # fmt: skip


def _ci(row: dict[str, Any], name: str, digits: int = 2, sign: str = "") -> str:
    value, low, high = row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    if value is None:
        return "-"
    spec = f"{sign}.{digits}f"
    if low is None or high is None:
        return format(value, spec)
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def study_table(result: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """Headers and cells of the printed table: one row per pair and agg x vote."""
    base_name = result["baseline"]
    headers = [
        "W",
        f"{base_name} run",
        "other run",
        "agg/vote",
        "n",
        f"acc {base_name}",
        "acc other",
        "acc diff [95% CI]",
    ]
    headers += [f"{shown} ratio [95% CI]" for _, shown in _SHOWN_RATIOS]
    cells = []
    for row in result["rows"]:
        cell = {
            "W": str(row["width"]),
            f"{base_name} run": str(row["base_run"]),
            "other run": f"{row['other_run']} {_short(row['other_label'], row['width'])}",
            "agg/vote": f"{row['agg']}/{row['vote']}",
            "n": str(row["n_common"]),
            f"acc {base_name}": _ci(row, "accuracy_base", 3),
            "acc other": _ci(row, "accuracy_other", 3),
            "acc diff [95% CI]": _ci(row, "accuracy_diff", 3, "+"),
        }
        for name, shown in _SHOWN_RATIOS:
            cell[f"{shown} ratio [95% CI]"] = _ci(row, f"{name}_ratio", 2)
        cells.append(cell)
    return headers, cells


def _short(label: str, width: int) -> str:
    """A label in a row that already shows the width, and the sim note in its title."""
    return without_width(label, width).replace(" · sim", "")


def unpaired_lines(result: dict[str, Any]) -> list[str]:
    return [f"run {u['run_id']} ({u['label']}) not paired: {u['reason']}" for u in result["unpaired"]]
