"""Tests for etsq.aggregate: score reduction and answer selection over hand-built leaves."""

from __future__ import annotations

import math

import pytest

from etsq.aggregate import AGGS, VOTES, Leaf, aggregate_scores, grade_problem, select_answer
from etsq.errors import ConfigError

# One leaf of "7" with the best score (bon), three cheap leaves of 1/2 in different forms
# (majority), two decent leaves of 72 (weighted: 1.2 beats 0.99 and 0.3).
LEAVES: tuple[Leaf, ...] = (
    Leaf("\\frac{1}{2}", (0.9, 0.1)),
    Leaf("72", (0.2, 0.6)),
    Leaf("7", (0.5, 0.99)),
    Leaf(None, (1.0, 1.0)),
    Leaf("0.5", (0.9, 0.1)),
    Leaf("72.0", (0.3, 0.6)),
    Leaf("1/2", (0.8, 0.1)),
)


@pytest.mark.parametrize(
    ("how", "expected"),
    [("last", 0.5), ("mean", 0.6), ("prod", 0.8 * 0.5 * 0.5), ("min", 0.5)],
)
def test_aggregate_scores(how: str, expected: float) -> None:
    assert math.isclose(aggregate_scores([0.8, 0.5, 0.5], how), expected)


def test_aggregate_scores_empty_and_unknown() -> None:
    assert all(aggregate_scores([], how) == 0.0 for how in AGGS)
    with pytest.raises(ConfigError, match="median"):
        aggregate_scores([0.5], "median")


@pytest.mark.parametrize(
    ("vote", "expected"), [("bon", "7"), ("majority", "\\frac{1}{2}"), ("weighted", "72")]
)
def test_each_vote_picks_a_different_winner(vote: str, expected: str) -> None:
    assert select_answer(LEAVES, "last", vote) == expected


def test_aggregation_changes_the_bon_winner() -> None:
    # a: mean 0.55, last 0.2, min 0.2, prod 0.18; b: mean 0.45, last 0.5, min 0.4, prod 0.2.
    first_step_best = (Leaf("a", (0.9, 0.2)), Leaf("b", (0.4, 0.5)))
    assert select_answer(first_step_best, "mean", "bon") == "a"
    assert select_answer(first_step_best, "last", "bon") == "b"
    assert select_answer(first_step_best, "min", "bon") == "b"
    assert select_answer(first_step_best, "prod", "bon") == "b"


def test_majority_ties_break_on_total_score_then_first_seen() -> None:
    tie_on_count = (Leaf("1", (0.2,)), Leaf("2", (0.9,)))
    assert select_answer(tie_on_count, "last", "majority") == "2"
    full_tie = (Leaf("1", (0.5,)), Leaf("2", (0.5,)))
    assert select_answer(full_tie, "last", "majority") == "1"
    assert select_answer(full_tie, "last", "weighted") == "1"
    assert select_answer(full_tie, "last", "bon") == "1"


def test_no_answers_select_nothing() -> None:
    silent = (Leaf(None, (0.9,)), Leaf("  ", (0.8,)))
    assert all(select_answer(silent, "last", vote) is None for vote in VOTES)
    assert select_answer((), "last", "weighted") is None


def test_unknown_vote_or_agg_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="vote"):
        select_answer(LEAVES, "last", "plurality")
    with pytest.raises(ConfigError, match="aggregation"):
        select_answer(LEAVES, "avg", "bon")


def test_grade_problem_against_gold() -> None:
    assert grade_problem(LEAVES, "0.5", "last", "majority") == ("\\frac{1}{2}", True)
    assert grade_problem(LEAVES, "0.5", "last", "weighted") == ("72", False)
    assert grade_problem((Leaf(None, (1.0,)),), "0.5", "last", "bon") == (None, False)
