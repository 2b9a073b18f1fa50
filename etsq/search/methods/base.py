"""The select interface every search method implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

from etsq.search.config import SearchConfig
from etsq.search.tree import Tree


class Embedder(Protocol):
    """Sentence embeddings for ETS's semantic clusters (one row per text)."""

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class SelectContext:
    """What a select step may use besides the tree: the embedder and a seeded RNG."""

    embedder: Embedder | None = None
    rng: np.random.Generator = field(default_factory=lambda: _default_rng())


@dataclass
class Selection:
    """A select step's decision: children per frontier node (0 = pruned) and diagnostics.

    `info` carries method-specific figures that are stored with the selection row, e.g. for
    ETS: ilp_vars, ilp_constraints, ilp_objective, solver, solve_ms, cluster_ms, n_clusters.
    """

    counts: dict[int, int]  # frontier node idx -> number of children
    clusters: dict[int, int] = field(default_factory=dict)  # frontier node idx -> cluster id
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [i for i, n in self.counts.items() if n > 0]


class SelectFn(Protocol):
    """A method's select step.  The loop calls it only from depth 1 on, with a non-empty frontier
    and `remaining > 0` (the root's expansion and the end of the search are the loop's own)."""

    def __call__(
        self, tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
    ) -> Selection: ...


def _default_rng() -> np.random.Generator:
    import numpy as np  # here: the method registry is read by every command, numpy only by a search

    return np.random.default_rng(0)
