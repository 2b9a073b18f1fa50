"""REBASE: reward-balanced allocation of the remaining width over the frontier.

The frontier is sorted by PRM score, descending (ties keep frontier order: Python's sort is
stable). Weights are `w_i = exp(s_i / T)`, computed as `exp((s_i - s_max) / T)` so that no
weight overflows; the common factor cancels in every ratio below. Walking the sorted list with
`left = remaining` and `mass = sum of the weights not yet visited`, node i gets
`n_i = ceil(left * w_i / mass)`, then `left -= n_i`.

`mass` is taken from suffix sums rather than by repeated subtraction (`mass -= w_i`): the two are
equal in exact arithmetic, but the suffix sums cannot drift below the last weight, so the last
node always receives exactly what is left and the walk hands out exactly `remaining` children.

The helpers at the top (scores, score order) are shared by the other method modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from etsq.errors import PermanentError
from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, Selection
from etsq.search.tree import Tree

# A ratio within this much above an integer >= 1 is float noise from exp/division, not a real
# excess: ceil would otherwise hand out one extra child (e.g. 2.0000000000000004 -> 3).
_CEIL_SLACK = 1e-9


def frontier_scores(tree: Tree, frontier: Sequence[int]) -> list[float]:
    """PRM scores of the frontier nodes, in frontier order."""
    scores: list[float] = []
    for idx in frontier:
        score = tree.nodes[idx].score
        if score is None or math.isnan(score):
            raise PermanentError(f"frontier node {idx} has no PRM score; cannot select")
        scores.append(float(score))
    return scores


def score_order(scores: Sequence[float]) -> list[int]:
    """Positions sorted by score, best first; equal scores keep their original order."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _ceil(ratio: float) -> int:
    n = math.ceil(ratio)
    if n > 1 and n - ratio > 1.0 - _CEIL_SLACK:
        return n - 1
    return n


def _suffix_sums(values: Sequence[float]) -> list[float]:
    out = [0.0] * len(values)
    acc = 0.0
    for k in range(len(values) - 1, -1, -1):
        acc += values[k]
        out[k] = acc
    return out


def rebase_allocate(scores: Sequence[float], remaining: int, temperature: float) -> list[int]:
    """REBASE's child count per position of `scores`; the counts sum to max(remaining, 0)."""
    counts = [0] * len(scores)
    if remaining <= 0 or not scores:
        return counts
    order = score_order(scores)
    top = scores[order[0]]
    weights = [math.exp((scores[i] - top) / temperature) for i in order]
    masses = _suffix_sums(weights)
    left = remaining
    for k, pos in enumerate(order):
        if left <= 0:
            break
        # masses[k] > 0 whenever left > 0: the last positive weight takes everything left.
        n = left if masses[k] <= 0.0 else min(left, _ceil(left * weights[k] / masses[k]))
        counts[pos] = n
        left -= n
    return counts


def select(
    tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
) -> Selection:
    """REBASE over the whole frontier."""
    counts = rebase_allocate(frontier_scores(tree, frontier), remaining, cfg.softmax_temp)
    return Selection(counts=dict(zip(frontier, counts, strict=True)))
