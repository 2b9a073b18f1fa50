"""Live status of runs: a progress bar per run with running depths, nodes/s and an ETA."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

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

    def __init__(self, store: Store, wanted: list[int] | None, interval: float = 2.0) -> None:
        self.store, self.wanted, self.interval = store, wanted, interval
        self.last: dict[int, tuple[float, int]] = {}

    def _rate(self, row: dict[str, Any]) -> float:
        now, nodes = time.monotonic(), row["nodes"]
        then, before = self.last.get(row["run_id"], (now, nodes))
        self.last[row["run_id"]] = (now, nodes)
        return (nodes - before) / (now - then) if now > then else 0.0

    def render(self, rows: list[dict[str, Any]]) -> Group:
        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
        )
        for row in rows:
            done = row["problems_done"] + row["problems_failed"] + row["problems_cancelled"]
            extra = (
                f"failed {row['problems_failed']}  running {row['problems_running']} "
                f"(depths {row['depths'] or '-'})  {self._rate(row):.1f} nodes/s  ETA {row['eta']}"
            )
            label = f"run {row['run_id']} {shown_label(row)} {row['dataset']} [{row['status']}]"
            bars.add_task(label, total=row["problems"], completed=done, extra=extra)
        return Group(bars)

    def run(self) -> None:
        rows = snapshot(self.store, self.wanted)
        with Live(self.render(rows), refresh_per_second=4) as live:
            while any(RunStatus(r["status"]).active for r in rows):
                time.sleep(self.interval)
                rows = snapshot(self.store, self.wanted)
                live.update(self.render(rows))
