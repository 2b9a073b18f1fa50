"""The HTML report: `index.html` with PNG plots beside it (matplotlib, Agg) and the results table.

Plots: accuracy vs width per method; accuracy vs mean KV per problem (the paper's trade-off);
for each ETS run, KV per depth before and after pruning, the kept fraction and the cluster count;
for each run, time per depth split into expand / score / select.  Runs in progress are drawn from
their finished problems, and the page says so.  Nothing is loaded from outside the directory.
"""

from __future__ import annotations

import csv
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from etsq.procs import atomic_file, atomic_write_text
from etsq.results.compare import RESAMPLES
from etsq.results.evaluate import TIME_PARTS, DepthFigures, combos_of, depth_profile, evaluate_runs
from etsq.results.study import bootstrap_indices, mean_interval, study
from etsq.results.table import TABLE_COLUMNS, RunFilter, partial_notes, significant, summarise
from etsq.store.labels import shown_label, sim_note, without_width
from etsq.store.session import Store

_DPI = 110


@dataclass(frozen=True)
class Figure:
    """A plot written beside index.html, with the caption the page shows under it."""

    file: str
    caption: str
    csv: str | None = None  # the plotted data, beside the plot


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
    data = []
    for i, (label, points) in enumerate(series.items()):
        xs = [p["width"] * _dodge(i, len(series)) for p in points]
        ys = [p["accuracy"] for p in points]
        err = [[y - _lo(p, y) for p, y in zip(points, ys, strict=True)],
               [_hi(p, y) - y for p, y in zip(points, ys, strict=True)]]  # fmt: skip
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        data += [{"series": label, "run_id": p["run_id"], "width": p["width"], "accuracy": p["accuracy"],
                  "ci_low": p.get("accuracy_ci_low"), "ci_high": p.get("accuracy_ci_high"),
                  "n_problems": p["n_problems"]} for p in points]  # fmt: skip
    _width_axis(ax, series)
    ax.set(xlabel="width W", ylabel="accuracy", title="Accuracy vs width (95% CI)", ylim=(-0.02, 1.02))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    caption = "Accuracy per method at each width; bars: bootstrap 95% interval over the run's problems."
    return _save(plt, fig, out / "accuracy_vs_width.png", caption, data)


def _lo(row: dict[str, Any], y: float) -> float:
    low = row.get("accuracy_ci_low")
    return y if low is None else float(low)


def _hi(row: dict[str, Any], y: float) -> float:
    high = row.get("accuracy_ci_high")
    return y if high is None else float(high)


def _dodge(i: int, n: int) -> float:
    """A small multiplicative shift on the log-width axis so series at one width do not overprint."""
    return float(2 ** (0.06 * (i - (n - 1) / 2)))


def _width_axis(ax: Any, series: dict[str, list[dict[str, Any]]]) -> None:
    ax.set_xscale("log", base=2)
    widths = sorted({p["width"] for points in series.values() for p in points})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()


