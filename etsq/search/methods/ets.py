"""ETS: an integer program prunes the frontier, then REBASE allocates over the kept nodes.

1. `O_i`: REBASE's child count for node i over the whole frontier, normalised to sum 1.
2. Clusters: the newest step texts of the frontier, embedded and clustered (average linkage,
   cosine distance, cut at `cfg.cluster_threshold`). The coverage term is skipped when
   lambda_s == 0 (nothing is embedded; `Selection.clusters` stays empty), when N == 1 or when
   all newest steps are the same text (every node is then in cluster 0).
3. The program of `etsq.search.ilp` (reward - lambda_b * KV cost + lambda_s / K * coverage)
   picks the kept set; cost per node is uniform 1 / (M + N) or, with `cfg.cost == "tokens"`,
   the node's share of the candidate tree's tokens (both sum to 1, see `ilp.node_costs`).
4. REBASE's allocation runs again over the kept nodes only: pruned nodes get 0 children.

Ties in the program are completed towards keeping more nodes in REBASE order, so with
lambda_b = lambda_s = 0 ETS keeps every node and hands out exactly REBASE's counts.
`Selection.info` holds ilp_vars, ilp_constraints (of the model actually solved, 0 when no
solver was needed), ilp_objective (the literal program's objective at the kept set), solver
("highs", "trivial" or a pulp fallback), solve_ms (O_i, model, solve, tie completion),
cluster_ms (embedding included), n_clusters, and ilp_kept: the frontier nodes the program
kept. REBASE may still give some of those 0 children, so `Selection.kept` is a subset of
ilp_kept; the program's guarantees (a larger lambda_b never keeps a costlier set, a larger
lambda_s never covers fewer clusters) hold for ilp_kept, not always for `Selection.kept`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from etsq.errors import ConfigError
from etsq.search import ilp
from etsq.search.clusters import cluster_texts
from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, Selection
from etsq.search.methods.rebase import frontier_scores, rebase_allocate, score_order
from etsq.search.tree import Tree


def frontier_clusters(
    tree: Tree, frontier: list[int], cfg: SearchConfig, ctx: SelectContext
) -> tuple[list[int] | None, dict[int, int]]:
    """Cluster ids for the program (None: no coverage term) and per frontier node idx."""
    lambda_s = cfg.effective_lambda_s
    if lambda_s < 0:
        raise ConfigError(f"lambda_s must be >= 0, got {lambda_s}")
    if lambda_s == 0:
        return None, {}
    texts = [tree.nodes[i].text for i in frontier]
    if len(frontier) == 1 or len(set(texts)) == 1:
        return None, {i: 0 for i in frontier}
    ids = [int(k) for k in cluster_texts(texts, ctx.embedder, cfg.cluster_threshold)]
    return ids, dict(zip(frontier, ids, strict=True))


def _outcomes(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [n / total for n in counts]


def _info(solution: ilp.IlpSolution, cluster_ms: float, n_clusters: int, kept: list[int]) -> dict[str, Any]:
    return {
        "ilp_vars": solution.n_vars,
        "ilp_constraints": solution.n_constraints,
        "ilp_objective": solution.objective,
        "solver": solution.solver,
        "solve_ms": solution.solve_ms,
        "cluster_ms": cluster_ms,
        "n_clusters": n_clusters,
        "ilp_kept": kept,
    }


def _run_program(
    tree: Tree,
    frontier: list[int],
    scores: list[float],
    remaining: int,
    cfg: SearchConfig,
    cluster_ids: list[int] | None,
) -> ilp.IlpSolution:
    """O_i from REBASE, the program built and solved; solve_ms covers all of it."""
    t0 = time.perf_counter()
    outcome = _outcomes(rebase_allocate(scores, remaining, cfg.softmax_temp))
    problem = ilp.problem_from_tree(
        tree, frontier, outcome, cfg.cost, cluster_ids, cfg.lambda_b, cfg.effective_lambda_s
    )
    solution = ilp.solve(problem, order=score_order(scores))
    return replace(solution, solve_ms=(time.perf_counter() - t0) * 1000)


def _rebase_over_kept(
    frontier: list[int], scores: list[float], selected: tuple[bool, ...], remaining: int, temp: float
) -> dict[int, int]:
    """REBASE's allocation with pruned nodes left out (weight 0)."""
    kept_pos = [p for p, keep in enumerate(selected) if keep]
    counts = {i: 0 for i in frontier}
    for p, n in zip(kept_pos, rebase_allocate([scores[p] for p in kept_pos], remaining, temp), strict=True):
        counts[frontier[p]] = n
    return counts


def select(
    tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
) -> Selection:
    """Prune with the ETS program, then REBASE over the kept nodes."""
    scores = frontier_scores(tree, frontier)
    t0 = time.perf_counter()
    cluster_ids, clusters = frontier_clusters(tree, frontier, cfg, ctx)
    cluster_ms = (time.perf_counter() - t0) * 1000
    solution = _run_program(tree, frontier, scores, remaining, cfg, cluster_ids)
    counts = _rebase_over_kept(frontier, scores, solution.selected, remaining, cfg.softmax_temp)
    kept = [i for i, keep in zip(frontier, solution.selected, strict=True) if keep]
    info = _info(solution, cluster_ms, len(set(clusters.values())), kept)
    return Selection(counts=counts, clusters=clusters, info=info)
