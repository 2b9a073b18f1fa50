"""Best-of-N: W independent samples, no tree; every live trajectory gets exactly one child.

The loop expands the root into W children; from depth 1 on, each frontier node is one live
trajectory and is continued by exactly one child, so the search finishes W leaves. The loop
calls select with `remaining` equal to the number of live trajectories (`len(frontier)`);
scores are stored per step for aggregation but never used to prune.
"""

from __future__ import annotations

from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, Selection
from etsq.search.tree import Tree


def select(
    tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
) -> Selection:
    """One child per frontier node (the loop gives the root all W at the first expansion)."""
    return Selection(counts={idx: 1 for idx in frontier})