def _accuracy_vs_kv(plt: Any, rows: Sequence[dict[str, Any]], out: Path) -> Figure | None:
    """The Pareto plot: every run a point (one marker per method), labels placed where they collide
    with no other label or point, and the frontier (no other run is cheaper and as accurate)."""
    points = [r for r in rows if r["n_problems"] and r.get("kv_before") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    markers = "osD^v<>P*X"
    methods = sorted({p["method"] for p in points})
    for j, method in enumerate(methods):
        mine = [p for p in points if p["method"] == method]
        ax.errorbar(
            [p["kv_before"] for p in mine], [p["accuracy"] for p in mine],
            yerr=[[p["accuracy"] - _lo(p, p["accuracy"]) for p in mine],
                  [_hi(p, p["accuracy"]) - p["accuracy"] for p in mine]],
            fmt=markers[j % len(markers)], markersize=9 - 3 * (j % 2), capsize=2, alpha=0.85,
            label=method, linestyle="none",
        )  # fmt: skip
    frontier = pareto_frontier([(p["kv_before"], p["accuracy"]) for p in points])
    if frontier:
        right = max(p["kv_before"] for p in points)
        line = [*frontier, (right, frontier[-1][1])]
        ax.step([x for x, _ in line], [y for _, y in line], where="post", color="k", lw=1,
                alpha=0.6, label="Pareto frontier")  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="KV tokens per problem (kv_before summed over depths)", ylabel="accuracy")
    ax.set(title="Accuracy vs KV cache (Pareto)", ylim=(-0.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    place_labels(ax, [(p["kv_before"], p["accuracy"], f"{p['method']} W={p['width']}") for p in points])
    data = [{"run_id": p["run_id"], "label": p["label"], "method": p["method"], "width": p["width"],
             "kv_before": p["kv_before"], "accuracy": p["accuracy"], "ci_low": p.get("accuracy_ci_low"),
             "ci_high": p.get("accuracy_ci_high"),
             "on_frontier": (p["kv_before"], p["accuracy"]) in frontier} for p in points]  # fmt: skip
    caption = ("The trade-off: accuracy against the mean KV per problem as the reference counts it; "
               "the line is the Pareto frontier.")  # fmt: skip
    return _save(plt, fig, out / "accuracy_vs_kv.png", caption, data)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats: none cheaper (x) and at least as accurate (y), by increasing x."""
    best = -1.0
    frontier = []
    for x, y in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if y > best:
            frontier.append((x, y))
            best = y
    return frontier


def place_labels(ax: Any, items: Sequence[tuple[float, float, str]], fontsize: int = 7) -> list[Any]:
    """Annotate each point where its text overlaps no label placed before it nor any point: the
    first free spot of a ring of offsets around the point (display pixels), else the last tried."""
    to_px = ax.transData.transform
    dots = [to_px((x, y)) for x, y, _ in items]
    placed: list[tuple[float, float, float, float]] = []
    texts = []
    char_w, line_h = fontsize * 0.62 * 1.53, fontsize * 1.6  # px at the figure's dpi, roughly
    for (x, y, text), (px, py) in zip(items, dots, strict=True):
        w = char_w * len(text)
        chosen: tuple[float, float, tuple[float, float, float, float]] | None = None
        for dx, dy in _OFFSETS:
            left = px + dx if dx >= 0 else px + dx - w
            box = (left, py + dy, left + w, py + dy + line_h)
            hits_dot = any(
                box[0] - 3 <= qx <= box[2] + 3 and box[1] - 3 <= qy <= box[3] + 3 for qx, qy in dots
            )
            if not hits_dot and not any(_overlap(box, b) for b in placed):
                chosen = (dx if dx >= 0 else dx - w, dy, box)
                break
        if chosen is None:
            shift = 6.0 + (line_h * len(placed)) % 60
            chosen = (6.0, shift, (px + 6, py + shift, px + 6 + w, py + shift + line_h))
        off_x, off_y, box = chosen
        placed.append(box)
        arrow = {"arrowstyle": "-", "lw": 0.4, "alpha": 0.5}
        at = (off_x, off_y)
        texts.append(
            ax.annotate(
                text, (x, y), textcoords="offset pixels", xytext=at, fontsize=fontsize, arrowprops=arrow
            )
        )
    return texts


_OFFSETS = [(dx, dy) for r in (6, 16, 28, 42) for dx, dy in ((r, r / 2), (r, -r - 8), (-r, r / 2),
            (-r, -r - 8), (0, r + 4), (0, -r - 14))]  # fmt: skip


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _ratios_vs_width(plt: Any, pairs: Sequence[dict[str, Any]], baseline: str, out: Path) -> Figure | None:
    """OTHER/BASE ratios against width, one line per other method: KV (left) and time (right)."""
    if not pairs:
        return None
    fig, (kv, sec) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in pairs:
        series[f"{without_width(row['other_label'], row['width'])} / {baseline}"].append(row)
    data = []
    for i, (label, rows) in enumerate(sorted(series.items())):
        rows.sort(key=lambda r: r["width"])
        for ax, names in ((kv, ("kv_before", "kv_peak")), (sec, ("seconds",))):
            for k, name in enumerate(names):
                got = [r for r in rows if r[f"{name}_ratio"] is not None]
                if not got:
                    continue
                xs = [r["width"] * _dodge(i * len(names) + k, len(series) * len(names)) for r in got]
                ys = [r[f"{name}_ratio"] for r in got]
                lows = [r[f"{name}_ratio_ci_low"] or y for r, y in zip(got, ys, strict=True)]
                highs = [r[f"{name}_ratio_ci_high"] or y for r, y in zip(got, ys, strict=True)]
                err = [
                    [y - lo for y, lo in zip(ys, lows, strict=True)],
                    [h - y for y, h in zip(ys, highs, strict=True)],
                ]
                ax.errorbar(xs, ys, yerr=err, marker="os"[k % 2], capsize=3, label=f"{name}: {label}")
        data += [{"pair": label, "width": r["width"], "base_run": r["base_run"], "other_run": r["other_run"],
                  "n_common": r["n_common"], **{f"{n}{s}": r[f"{n}_ratio{s}"]
                  for n in ("kv_before", "kv_peak", "seconds") for s in ("", "_ci_low", "_ci_high")}}
                 for r in rows]  # fmt: skip
    for ax, title in ((kv, "KV ratio vs width (95% CI)"), (sec, "Time ratio vs width (95% CI)")):
        ax.axhline(1.0, color="k", lw=0.8, alpha=0.5)
        _width_axis(ax, series)
        ax.set(xlabel="width W", ylabel=f"other / {baseline}", title=title)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    caption = (f"Ratios of the mean per problem against {baseline} at each width (below 1: a saving), "
               "with paired bootstrap 95% intervals over the problems both runs finished.")  # fmt: skip
    return _save(plt, fig, out / "ratio_vs_width.png", caption, data)


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
    data = [{"depth": d.depth, "n": d.problems, "kv_before": d.kv_before, "kv_after": d.kv_after,
             "kept_fraction": d.kept_fraction, "clusters": d.clusters} for d in depths]  # fmt: skip
    return _save(plt, fig, out / name, f"ETS pruning per depth, {_run_title(run)}.", data)


def _time_split(depths: list[DepthFigures], n_problems: int) -> dict[str, list[float]]:
    """Per depth, ms per finished problem in expand / score / select / commit / other: the parts add up
    to the depth's wall time, and the depths to the run's seconds per problem (steps stored before
    etsq measured wall time have no `other`)."""
    n = max(n_problems, 1)
    out: dict[str, list[float]] = {name: [] for name in (*TIME_PARTS, "other")}
    for d in depths:
        sums = d.time_sums or {}
        parts = {name: (sums.get(name) or 0.0) / n for name in TIME_PARTS}
        wall = sums.get("wall")
        for name, value in parts.items():
            out[name].append(value)
        out["other"].append(max(0.0, wall / n - sum(parts.values())) if wall is not None else 0.0)
    return out


def _time_axis(ax: Any, run: dict[str, Any], depths: list[DepthFigures]) -> list[dict[str, Any]]:
    split = _time_split(depths, run["n_problems"])
    xs = [d.depth for d in depths]
    bottom = [0.0] * len(depths)
    for label, values in split.items():
        ax.bar(xs, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    total_ms = sum(bottom)
    measured = run.get("seconds")
    shown = f"sum {total_ms / 1000:.3g} s" + (f" of {measured:.3g} s measured" if measured else "")
    ax.set(xlabel="depth", ylabel="ms per problem", title=f"Time per depth, {_short(run)} ({shown})")
    ax.title.set_fontsize(9)
    ax.legend(fontsize="x-small")
    return [
        {"run_id": run["run_id"], "depth": x, **{k: v[i] for k, v in split.items()}} for i, x in enumerate(xs)
    ]


def _time_depths(plt: Any, run: dict[str, Any], depths: list[DepthFigures], out: Path) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    data = _time_axis(ax, run, depths)
    name = f"time_run{run['run_id']}.png"
    caption = f"Time per depth split into expand / score / select / commit / other, {_run_title(run)}."
    return _save(plt, fig, out / name, caption, data)


def _width_figure(
    plt: Any, width: int, runs: Sequence[dict[str, Any]], depths: dict[int, list[DepthFigures]], out: Path
) -> Figure:
    """One width: every method's KV per depth on one chart (n problems per depth written at each point),
    then each run's time per depth split into its parts."""
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.6 * (1 + len(runs)), 3.8), squeeze=False)
    kv = axes[0][0]
    data: list[dict[str, Any]] = []
    for k, run in enumerate(runs):
        ds = depths[run["run_id"]]
        xs = [d.depth for d in ds]
        line = kv.plot(xs, [d.kv_before for d in ds], marker="o", label=f"{_short(run)} before")[0]
        kv.plot(
            xs,
            [d.kv_after for d in ds],
            marker="s",
            ls="--",
            color=line.get_color(),
            label=f"{_short(run)} kept",
        )
        for d in ds:
            kv.annotate(
                f"n={d.problems}",
                (d.depth, d.kv_before),
                textcoords="offset points",
                xytext=(0, 6 if k % 2 == 0 else -12),
                fontsize=6,
                ha="center",
                color=line.get_color(),
            )
        data += [{"run_id": run["run_id"], "method": run["method"], "depth": d.depth, "n": d.problems,
                  "kv_before": d.kv_before, "kv_after": d.kv_after} for d in ds]  # fmt: skip
    kv.set(xlabel="depth", ylabel="KV tokens (mean per problem)", title=f"KV per depth, W={width}")
    kv.legend(fontsize="x-small")
    kv.grid(alpha=0.3)
    for ax, run in zip(axes[0][1:], runs, strict=True):
        for row in _time_axis(ax, run, depths[run["run_id"]]):
            data.append({"part": "time", **row})
    caption = (
        f"W={width}: KV per depth of each method (n: problems that reached the depth), and time per "
        "depth split into expand / score / select / commit / other, adding up to the measured time."
    )
    return _save(plt, fig, out / f"width_{width}.png", caption, data)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _label(row: dict[str, Any]) -> str:
    return str(row.get("label") or f"{row['method']} W={row['width']}")


