"""Grading parity: etsq's correctness verdict equals math-verify's (`is_equivalent`) on every MATH500
and GSM8K ground truth, against rewritten forms of itself and against wrong answers.

The verdict is taken where accuracy takes it, `grade_ballot` on a ballot of the answer (its chosen
answer and its coverage).  About 40 s on two cores: math-verify on ~9,000 pairs, most of them cached
parses.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest

from etsq.datasets import load_dataset
from etsq.results.aggregate import (
    Ballot,
    Grades,
    answer_key,
    equivalent,
    grade_answer,
    grade_ballot,
    path_values,
)
from etsq.results.grading import is_equivalent
from etsq.results.table import ProblemRecord, RunCounts, RunInfo, summarise
from tests.conftest import DATA_DIR

COMBO = [("last", "bon")]


def _golds(name: str) -> list[str]:
    return [p.answer for p in load_dataset(name, DATA_DIR).problems]


def math_rewrites(gold: str) -> Iterator[str]:
    """Forms of `gold` a model might write: most are equivalent, some only to a lenient reader."""
    yield gold.replace("\\frac", "\\dfrac")
    yield re.sub(r"\s+", "", gold)
    yield re.sub(r"\s*([+\-=,])\s*", r" \1 ", gold)
    yield f"${gold}$"
    yield f"\\left({gold}\\right)" if "," in gold else f"{{{gold}}}"
    yield re.sub(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", gold)  # inline fractions, unbracketed
    key = answer_key(gold)
    if not isinstance(key, str):
        yield f"{key.numerator}.0" if key.denominator == 1 else f"{float(key):.6f}"
        if key.denominator != 1:
            yield f"{key.numerator}/{key.denominator}"
    sums = re.fullmatch(r"([^+\-,()]+?)\s*\+\s*([^+\-,()]+)", gold)
    if sums:
        yield f"{sums.group(2)}+{sums.group(1)}"  # a reordered sum


def wrong_answers(gold: str, others: list[str], rng: random.Random) -> Iterator[str]:
    """Perturbed values of `gold`, and another row's answer."""
    digits = [m.start() for m in re.finditer(r"\d", gold)]
    if digits:
        i = digits[-1]
        yield gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1 :]
        i = digits[0]
        yield gold[:i] + str((int(gold[i]) + 3) % 10) + gold[i + 1 :]
    yield f"{gold}+1"
    yield gold[1:] if gold.startswith("-") else f"-({gold})"
    yield rng.choice(others)


def _verdict(gold: str, answer: str) -> Grades:
    ballot = Ballot()
    ballot.add(answer, path_values((1, 0.5, 0.5, 0.5, 0.5)))
    return grade_ballot(ballot, gold, COMBO)


def _disagreements(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str, bool]], int, int]:
    """(pairs where etsq's verdict or coverage differs from math-verify's, equivalent pairs, by value)."""
    wrong, agreeing, by_value = [], 0, 0
    for gold, answer in pairs:
        truth = is_equivalent(gold, answer)
        grades = _verdict(gold, answer)
        if grades.correct != (truth,) or grades.covered != truth:
            wrong.append((gold, answer, truth))
        agreeing += truth
        by_value += bool(grades.by_value[0])
    return wrong, agreeing, by_value


def test_every_math500_answer_grades_as_math_verify_does() -> None:
    golds = _golds("math500")
    assert len(golds) == 500
    rng = random.Random(19)
    right = [(g, form) for g in golds for form in dict.fromkeys(math_rewrites(g))]
    wrong = [(g, form) for g in golds for form in dict.fromkeys(wrong_answers(g, golds, rng)) if form != g]
    wrong_r, true_r, value_r = _disagreements(right)
    wrong_w, true_w, value_w = _disagreements(wrong)
    assert wrong_r + wrong_w == []
    # Not vacuous: most rewrites are equivalent, most perturbations not, and both graders decide many.
    assert true_r > 0.9 * len(right) and true_w < 0.05 * len(wrong), (true_r, len(right), true_w, len(wrong))
    assert 0 < value_r + value_w < len(right) + len(wrong)


def test_every_gsm8k_answer_grades_as_math_verify_does() -> None:
    golds = _golds("gsm8k")
    assert len(golds) == 1319
    pairs = []
    for gold in golds:
        n = int(gold)
        pairs += [
            (gold, f"{n}.0"),
            (gold, f"${gold}$"),
            (gold, f"{n:,}"),
            (gold, str(n + 1)),
            (gold, str(-n)),
        ]
    wrong, agreeing, _ = _disagreements(pairs)
    assert wrong == []
    assert agreeing >= 3 * len(golds) - 2  # -0 = 0: the one gold of 0, if any, matches its negation


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        ("\\frac{1}{2\\pi}", "1/2\\pi"),  # math-verify: 1/(2π); the value grammar: π/2
        ("\\frac{\\pi}{2}", "1/2\\pi"),
        ("1,000", "1,0"),  # a thousands separator to math-verify, a list to the value grammar
    ],
)
def test_math_verify_decides_where_the_value_test_would_disagree(gold: str, answer: str) -> None:
    assert equivalent(gold, answer) is not is_equivalent(gold, answer)  # votes may still group so
    assert grade_answer(gold, answer) == (is_equivalent(gold, answer), False)
    assert _verdict(gold, answer).correct == (is_equivalent(gold, answer),)


@pytest.mark.parametrize(
    ("gold", "answer", "correct", "by_value"),
    [
        ("72", "72.0", True, True), ("\\frac{3}{4}", "0.75", True, True), ("10", "11", False, True),
        ("\\text{(C)}", "(C)", True, True), ("2\\sqrt{5}", "\\sqrt{20}", True, True),
        ("9 - 11i", "-11i+9", True, True), ("1/3", "0.333333", True, False),
        ("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}", True, True),
        ("\\frac{\\pi}{4}", "\\frac{\\pi}{5}", False, True),
        ("\\frac{\\pi}{2}", "1/2\\pi", False, False), ("(1, -2)", "\\left( 1, -2 \\right)", True, True),
        ("(1,2)", "(2,1)", False, False),
    ],
)  # fmt: skip
def test_which_grader_decides(gold: str, answer: str, correct: bool, by_value: bool) -> None:
    assert grade_answer(gold, answer) == (correct, by_value)


def test_the_table_counts_each_graders_answers() -> None:
    def record(correct: bool, by_value: bool | None) -> ProblemRecord:
        return ProblemRecord(
            1, 1, "k", (correct,), correct, 1, None, None, None, None, None, None, None, None, (by_value,)
        )

    records = [record(True, True), record(True, False), record(False, True), record(False, None)]
    (row,) = summarise(RunInfo(1, "math500", "ets", 4, "etsq"), records, RunCounts(4, 4), COMBO)
    assert (row["n_correct"], row["graded_by_value"], row["graded_by_math_verify"]) == (2, 2, 1)
