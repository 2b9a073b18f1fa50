"""Tests for etsq.results.grading: answer extraction, gold answers and math_verify equivalence."""

from __future__ import annotations

import threading
import time

import pytest

from etsq.answers import extract_answer, gold_answer
from etsq.errors import DatasetError
from etsq.results import grading
from etsq.results.grading import is_equivalent, normalise


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{3}$ and then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} end", "\\frac{\\sqrt{2}}{2}"),
        ("set \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("old style \\fbox{7}", "7"),
        ("first \\boxed{4} then truncated \\boxed{\\frac{1", "4"),
        ("The answer is: 18 ки", "18"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("So the answer is 3.5.", "3.5"),
        ("The answer is 2. Then the answer is 5.", "5"),
        ("Janet makes 18 dollars.\n#### 1,000", "1,000"),
        ("The answer is $\\boxed{12}$ while #### 9", "12"),
        ("no final answer here", None),
        ("\\boxed{} and nothing else", None),
        ("The answer is", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_gold_answer_gsm8k_takes_final_line_without_commas() -> None:
    solution = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nSo 9 * 2 = $<<9*2=18>>18.\n#### 1,018"
    assert gold_answer(solution, "gsm8k") == "1018"


def test_gold_answer_math500_is_the_field() -> None:
    assert gold_answer(" \\left( 3, \\frac{\\pi}{2} \\right) ", "math500") == (
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    )


def test_gold_answer_gsm8k_without_marker_is_an_error() -> None:
    with pytest.raises(DatasetError, match="####"):
        gold_answer("just a solution", "gsm8k")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("72", "72.0"),
        ("1000", "1,000"),
        ("\\dfrac{14}{3}", "\\frac{14}{3}"),
        ("3\\sqrt{2}", "\\sqrt{18}"),
        ("\\text{Sunday}", "Sunday"),
        ("\\$18", "18"),
    ],
)
def test_equivalent_forms(a: str, b: str) -> None:
    assert is_equivalent(a, b)
    assert is_equivalent(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [("\\frac{1}{2}", "0.51"), ("72", "27"), ("(3,\\frac{\\pi}{2})", "(3,\\pi)"), ("5", "")],
)
def test_different_answers(a: str, b: str) -> None:
    assert not is_equivalent(a, b)


def test_unparsable_answers_fall_back_to_normalised_strings() -> None:
    weird = "\\weirdmacro{{ zz"
    assert is_equivalent(weird, " \\weirdmacro{{zz. ")
    assert not is_equivalent(weird, "\\weirdmacro{{ yy")


def test_normalise_strips_presentation_only_markup() -> None:
    assert normalise("$\\left( 1,\\! 2 \\right)$.") == "(1,2)"
    assert normalise("\\text{(C)}") == "(C)"


def test_equivalence_works_outside_the_main_thread() -> None:
    results: list[bool] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            # Strings used nowhere else, so the parse cache cannot hide the threaded path.
            results.append(is_equivalent("\\frac{3}{8}", "0.375"))
            results.append(is_equivalent("x^2+2x+1", "(x+1)^2"))
            results.append(is_equivalent("\\frac{5}{8}", "0.6"))
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(30)
    assert errors == []
    assert results == [True, True, False]


def test_run_with_deadline_abandons_a_slow_call() -> None:
    started = time.monotonic()
    assert grading.run_with_deadline(lambda: _sleep_then(2.0, True), False, 0.1) is False
    assert time.monotonic() - started < 1.0
    assert grading.run_with_deadline(lambda: 7, 0, 1.0) == 7
    assert grading.run_with_deadline(lambda: 1 // 0, -1, 1.0) == -1


def _sleep_then(seconds: float, value: bool) -> bool:
    time.sleep(seconds)
    return value


def test_overlong_answers_skip_symbolic_parsing() -> None:
    long_a = "1+" * grading.MAX_PARSE_CHARS + "1"
    long_b = "2+" * grading.MAX_PARSE_CHARS + "0"
    started = time.monotonic()
    assert is_equivalent(long_a, long_a)
    assert not is_equivalent(long_a, long_b)  # equal sums, but too long to be parsed
    assert time.monotonic() - started < 1.0
