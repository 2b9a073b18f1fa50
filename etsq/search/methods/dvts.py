"""DVTS (diverse verifier tree search): independent greedy subtrees that split the width.

Precise reading used here (stateless: everything is recomputed from the tree at each select):

- Subtree count: `S = cfg.dvts_subtrees` if set, else `ceil(sqrt(W))`, capped at the number of
  depth-1 nodes so that no subtree starts empty.
- Subtrees: the depth-1 nodes, in creation order (node index), are cut into S contiguous
  groups whose sizes differ by at most one, larger groups first (the reference's split). A
  node's subtree is the group of its depth-1 ancestor (`tree.subtree_root`).
- Width: subtree g owns `W // S` of the width, plus one for the first `W % S` subtrees (the
  reference floors and loses the remainder; distributing it keeps the total at W). Its width
  left is that share minus its finished leaves (terminal nodes of any depth in the subtree;
  the reference misses the depth-1 ones), so the widths left sum to the loop's `remaining`.
- Keep: at depth 1, the best node of each group; deeper, the best child of each parent inside
  the subtree (greedy beam of one per parent). Ties keep frontier order.
- Children: a subtree's width left goes to its kept node. A subtree only ever has one kept
  node in the loop; should it have several (a hand-built tree), its width is split evenly,
  the remainder to the better-scored ones, so a subtree never exceeds its width.
  A subtree with no width left gets 0 children; the width of a subtree without frontier
  nodes is not passed on (the subtrees are independent).
"""

from __future__ import annotations

import math
from collections import defaultdict

from etsq.errors import ConfigError
from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, Selection
from etsq.search.methods.rebase import frontier_scores, score_order
from etsq.search.tree import Tree


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` cut into `parts` integers differing by at most one, larger first."""
    base, extra = divmod(total, parts)
    return [base + (1 if g < extra else 0) for g in range(parts)]


def subtree_count(width: int, fixed: int | None, n_first_level: int) -> int:
    """S: the fixed count or ceil(sqrt(W)), never more than the depth-1 nodes."""
    if fixed is not None and fixed <= 0:
        raise ConfigError(f"dvts_subtrees must be positive, got {fixed}")
    wanted = fixed if fixed is not None else math.ceil(math.sqrt(width))
    return max(1, min(wanted, n_first_level))


def subtree_groups(tree: Tree, n_subtrees: int) -> dict[int, int]:
    """Depth-1 node idx -> subtree number, by contiguous runs in creation order."""
    first_level = sorted(tree.at_depth(1))
    groups: dict[int, int] = {}
    start = 0
    for g, size in enumerate(split_evenly(len(first_level), n_subtrees)):
        for idx in first_level[start : start + size]:
            groups[idx] = g
        start += size
    return groups


def widths_left(tree: Tree, groups: dict[int, int], width: int, n_subtrees: int) -> list[int]:
    """Each subtree's share of W minus its finished leaves."""
    left = split_evenly(width, n_subtrees)
    for leaf in tree.leaves():
        if tree.nodes[leaf].depth >= 1:
            left[groups[tree.subtree_root(leaf)]] -= 1
    return left


def _best_per_unit(tree: Tree, frontier: list[int], scores: list[float], group_of: list[int]) -> list[int]:
    """Frontier positions kept: best per group at depth 1, best per parent deeper."""
    best: dict[tuple[int, int], int] = {}
    for pos in score_order(scores):
        node = tree.nodes[frontier[pos]]
        parent = -1 if node.depth == 1 or node.parent is None else node.parent
        unit = (group_of[pos], parent)
        best.setdefault(unit, pos)  # score order: the first seen is the best
    return sorted(best.values())


def _allocate(kept: list[int], scores: list[float], group_of: list[int], left: list[int]) -> dict[int, int]:
    """Frontier position -> children: each subtree's width over its kept nodes."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for pos in sorted(kept, key=lambda p: -scores[p]):
        by_group[group_of[pos]].append(pos)
    counts: dict[int, int] = {}
    for g, members in by_group.items():
        for pos, n in zip(members, split_evenly(max(left[g], 0), len(members)), strict=True):
            counts[pos] = n
    return counts


def select(
    tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
) -> Selection:
    """Greedy one-per-parent selection inside each of S independent subtrees."""
    n_first = len(tree.at_depth(1))
    n_subtrees = subtree_count(cfg.width, cfg.dvts_subtrees, n_first)
    groups = subtree_groups(tree, n_subtrees)
    left = widths_left(tree, groups, cfg.width, n_subtrees)
    scores = frontier_scores(tree, frontier)
    group_of = [groups[tree.subtree_root(idx)] for idx in frontier]
    kept = _best_per_unit(tree, frontier, scores, group_of)
    by_pos = _allocate(kept, scores, group_of, left)
    counts = {idx: by_pos.get(pos, 0) for pos, idx in enumerate(frontier)}
    return Selection(counts=counts, info={"subtrees": n_subtrees, "subtree_widths": left})
