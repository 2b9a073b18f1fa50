"""Aggregation: reduce step scores per trajectory and pick a problem's answer from its leaves.

Pure functions over stored data (no DB). A trajectory's step scores (root excluded) reduce by
`last | mean | prod | min`; a problem's answer is chosen among its finished leaves by best-of-N
(`bon`), plain `majority` vote or reward-`weighted` vote, with answers grouped by mathematical
equivalence (see `etsq.grading`), not string equality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from etsq.errors import ConfigError
from etsq.grading import is_equivalent

AGGS: tuple[str, ...] = ("last", "mean", "prod", "min")
VOTES: tuple[str, ...] = ("bon", "majority", "weighted")

_REDUCERS: dict[str, Callable[[Sequence[float]], float]] = {
    "last": lambda scores: scores[-1],
    "mean": lambda scores: sum(scores) / len(scores),
    "prod": math.prod,
    "min": min,
}


@dataclass(frozen=True)
class Leaf:
    """A finished trajectory: its extracted answer (None if it gave none) and step scores."""

    answer: str | None
    scores: tuple[float, ...]


@dataclass
class _Group:
    """Leaves whose answers are equivalent to `representative` (its first member's answer)."""

    representative: str
    count: int = 0
    total: float = 0.0


def aggregate_scores(scores: Sequence[float], how: str) -> float:
    """Reduce one trajectory's step scores (root excluded) by `how`; 0.0 for no steps."""
    _check_choice(how, AGGS, "score aggregation")
    if len(scores) == 0:
        return 0.0
    return float(_REDUCERS[how](scores))


def select_answer(leaves: Sequence[Leaf], agg: str, vote: str) -> str | None:
    """The answer a `vote` over `leaves` chooses (scores reduced by `agg`); None if none answered.

    bon returns the best leaf's own answer; majority and weighted return a group's
    representative. Ties go to the earliest leaf / group, so the result is deterministic.
    """
    _check_choice(agg, AGGS, "score aggregation")
    _check_choice(vote, VOTES, "answer vote")
    scored = _scored(leaves, agg)
    if not scored:
        return None
    if vote == "bon":
        # max() keeps the first of equal maxima: the earliest leaf wins a tie.
        return max(scored, key=lambda pair: pair[1])[0]
    groups = _group(scored)
    if vote == "majority":
        return max(groups, key=lambda g: (g.count, g.total)).representative
    return max(groups, key=lambda g: (g.total, g.count)).representative


def grade_problem(leaves: Sequence[Leaf], gold: str, agg: str, vote: str) -> tuple[str | None, bool]:
    """The selected answer and whether it is equivalent to the ground truth `gold`."""
    answer = select_answer(leaves, agg, vote)
    return answer, answer is not None and is_equivalent(gold, answer)


def _group(scored: Sequence[tuple[str, float]]) -> list[_Group]:
    """Group answers by equivalence to each group's first member, in order of first appearance."""
    groups: list[_Group] = []
    for answer, score in scored:
        group = next((g for g in groups if is_equivalent(g.representative, answer)), None)
        if group is None:
            group = _Group(answer)
            groups.append(group)
        group.count += 1
        group.total += score
    return groups


def _scored(leaves: Sequence[Leaf], agg: str) -> list[tuple[str, float]]:
    """(answer, aggregated score) of every leaf that gave a non-blank answer, in order."""
    return [
        (leaf.answer, aggregate_scores(leaf.scores, agg))
        for leaf in leaves
        if leaf.answer is not None and leaf.answer.strip()
    ]


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
