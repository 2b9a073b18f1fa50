"""A Python API for notebooks: a database's runs, results table and study as pandas DataFrames, and
one problem's search tree as a networkx graph or plain records.

    import etsq
    db = etsq.open("sqlite:///etsq.db")          # any SQLAlchemy URL; nothing is written
    db.runs()                                    # one row per run: id, label, status, counts
    db.results(agg="all")                        # the `etsq aggregate` table
    db.study(baseline="rebase")                  # the `etsq study` rows: ratios and intervals
    db.tree(3, "gsm8k-0")                        # networkx.DiGraph (records=True: a list of dicts)

pandas and networkx are the `notebook` extra (`pip install etsq[notebook]`); the records need neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etsq.results.evaluate import evaluate
from etsq.results.study import DEFAULT_BASELINE
from etsq.results.study import study as run_study
from etsq.results.table import ProblemFilter, RunFilter
from etsq.results.tree import problem_list, tree_records
from etsq.store.runs import statuses
from etsq.store.session import Store


def _frame(rows: Sequence[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - the extra is installed in the tests
        raise ImportError("etsq's notebook API needs pandas: pip install 'etsq[notebook]'") from None
    return pd.DataFrame(list(rows))


def _choices(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class Database:
    """One database's results, read offline (graded from stored nodes, as the CLI does)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store = Store.open(url)

    def runs(self, runs: Sequence[int] | None = None) -> Any:
        """One row per run, as `etsq status --json` gives it."""
        with self.store.session() as s:
            return _frame(statuses(s, list(runs) if runs else None))

    def results(
        self,
        runs: Sequence[int] | None = None,
        agg: str | Sequence[str] | None = None,
        vote: str | Sequence[str] | None = None,
        dataset: str | Sequence[str] | None = None,
        method: str | Sequence[str] | None = None,
        level: str | Sequence[str] | None = None,
        subject: str | Sequence[str] | None = None,
    ) -> Any:
        """The results table (`etsq aggregate --json`), one row per run and agg x vote."""
        rows = evaluate(
            self.store, list(runs) if runs else None, _choices(agg), _choices(vote),
            RunFilter(datasets=_choices(dataset), methods=_choices(method)),
            ProblemFilter(levels=_choices(level), subjects=_choices(subject)),
        )  # fmt: skip
        return _frame(rows)

    def study(
        self,
        runs: Sequence[int] | None = None,
        baseline: str = DEFAULT_BASELINE,
        agg: str | Sequence[str] | None = None,
        vote: str | Sequence[str] | None = None,
        resamples: int = 10_000,
    ) -> Any:
        """The study (`etsq study --json`'s rows): one row per pair and agg x vote; the runs that
        could not be paired are in the frame's `attrs["unpaired"]`."""
        result = run_study(
            self.store, RunFilter(runs=tuple(runs or ())), _choices(agg), _choices(vote), baseline, resamples
        )
        frame = _frame(result["rows"])
        frame.attrs["unpaired"] = result["unpaired"]
        frame.attrs["bootstrap"] = result["bootstrap"]
        return frame

    def problems(self, run: int) -> Any:
        """The run's problems: index, id, status and whether a finished one's answer is correct."""
        return _frame(problem_list(self.store, run))

    def tree(self, run: int, problem: str | int, records: bool = False) -> Any:
        """One problem's search tree (by id or index): a networkx DiGraph whose nodes carry the
        stored figures (edges parent -> child), or with `records=True` a list of plain dicts."""
        nodes = tree_records(self.store, run, str(problem))
        if records:
            return nodes
        import networkx as nx

        graph = nx.DiGraph(run=run, problem=str(problem))
        for node in nodes:
            graph.add_node(node["id"], **node)
            if node["parent"] is not None:
                graph.add_edge(node["parent"], node["id"])
        return graph


def open_database(url: str) -> Database:
    """The results of the database at `url` (`etsq.open`)."""
    return Database(url)
