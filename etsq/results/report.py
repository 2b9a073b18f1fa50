"""The HTML report: `index.html` with PNG plots beside it (matplotlib, Agg) and the results table.

Plots: accuracy vs width per method; accuracy vs mean KV per problem (the paper's trade-off);
for each ETS run, KV per depth before and after pruning, the kept fraction and the cluster count;
for each run, time per depth split into expand / score / select.  Runs in progress are drawn from
their finished problems, and the page says so.  Nothing is loaded from outside the directory.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from etsq.procs import atomic_file, atomic_write_text
from etsq.results.evaluate import DepthFigures, depth_profile, evaluate
from etsq.results.table import TABLE_COLUMNS, RunFilter, partial_notes, significant
from etsq.store.labels import shown_label, sim_note, without_width
from etsq.store.session import Store

_DPI = 110


@dataclass(frozen=True)
class Figure:
    """A plot written beside index.html, with the caption the page shows under it."""

    file: str
    caption: str


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Sequence[dict[str, Any]], x: str) -> dict[str, list[dict[str, Any]]]:
    """Rows by (dataset, label but its width), each sorted by width: one line of a plot per method
    and parameter setting."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["n_problems"] and row.get(x) is not None:
            out[f"{without_width(_label(row), row['width'])} ({row['dataset']})"].append(row)
    return {label: sorted(points, key=lambda r: r["width"]) for label, points in sorted(out.items())}


def _accuracy_vs_width(plt: Any, rows: Sequence[dict[str, Any]], out: Path) -> Figure | None:
    series = _series(rows, "width")
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        ax.plot([p["width"] for p in points], [p["accuracy"] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    widths = sorted({p["width"] for points in series.values() for p in points})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set(xlabel="width W", ylabel="accuracy", title="Accuracy vs width", ylim=(-0.02, 1.02))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "accuracy_vs_width.png", "Accuracy per method at each width.")


def _accuracy_vs_kv(plt: Any, rows: Sequence[dict[str, Any]], out: Path) -> Figure | None:
    series = _series(rows, "kv_before")
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        xs, ys = [p["kv_before"] for p in points], [p["accuracy"] for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        for p, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"W={p['width']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="KV tokens per problem (kv_before summed over depths)", ylabel="accuracy")
    ax.set(title="Accuracy vs KV cache", ylim=(-0.02, 1.02))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    caption = "The trade-off: accuracy against the mean KV per problem as the reference counts it."
    return _save(plt, fig, out / "accuracy_vs_kv.png", caption)


def _ets_depths(plt: Any, run: dict[str, Any], depths: list[DepthFigures], out: Path) -> Figure:
    fig, (kv, kept, clusters) = plt.subplots(1, 3, figsize=(12, 3.6))
    xs = [d.depth for d in depths]
    kv.plot(xs, [d.kv_before for d in depths], marker="o", label="before pruning")
    kv.plot(xs, [d.kv_after for d in depths], marker="s", label="after pruning (kept)")
    kv.set(xlabel="depth", ylabel="KV tokens (mean per problem)", title="KV per depth")
    kv.legend(fontsize="small")
    kept.plot(xs, [_nan(d.kept_fraction) for d in depths], marker="o", color="tab:green")
    kept.set(xlabel="depth", ylabel="kept / frontier", title="Kept fraction", ylim=(0, 1.05))
    clusters.plot(xs, [_nan(d.clusters) for d in depths], marker="o", color="tab:purple")
    clusters.set(xlabel="depth", ylabel="clusters (mean)", title="Semantic clusters")
    for ax in (kv, kept, clusters):
        ax.grid(alpha=0.3)
    fig.suptitle(_run_title(run))
    name = f"ets_run{run['run_id']}.png"
    return _save(plt, fig, out / name, f"ETS pruning per depth, {_run_title(run)}.")


def _time_depths(plt: Any, run: dict[str, Any], depths: list[DepthFigures], out: Path) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [d.depth for d in depths]
    bottom = [0.0] * len(depths)
    for label, values in (
        ("expand", [d.expand_ms or 0.0 for d in depths]),
        ("score", [d.score_ms or 0.0 for d in depths]),
        ("select", [d.select_ms or 0.0 for d in depths]),
    ):
        ax.bar(xs, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(xlabel="depth", ylabel="ms (mean per problem)", title=f"Time per depth, {_run_title(run)}")
    ax.legend(fontsize="small")
    name = f"time_run{run['run_id']}.png"
    return _save(
        plt, fig, out / name, f"Time per depth split into expand / score / select, {_run_title(run)}."
    )


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _label(row: dict[str, Any]) -> str:
    return str(row.get("label") or f"{row['method']} W={row['width']}")


def _run_title(run: dict[str, Any]) -> str:
    return f"run {run['run_id']} ({_label(run)}, {run['dataset']})"


def _save(plt: Any, fig: Any, path: Path, caption: str) -> Figure:
    fig.tight_layout()
    try:
        with atomic_file(path, binary=True) as handle:
            fig.savefig(handle, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    return Figure(path.name, caption)


# --------------------------------------------------------------------------- the page


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if column == "seconds":
        return significant(float(value))
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return html.escape(str(value))


def _value(row: dict[str, Any], column: str) -> Any:
    return shown_label(row) if column == "label" else row.get(column)


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(_value(row, c), c)}</td>" for c in TABLE_COLUMNS) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 12px; color: #555; max-width: 640px; }
.note { background: #fff6d6; padding: 4px 8px; border-left: 3px solid #e0b000; }
"""


def _page(rows: Sequence[dict[str, Any]], figures: Sequence[Figure], agg: str, vote: str) -> str:
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in partial_notes(rows))
    images = "".join(
        f'<figure><img src="{html.escape(f.file)}" alt="{html.escape(f.caption)}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figures
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sim = sim_note(rows)
    title = html.escape(f"etsq report ({sim})" if sim else "etsq report")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{len({r['run_id'] for r in rows})} runs; answers chosen by <b>{agg}</b> step aggregation and "
        f"<b>{vote}</b> vote; written {stamp}. Figures are means per finished problem (README, "
        f'"Results").</p>{notes}<h2>Plots</h2>{images or "<p>No run has results to plot yet.</p>"}'
        f"<h2>Results{html.escape(f' ({sim})' if sim else '')}</h2>{_table(rows)}</body></html>"
    )


def write_report(
    store: Store, wanted: list[int] | None, out: Path, agg: str, vote: str, runs: RunFilter | None = None
) -> list[Path]:
    """Write `out/index.html` and its plots; returns the files, index.html first.

    Each file is written beside its target and renamed into place, the page after its plots: a
    failed report leaves no half-written file, and the page never names a plot that is missing.
    """
    rows = evaluate(store, wanted, [agg], [vote], runs)
    with store.session() as s:
        depths = {row["run_id"]: depth_profile(s, row["run_id"]) for row in rows}
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    figures = [f for f in (_accuracy_vs_width(plt, rows, out), _accuracy_vs_kv(plt, rows, out)) if f]
    for row in rows:
        if depths[row["run_id"]] and row["method"] == "ets":
            figures.append(_ets_depths(plt, row, depths[row["run_id"]], out))
    for row in rows:
        if depths[row["run_id"]]:
            figures.append(_time_depths(plt, row, depths[row["run_id"]], out))
    index = out / "index.html"
    atomic_write_text(index, _page(rows, figures, agg, vote))  # last: its plots are all in place
    return [index, *(out / f.file for f in figures)]