def _short(run: dict[str, Any]) -> str:
    return f"run {run['run_id']} {run['method']}"


def _run_title(run: dict[str, Any]) -> str:
    return f"run {run['run_id']} ({_label(run)}, {run['dataset']})"


def _save(
    plt: Any, fig: Any, path: Path, caption: str, data: Sequence[dict[str, Any]] | None = None
) -> Figure:
    fig.tight_layout()
    try:
        with atomic_file(path, binary=True) as handle:
            fig.savefig(handle, dpi=_DPI, format="png")
    finally:
        plt.close(fig)
    csv_name = None
    if data:
        csv_name = path.with_suffix(".csv").name
        atomic_write_text(path.with_suffix(".csv"), _csv(data))
    return Figure(path.name, caption, csv_name)


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


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
.study td { white-space: nowrap; }
a.data { font-size: 11px; }
.note { background: #fff6d6; padding: 4px 8px; border-left: 3px solid #e0b000; }
"""


def _figures_html(figures: Sequence[Figure]) -> str:
    return "".join(
        f'<figure><img src="{html.escape(f.file)}" alt="{html.escape(f.caption)}">'
        f"<figcaption>{html.escape(f.caption)}"
        + (f' <a class="data" href="{html.escape(f.csv)}">data (CSV)</a>' if f.csv else "")
        + "</figcaption></figure>"
        for f in figures
    )


_STUDY_COLUMNS = (
    ("W", "width"), ("base run", "base_run"), ("other run", "other_run"), ("n", "n_common"),
    ("acc base", "accuracy_base"), ("acc other", "accuracy_other"), ("acc diff", "accuracy_diff"),
    ("kv_before ratio", "kv_before_ratio"), ("kv_peak ratio", "kv_peak_ratio"),
    ("seconds ratio", "seconds_ratio"),
)  # fmt: skip


def _study_table(pairs: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in _STUDY_COLUMNS)
    body = ""
    for row in pairs:
        cells = []
        for _, key in _STUDY_COLUMNS:
            value = row.get(key)
            if key == "other_run":
                value = f"{value} ({row['other_label']})"
            text = _cell(value)
            low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
            if low is not None and high is not None:
                text += f" [{low:.3f}, {high:.3f}]"
            cells.append(f"<td>{text}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    return f'<table class="study"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


Rows = Sequence[dict[str, Any]]


def _page(
    rows: Rows, sections: Sequence[tuple[str, Sequence[Figure]]], pairs: Rows, unpaired: Rows,
    baseline: str, agg: str, vote: str,
) -> str:  # fmt: skip
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in partial_notes(rows))
    simulated = sorted({(r["run_id"], shown_label(r)) for r in rows if r.get("backend") == "sim"})
    if simulated:
        listed = ", ".join(f"run {i} ({label})" for i, label in simulated)
        shown = f"Simulated runs (sim backend, synthetic models, not a model's results): {listed}"
        notes += f'<p class="note sim">{html.escape(shown)}</p>'
    for u in unpaired:
        line = f"run {u['run_id']} ({u['label']}) not paired: {u['reason']}"
        notes += f'<p class="note">{html.escape(line)}</p>'
    body = ""
    for title, figures in sections:
        if figures:
            body += f"<h2>{html.escape(title)}</h2>{_figures_html(figures)}"
    if pairs:
        body = body.replace("</h2>", "</h2>" + _study_table(pairs), 1)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sim = sim_note(rows)
    title = html.escape(f"etsq report ({sim})" if sim else "etsq report")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{len({r['run_id'] for r in rows})} runs; answers chosen by <b>{agg}</b> step aggregation and "
        f"<b>{vote}</b> vote; other methods paired with <b>{html.escape(baseline)}</b> at each width; "
        f"written "
        f'{stamp}. Figures are means per finished problem (README, "Results"); intervals are bootstrap 95% '
        f"intervals over problems ({RESAMPLES} resamples).</p>{notes}"
        f"{body or '<p>No run has results to plot yet.</p>'}"
        f"<h2>Results{html.escape(f' ({sim})' if sim else '')}</h2>{_table(rows)}</body></html>"
    )


def write_report(
    store: Store,
    wanted: list[int] | None,
    out: Path,
    agg: str,
    vote: str,
    runs: RunFilter | None = None,
    baseline: str = "rebase",
) -> list[Path]:
    """Write `out/index.html` and its plots (each with its data as CSV); returns the files, index.html
    first.  The page answers the study first (ratios against width, accuracy against width, the
    Pareto plot), then each width (KV and time per depth of the paired runs), then each run.

    Each file is written beside its target and renamed into place, the page after its plots: a
    failed report leaves no half-written file, and the page never names a plot that is missing.
    """
    combos = combos_of([agg], [vote])
    results = evaluate_runs(store, wanted, combos, runs)
    rows = []
    for r in results:
        [row] = summarise(r.run, r.records, r.counts, combos)
        if r.records:
            idx = bootstrap_indices(len(r.records))
            row["accuracy_ci_low"], row["accuracy_ci_high"] = mean_interval(
                [float(x.correct[0]) for x in r.records], idx
            )
        rows.append(row)
    ids = tuple(r["run_id"] for r in rows)
    pairs: list[dict[str, Any]] = []
    unpaired: list[dict[str, Any]] = []
    if ids and any(r["method"] == baseline for r in rows):
        result = study(store, RunFilter(runs=ids), [agg], [vote], baseline)
        pairs, unpaired = result["rows"], result["unpaired"]
    with store.session() as s:
        depths = {row["run_id"]: depth_profile(s, row["run_id"]) for row in rows}
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    by_id = {row["run_id"]: row for row in rows}
    top = [_ratios_vs_width(plt, pairs, baseline, out), _accuracy_vs_width(plt, rows, out),
           _accuracy_vs_kv(plt, rows, out)]  # fmt: skip
    per_width = []
    in_width: set[int] = set()
    for width in sorted({p["width"] for p in pairs}):
        ids_here = list(
            dict.fromkeys(i for p in pairs if p["width"] == width for i in (p["other_run"], p["base_run"]))
        )
        runs_here = [by_id[i] for i in ids_here if depths.get(i)]
        if runs_here:
            per_width.append(_width_figure(plt, width, runs_here, depths, out))
            in_width.update(r["run_id"] for r in runs_here)
    per_run = []
    for row in rows:
        if depths[row["run_id"]] and row["method"] == "ets":
            per_run.append(_ets_depths(plt, row, depths[row["run_id"]], out))
    for row in rows:
        if depths[row["run_id"]] and row["run_id"] not in in_width:
            per_run.append(_time_depths(plt, row, depths[row["run_id"]], out))
    sections = [
        (f"The answer: savings against {baseline} by width", [f for f in top if f]),
        ("Per width", per_width),
        ("Per run", per_run),
    ]
    figures = [f for _, fs in sections for f in fs]
    index = out / "index.html"
    atomic_write_text(
        index, _page(rows, sections, pairs, unpaired, baseline, agg, vote)
    )  # last: its plots are in place
    return [index, *(out / f.file for f in figures), *(out / f.csv for f in figures if f.csv)]
