"""Tests for etsq.results.aggregate: score reduction and answer selection over hand-built leaves and trees,
with every agg x vote pinned to hand-computed winners, and equivalence by value checked against
math-verify."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import pytest

from etsq.errors import ConfigError
from etsq.results.aggregate import (
    AGGS,
    COMBOS,
    VOTES,
    Ballot,
    Grades,
    Leaf,
    _decided_by_value,
    check_choice,
    equivalent,
    grade_ballot,
    path_scores,
    path_values,
)
from etsq.results.answer_value import answer_value
from etsq.results.grading import is_equivalent
from tests.conftest import DATA_DIR

# --------------------------------------------------------------------------- oracles and shortcuts
# The reductions spelled out directly (what path_values must equal), and one-call grading of leaves.

_REDUCERS: dict[str, Callable[[Sequence[float]], float]] = {
    "last": lambda scores: scores[-1],
    "mean": lambda scores: sum(scores) / len(scores),
    "prod": math.prod,
    "min": min,
}


def aggregate_scores(scores: Sequence[float], how: str) -> float:
    """Reduce one trajectory's step scores (root excluded) by `how`; 0.0 for no steps."""
    check_choice(how, AGGS, "score aggregation")
    if len(scores) == 0:
        return 0.0
    return float(_REDUCERS[how](scores))


def ballot_of(leaves: Iterable[Leaf]) -> Ballot:
    ballot = Ballot()
    for leaf in leaves:
        ballot.add(leaf.answer, path_values(path_scores(leaf.scores)))
    return ballot


def select_answer(leaves: Sequence[Leaf], agg: str, vote: str) -> str | None:
    """The answer a `vote` over `leaves` chooses (scores reduced by `agg`); None if none answered.

    bon returns the best leaf's own answer; majority and weighted return a group's
    representative. Ties go to the earliest leaf / group, so the result is deterministic.
    """
    return ballot_of(leaves).choose(agg, vote)


def grade_problem(leaves: Sequence[Leaf], gold: str, agg: str, vote: str) -> tuple[str | None, bool]:
    """The selected answer and whether it is equivalent to the ground truth `gold`."""
    answer = select_answer(leaves, agg, vote)
    return answer, answer is not None and equivalent(gold, answer)


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


# --------------------------------------------------------------------------- a stored tree, every agg x vote

# (job, depth, id, parent, score, terminal, answer, step tokens): what etsq.results.evaluate reads per node.
# Node 4 has no score, so leaf 10's path is [0.5] and leaf 8's path has no score at all (0.0 under
# every aggregation); leaf 9 gave no answer.  Answers: 1/2 in three forms, 3 in two.
TREE = [
    (1, 0, 1, None, None, False, None, 40),
    (1, 1, 2, 1, 0.9, False, None, 5),
    (1, 1, 3, 1, 0.4, False, None, 5),
    (1, 1, 4, 1, None, False, None, 5),
    (1, 2, 5, 2, 0.5, True, "\\frac{1}{2}", 6),
    (1, 2, 6, 2, 0.8, True, "0.5", 6),
    (1, 2, 7, 3, 0.9, True, "3", 6),
    (1, 2, 8, 4, None, True, "3", 6),
    (1, 2, 9, 3, 0.2, True, None, 6),
    (1, 2, 10, 4, 0.5, True, "1/2", 6),
    (1, 2, 11, 3, 0.99, True, "3.0", 6),
]
# Leaf paths (root excluded) and their (last, mean, prod, min):
#   5: [.9, .5] -> .5, .7, .45, .5         6: [.9, .8] -> .8, .85, .72, .8
#   7: [.4, .9] -> .9, .65, .36, .4        8: []       -> 0, 0, 0, 0
#  10: [.5]     -> .5, .5, .5, .5         11: [.4, .99] -> .99, .695, .396, .4
# Group 1/2 = {5, 6, 10}, group 3 = {7, 8, 11}: three leaves each, so majority falls to the totals.
#   last: 1/2 1.8 vs 3 1.89 -> 3     mean: 2.05 vs 1.345 -> 1/2
#   prod: 1.67 vs .756 -> 1/2        min: 1.8 vs .8 -> 1/2
# bon: last -> leaf 11 (.99, "3.0"); mean, prod, min -> leaf 6 (.85 / .72 / .8, "0.5").
EXPECTED = {
    ("last", "bon"): "3.0", ("last", "majority"): "3", ("last", "weighted"): "3",
    ("mean", "bon"): "0.5", ("mean", "majority"): "\\frac{1}{2}", ("mean", "weighted"): "\\frac{1}{2}",
    ("prod", "bon"): "0.5", ("prod", "majority"): "\\frac{1}{2}", ("prod", "weighted"): "\\frac{1}{2}",
    ("min", "bon"): "0.5", ("min", "majority"): "\\frac{1}{2}", ("min", "weighted"): "\\frac{1}{2}",
}  # fmt: skip


def _tree_ballot() -> Ballot:
    from etsq.results.evaluate import tally_tree

    return tally_tree(list(TREE)).ballot


