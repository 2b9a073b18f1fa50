"""Beam search: keep the top k frontier nodes by score, each continued by ceil(remaining / k).

`k` is `cfg.beam_k` when set, else `ceil(sqrt(remaining))` (the reference's default). Every kept
node gets the same `ceil(remaining / k)` children, so one depth may hand out up to k - 1 more
than `remaining` (and fewer when the frontier holds fewer than k nodes); finished leaves still
count against the width through `remaining`. Ties in score keep frontier order.
"""

from __future__ import annotations

import math

from etsq.errors import ConfigError
from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, Selection
from etsq.search.methods.rebase import frontier_scores, score_order
from etsq.search.tree import Tree


def beam_count(remaining: int, beam_k: int | None) -> int:
    """How many frontier nodes a depth keeps."""
    if beam_k is not None:
        if beam_k <= 0:
            raise ConfigError(f"beam_k must be positive, got {beam_k}")
        return beam_k
    return max(1, math.ceil(math.sqrt(remaining)))


def select(
    tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
) -> Selection:
    """Top-k by score, each with ceil(remaining / k) children."""
    counts = {idx: 0 for idx in frontier}
    k = beam_count(remaining, cfg.beam_k)
    per_node = math.ceil(remaining / k)
    for pos in score_order(frontier_scores(tree, frontier))[:k]:
        counts[frontier[pos]] = per_node
    return Selection(counts=counts, info={"beam_k": k, "per_node": per_node})
