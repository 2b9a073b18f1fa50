"""Live status of runs: a progress bar per run with running depths, nodes/s and an ETA.

On a terminal the done/total count comes first and is never cut (a narrow terminal squeezes the
label and the figures instead); without one (a pipe, a log file) each run gets one plain line
whenever its counts change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column

from etsq.store.labels import shown_label
from etsq.store.runs import mean_job_seconds, run_ids, run_summary, running_depths
from etsq.store.session import Store
from etsq.store.statuses import RunStatus


def _eta(summary: dict[str, Any], mean_s: float | None) -> str:
    left = summary["problems_queued"] + summary["problems_running"]
    if not left or mean_s is None:
        return "-"
    seconds = left * mean_s / max(1, summary["problems_running"])
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def snapshot(store: Store, wanted: list[int] | None) -> list[dict[str, Any]]:
    with store.session() as s:
        rows = []
        for rid in run_ids(s, wanted):
            row = run_summary(s, rid)
            row["depths"] = running_depths(s, rid)
            row["eta"] = _eta(row, mean_job_seconds(s, rid))
            rows.append(row)
        return rows


class Watch:
    """Redraws every `interval` seconds until every watched run is finished."""

    def __init__(
        self,
        store: Store,
        wanted: list[int] | None,
        interval: float = 2.0,
        console: Console | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.store, self.wanted, self.interval = store, wanted, interval
        self.console = console or Console()
        self.echo = echo
        self.last: dict[int, tuple[float, int]] = {}
        self.printed: dict[int, tuple[Any, ...]] = {}

    def _rate(self, row: dict[str, Any]) -> float:
        now, nodes = time.monotonic(), row["nodes"]
        then, before = self.last.get(row["run_id"], (now, nodes))
        self.last[row["run_id"]] = (now, nodes)
        return (nodes - before) / (now - then) if now > then else 0.0

    def render(self, rows: list[dict[str, Any]]) -> Group:
        width = max((len(f"{r['problems']}/{r['problems']}") for r in rows), default=3)
        # The count first and whole; the label and figures share what is left, cut at the end.
        bars = Progress(
            TextColumn("{task.fields[count]}", table_column=Column(no_wrap=True, min_width=width)),
            BarColumn(bar_width=16),
            TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            console=self.console,
        )
        for row in rows:
            done = row["problems_done"] + row["problems_failed"] + row["problems_cancelled"]
            extra = (
                f"failed {row['problems_failed']}  running {row['problems_running']} "
                f"(depths {row['depths'] or '-'})  {self._rate(row):.1f} nodes/s  ETA {row['eta']}"
            )
            label = f"run {row['run_id']} {shown_label(row)} {row['dataset']} [{row['status']}]"
            count = f"{done}/{row['problems']}"
            bars.add_task(f"{label}  {extra}", total=row["problems"], completed=done, count=count)
        return Group(bars)

    def lines(self, rows: list[dict[str, Any]]) -> list[str]:
        """One plain line per run whose counts changed since the last call."""
        out = []
        for row in rows:
            counts = tuple(row[k] for k in ("status", "problems_done", "problems_failed", "problems_running",
                                            "problems_cancelled"))  # fmt: skip
            if self.printed.get(row["run_id"]) == counts:
                continue
            self.printed[row["run_id"]] = counts
            done = row["problems_done"] + row["problems_failed"] + row["problems_cancelled"]
            out.append(
                f"run {row['run_id']}: {done}/{row['problems']} {row['status']} "
                f"(done {row['problems_done']}, failed {row['problems_failed']}, running "
                f"{row['problems_running']}, cancelled {row['problems_cancelled']}) "
                f"{shown_label(row)} {row['dataset']}"
            )
        return out

    def run(self) -> None:
        rows = snapshot(self.store, self.wanted)
        if not self.console.is_terminal:
            self._plain(rows)
            return
        with Live(self.render(rows), refresh_per_second=4, console=self.console) as live:
            while any(RunStatus(r["status"]).active for r in rows):
                time.sleep(self.interval)
                rows = snapshot(self.store, self.wanted)
                live.update(self.render(rows))

    def _plain(self, rows: list[dict[str, Any]]) -> None:
        while True:
            for line in self.lines(rows):
                self.echo(line)
            if not any(RunStatus(r["status"]).active for r in rows):
                return
            time.sleep(self.interval)
            rows = snapshot(self.store, self.wanted)