@pytest.mark.parametrize(("agg", "vote"), COMBOS)
def test_every_agg_and_vote_on_a_stored_tree(agg: str, vote: str) -> None:
    assert _tree_ballot().choose(agg, vote) == EXPECTED[(agg, vote)]


def test_the_stored_tree_grades_against_its_gold() -> None:
    grades = grade_ballot(_tree_ballot(), "0.5", COMBOS)
    assert grades.correct == tuple(EXPECTED[c] != "3" and EXPECTED[c] != "3.0" for c in COMBOS)
    assert grades.correct.count(True) == 9 and grades.covered
    assert grade_ballot(_tree_ballot(), "7", COMBOS) == Grades((False,) * 12, False, (True,) * 12)


def test_the_stored_tree_reads_like_its_leaves() -> None:
    leaves = [
        Leaf("\\frac{1}{2}", (0.9, 0.5)), Leaf("0.5", (0.9, 0.8)), Leaf("3", (0.4, 0.9)), Leaf("3", ()),
        Leaf(None, (0.4, 0.2)), Leaf("1/2", (0.5,)), Leaf("3.0", (0.4, 0.99)),
    ]  # fmt: skip
    for agg, vote in COMBOS:
        assert select_answer(leaves, agg, vote) == EXPECTED[(agg, vote)]
    tree = _tree_ballot()
    assert tree.reps == ["\\frac{1}{2}", "3"] and tree.group_of == [0, 0, 1, 1, 0, 1]


def test_path_reductions_equal_aggregate_scores() -> None:
    scores = (0.3, 0.9, 0.55, 0.1, 0.75)
    values = path_values(path_scores(scores))
    assert values == tuple(aggregate_scores(scores, how) for how in AGGS)
    assert path_values(path_scores([None, 0.4, None])) == (0.4, 0.4, 0.4, 0.4)
    assert path_values(path_scores([None])) == (0.0, 0.0, 0.0, 0.0)


def test_ties_go_to_the_first_leaf_and_group() -> None:
    ballot = ballot_of([Leaf("2", (0.5,)), Leaf("1", (0.5,)), Leaf("1", (0.25,)), Leaf("2.0", (0.25,))])
    assert [ballot.choose("last", v) for v in VOTES] == ["2", "2", "2"]


def test_answers_with_an_empty_normal_form_never_group() -> None:
    ballot = ballot_of([Leaf("$$", (0.9,)), Leaf("$$", (0.8,)), Leaf("4", (0.5,))])
    assert ballot.reps == ["$$", "$$", "4"]
    assert ballot.choose("last", "majority") == "$$"  # three groups of one: the best total wins


# --------------------------------------------------------------------------- equivalence by value


@pytest.mark.parametrize(
    ("gold", "answer", "expected"),
    [
        ("\\frac{1}{2}", "0.5", True), ("1/2", "\\dfrac{1}{2}", True), ("72", "72.0", True),
        ("2\\sqrt{5}", "\\sqrt{20}", True), ("\\frac{\\pi}{4}", "\\frac{\\pi}{5}", False),
        ("(1, -2)", "\\left( 1, -2 \\right)", True), ("(1, -2)", "(2, -1)", False),
        ("3-11i", "-11i+3", True), ("3-11i", "3+11i", False), ("x^2-1", "(x+1)(x-2)", False),
        ("10", "11", False), ("1/3", "0.333333", True), ("3", "3.0000001", False),
    ],
)  # fmt: skip
def test_equivalent_forms(gold: str, answer: str, expected: bool) -> None:
    assert equivalent(gold, answer) is expected


def test_value_decisions_agree_with_math_verify() -> None:
    """Wherever values settle a pair without math-verify, math-verify agrees (MATH500's answers,
    paired with each other and with rewritten forms of themselves)."""
    import json
    import random

    golds = [json.loads(line)["answer"] for line in (DATA_DIR / "math500.jsonl").read_text().splitlines()]
    rng = random.Random(7)
    pairs = [(g, rng.choice(golds)) for g in golds] + [(g, f"{g}.0") for g in golds if g.isdigit()]
    pairs += [(g, g.replace("\\frac", "\\dfrac").replace(" ", "")) for g in golds]
    decided = [
        (a, b, verdict)
        for a, b in pairs
        if (verdict := _decided_by_value(answer_value(a), answer_value(b))) is not None
    ]
    assert len(decided) > 300, len(decided)
    sample = rng.sample(decided, 120)
    assert [(a, b, is_equivalent(a, b)) for a, b, _ in sample] == sample


@pytest.mark.parametrize(
    ("answer", "values"),
    [
        ("\\frac43", (4 / 3,)),
        ("2^{10}", (1024.0,)),
        ("\\sqrt[3]{27}", (3.0,)),
        ("(6,31,-1)", (6.0, 31.0, -1.0)),
    ],
)
def test_answer_values(answer: str, values: tuple[complex, ...]) -> None:
    value = answer_value(answer)
    assert value is not None and value.values == pytest.approx(values)


@pytest.mark.parametrize(
    "answer", ["(3,4]", "90^\\circ", "\\text{east}", "1\\frac{4}{5}", "e^2", "x=5", "2,\\!"]
)
def test_answers_outside_the_grammar_have_no_value(answer: str) -> None:
    assert answer_value(answer) is None
