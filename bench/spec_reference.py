"""The reference implementation's ETS select as `../shared/spec/ETS.md` describes it, written plainly
for the select bench to time etsq against (not the reference's code, which is not ours to copy).

What the reference does, step for step:
- REBASE's child counts over the whole frontier (`w_i = exp(s_i / T)`, `n_i = ceil(left * w_i /
  mass)` down the sorted list), normalised to sum 1: the outcome `O_i`;
- the newest steps' embeddings clustered by scipy's agglomerative clustering (`linkage` with
  average linkage on cosine distance, `fcluster` cut at distance 0.05);
- the literal program built in pulp, one variable and one constraint at a time: `x_i` per frontier
  node, `y_j` per ancestor, `c_k` per cluster; `y_j >= x_i` below j, `y_j <= sum x_i` below j,
  `c_k <= sum x_i` in k, `sum x_i >= 1`; uniform cost `1 / (M + N)`;
- solved by pulp's default solver (CBC), then REBASE again over the kept nodes.

etsq's select takes the same steps with the same program, so both give the same child counts
wherever the program's optimum is unique; where it is not, each may keep another optimal set (the
bench counts the frontiers whose counts differ, and checks that both kept sets score the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pulp
from scipy.cluster.hierarchy import fcluster, linkage

from etsq.search.tree import Tree


def rebase_counts(scores: Sequence[float], remaining: int, temperature: float) -> list[int]:
    """REBASE's allocation as the spec states it."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    top = max(scores)
    weights = {i: math.exp((scores[i] - top) / temperature) for i in order}  # shifted: no overflow
    mass = sum(weights.values())
    left = remaining
    counts = [0] * len(scores)
    for i in order:
        if left <= 0:
            break
        n = min(left, math.ceil(left * weights[i] / mass))
        counts[i] = n
        left -= n
        mass -= weights[i]
    return counts


def clusters(embeddings: np.ndarray, threshold: float) -> list[int]:
    """Agglomerative clusters, average linkage on cosine distance, cut at `threshold`."""
    merges = linkage(embeddings, method="average", metric="cosine")
    return [int(k) - 1 for k in fcluster(merges, threshold, criterion="distance")]


def _ancestors(tree: Tree, frontier: Sequence[int]) -> dict[int, list[int]]:
    """Every ancestor of the frontier, with the frontier positions below it."""
    below: dict[int, list[int]] = {}
    for pos, idx in enumerate(frontier):
        parent = tree.nodes[idx].parent
        while parent is not None:
            below.setdefault(parent, []).append(pos)
            parent = tree.nodes[parent].parent
    return below


def program_keeps(
    tree: Tree,
    frontier: Sequence[int],
    outcome: Sequence[float],
    cluster_ids: Sequence[int] | None,
    lambda_b: float,
    lambda_s: float,
) -> list[bool]:
    """The kept frontier positions: the literal program, built in pulp and solved by CBC."""
    below = _ancestors(tree, frontier)
    cost = 1.0 / (len(below) + len(frontier))
    prob = pulp.LpProblem("ets", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x_{p}", cat="Binary") for p in range(len(frontier))]
    y = {j: pulp.LpVariable(f"y_{j}", cat="Binary") for j in below}
    objective: Any = pulp.lpSum(o * xi for o, xi in zip(outcome, x, strict=True))
    objective -= lambda_b * cost * (pulp.lpSum(y.values()) + pulp.lpSum(x))
    for j, positions in below.items():
        for p in positions:
            prob += y[j] >= x[p]
        prob += y[j] <= pulp.lpSum(x[p] for p in positions)
    if cluster_ids is not None:
        members: dict[int, list[int]] = {}
        for p, k in enumerate(cluster_ids):
            members.setdefault(k, []).append(p)
        c = {k: pulp.LpVariable(f"c_{k}", cat="Binary") for k in members}
        objective += lambda_s / len(members) * pulp.lpSum(c.values())
        for k, positions in members.items():
            prob += c[k] <= pulp.lpSum(x[p] for p in positions)
    prob += pulp.lpSum(x) >= 1
    prob += objective
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    return [(xi.value() or 0.0) > 0.5 for xi in x]


def select(
    tree: Tree,
    frontier: Sequence[int],
    remaining: int,
    embeddings: np.ndarray,
    *,
    temperature: float,
    threshold: float,
    lambda_b: float,
    lambda_s: float,
) -> tuple[list[int], list[bool]]:
    """Child counts per frontier position, as the reference's select hands them out, and the
    positions its program kept."""
    scores = [float(tree.nodes[i].score or 0.0) for i in frontier]
    counts = rebase_counts(scores, remaining, temperature)
    outcome = [n / sum(counts) for n in counts]
    texts = [tree.nodes[i].text for i in frontier]
    coverage = lambda_s > 0 and len(frontier) > 1 and len(set(texts)) > 1
    cluster_ids = clusters(embeddings, threshold) if coverage else None
    keep = program_keeps(tree, frontier, outcome, cluster_ids, lambda_b, lambda_s)
    kept = [p for p, k in enumerate(keep) if k]
    out = [0] * len(frontier)
    for p, n in zip(kept, rebase_counts([scores[p] for p in kept], remaining, temperature), strict=True):
        out[p] = n
    return out, keep
