"""Aggregation: reduce step scores per trajectory and pick a problem's answer from its leaves.

Pure functions over stored data (no DB). A trajectory's step scores (root excluded) reduce by
`last | mean | prod | min`; a problem's answer is chosen among its finished leaves by best-of-N
(`bon`), plain `majority` vote or reward-`weighted` vote, with answers grouped by mathematical
equivalence (see `etsq.results.grading`), not string equality.

A `Ballot` groups a problem's answered leaves once and then answers every agg x vote: grouping
is what costs (math-verify), so it is done once per problem, on distinct normal forms only.

Two tests of equivalence serve two ends.  Grouping answers for a vote uses `equivalent`: a normal
form, then values (`etsq.results.answer_value`), then math-verify.  Whether an answer is *correct*
(accuracy, coverage) is math-verify's verdict (`grade_answer`): the value test settles it only where
it provably agrees, i.e. equal normal forms (math-verify's own first step) and plain numbers on both
sides; values elsewhere can disagree with math-verify (`1/2\\pi` is 1/(2π) to it, π/2 to the value
grammar; `1,0` is a list to one, the start of a thousands-separated number to the other).
"""

from __future__ import annotations

import cmath
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

from etsq.errors import ConfigError
from etsq.results.answer_value import AnswerValue, answer_value
from etsq.results.grading import is_equivalent, normalise


class Aggregates(NamedTuple):
    """A path's step scores reduced four ways; the field names are the `--agg` names."""

    last: float
    mean: float
    prod: float
    min: float


AGGS: tuple[str, ...] = Aggregates._fields
VOTES: tuple[str, ...] = ("bon", "majority", "weighted")
COMBOS: tuple[tuple[str, str], ...] = tuple((agg, vote) for agg in AGGS for vote in VOTES)

# Plain numbers after `normalise`: 12, -3.5, .5, 3/4, \frac{3}{4}, -\frac{3}{4}.
_DECIMAL_RE = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_RATIO_RE = re.compile(r"(-?)(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})")
# Normal forms whose value math-verify reads as the value grammar does: integers, braced or one-digit
# \frac and \sqrt arguments, \pi, i, + - and products; no `/` (`1/2\pi`), comma (`1,000`), decimal,
# power, bracket or other letter, where the two readings can part.
_PLAIN_RE = re.compile(r"(?:\d+|\\(?:frac|sqrt|pi|cdot|times)(?![a-zA-Z])|[{}+\-*i])+")
# math-verify rounds numbers to about six significant digits: values farther apart than this
# (relative) are never equivalent, and nearer ones are left to it unless both are exact.
_FAR_APART = 1e-4

NO_SCORES = Aggregates(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Leaf:
    """A finished trajectory: its extracted answer (None if it gave none) and step scores."""

    answer: str | None
    scores: tuple[float, ...]


# A path's running reductions: (steps, sum, product, minimum, last score).  A plain tuple, since a
# million nodes extend one each; extending adds and multiplies left to right, as `sum` and
# `math.prod` do, so the values equal `aggregate_scores` of the whole path exactly.
PathScores = tuple[int, float, float, float, float]
EMPTY_PATH: PathScores = (0, 0.0, 1.0, math.inf, 0.0)


def extend_path(path: PathScores, score: float | None) -> PathScores:
    """The path one step longer; a step without a score leaves the reductions as they are."""
    if score is None:
        return path
    steps, total, product, minimum, _ = path
    return (steps + 1, total + score, product * score, minimum if minimum <= score else score, score)


def path_values(path: PathScores) -> Aggregates:
    """The four aggregates of a path; 0.0 each for a path without scores."""
    steps, total, product, minimum, last = path
    if steps == 0:
        return NO_SCORES
    return Aggregates(last=last, mean=total / steps, prod=product, min=minimum)


def path_scores(scores: Iterable[float | None]) -> PathScores:
    path = EMPTY_PATH
    for score in scores:
        path = extend_path(path, score)
    return path


# --------------------------------------------------------------------------- equivalence


@lru_cache(maxsize=1 << 16)
def answer_key(answer: str) -> Fraction | str:
    """A cheap normal form: the exact value of a plain number, else the normalised string.

    Equal keys are equivalent answers (`is_equivalent` accepts equal normalised strings, and
    math-verify equal numbers); an empty normalised string matches nothing, not even itself.
    """
    text = normalise(answer)
    if _DECIMAL_RE.fullmatch(text):
        return Fraction(text)
    ratio = _RATIO_RE.fullmatch(text)
    if ratio:
        sign, a, b, c, d = ratio.groups()
        num, den = int(a or c), int(b or d)
        if den:
            return Fraction(-num if sign else num, den)
    return text


def equivalent(gold: str, answer: str) -> bool:
    """`is_equivalent(gold, answer)`, decided without math-verify where values settle it.

    Equal normal forms are equivalent; answers whose values (`etsq.results.answer_value`) over the same
    variables differ by more than math-verify's rounding are not; exact constants (no decimal, no
    variable) of equal value are.  Everything else is math-verify's to decide.
    """
    key = answer_key(gold)
    if key == answer_key(answer) and key != "":
        return True
    decided = _decided_by_value(answer_value(gold), answer_value(answer))
    if decided is not None:
        return decided
    return is_equivalent(gold, answer)


class Verdict(NamedTuple):
    """Whether an answer is correct, and whether the cheap test decided it (else math-verify)."""

    correct: bool
    by_value: bool


def grade_answer(gold: str, answer: str) -> Verdict:
    """Whether `answer` is correct against `gold`: `is_equivalent` (math-verify) wherever the cheap
    test could disagree with it.

    The cheap test decides only (1) equal nonempty normal forms, which `is_equivalent` accepts
    before it parses anything, (2) two plain numbers (`answer_key` values: integers, decimals,
    `a/b`, `\\frac{a}{b}`), which math-verify parses to the same rationals and compares as numbers:
    equal ones are equivalent, ones farther apart than its rounding are not, and (3) two answers
    of `_PLAIN_RE`'s sub-grammar (`2\\sqrt{5}`, `\\frac{\\pi}{4}`, `9-11i`), which both read alike,
    where their values settle it (`_decided_by_value`).
    """
    decided = _cheap_verdict(gold, answer)
    if decided is not None:
        return Verdict(decided, True)
    return Verdict(is_equivalent(gold, answer), False)


def _cheap_verdict(gold: str, answer: str) -> bool | None:
    key, other = answer_key(gold), answer_key(answer)
    if key == "" or other == "":
        return None  # math-verify's to refuse (an empty normal form matches nothing)
    if key == other:
        return True
    if isinstance(key, Fraction) and isinstance(other, Fraction):
        return False if _far(complex(key), complex(other)) else None
    if (
        isinstance(key, str)
        and isinstance(other, str)
        and _PLAIN_RE.fullmatch(key)
        and _PLAIN_RE.fullmatch(other)
    ):
        return _decided_by_value(answer_value(gold), answer_value(answer))
    return None


def _decided_by_value(a: AnswerValue | None, b: AnswerValue | None) -> bool | None:
    """True / False where the values settle equivalence, None where only math-verify can."""
    if a is None or b is None or a.symbols != b.symbols or len(a.values) != len(b.values):
        return None
    if len(a.values) > 1:
        # A list may be a set to math-verify: only values that differ in any order settle it,
        # or exact values equal in the same order and the same brackets.
        pairs = zip(_ordered(a.values), _ordered(b.values), strict=True)
        if any(_far(x, y) for x, y in pairs):
            return False
        same = all(_same(x, y) for x, y in zip(a.values, b.values, strict=True))
        return True if same and a.exact and b.exact and a.parenthesised == b.parenthesised else None
    x, y = a.values[0], b.values[0]
    if _far(x, y):
        return False
    return True if a.exact and b.exact and _same(x, y) else None


def _same(x: complex, y: complex) -> bool:
    return cmath.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12)


def _far(x: complex, y: complex) -> bool:
    return abs(x - y) > _FAR_APART * max(abs(x), abs(y), 1.0)


def _ordered(values: tuple[complex, ...]) -> list[complex]:
    return sorted(values, key=lambda v: (v.real, v.imag))


# --------------------------------------------------------------------------- the ballot


@dataclass
class Ballot:
    """A problem's answered leaves, grouped by equivalence once, in order of first appearance.

    `answers[i]`/`scores[i]`: leaf i's answer and its four aggregated scores; `group_of[i]`: its
    group; `reps[g]`: group g's representative (its first member's answer).
    """

    answers: list[str] = field(default_factory=list)
    scores: list[Aggregates] = field(default_factory=list)
    group_of: list[int] = field(default_factory=list)
    reps: list[str] = field(default_factory=list)
    _by_answer: dict[str, int] = field(default_factory=dict)
    _by_key: dict[Fraction | str, int] = field(default_factory=dict)
    _by_key_first: dict[Fraction | str, str] = field(default_factory=dict)
    _tallies: tuple[list[int], list[list[float]]] | None = None

    def add(self, answer: str | None, scores: Aggregates) -> None:
        """Count one leaf; leaves without a (non-blank) answer take no part in any vote."""
        if answer is None:
            return
        group = self._by_answer.get(answer)
        if group is None:
            if not answer.strip():
                return
            group = self._group(answer)
            if answer_key(answer) != "":  # an empty normal form is equivalent to nothing
                self._by_answer[answer] = group
        self.answers.append(answer)
        self.scores.append(scores)
        self.group_of.append(group)
        self._tallies = None

    def _group(self, answer: str) -> int:
        key = answer_key(answer)
        if key in self._by_key:
            return self._by_key[key]
        group = next((g for g, rep in enumerate(self.reps) if equivalent(rep, answer)), None)
        if group is None:
            group = len(self.reps)
            self.reps.append(answer)
        if key != "":  # an empty normal form is equivalent to nothing: never shared
            self._by_key[key] = group
            self._by_key_first[key] = answer
        return group

    def choose(self, agg: str, vote: str) -> str | None:
        """The answer `vote` picks with scores reduced by `agg`; ties go to the earliest leaf/group."""
        check_choice(agg, AGGS, "score aggregation")
        check_choice(vote, VOTES, "answer vote")
        if not self.answers:
            return None
        column = AGGS.index(agg)
        if vote == "bon":
            # max() keeps the first of equal maxima: the earliest leaf wins a tie.
            best = max(range(len(self.answers)), key=lambda i: self.scores[i][column])
            return self.answers[best]
        counts, by_column = self._tally()
        totals = by_column[column]
        if vote == "majority":
            winner = max(range(len(self.reps)), key=lambda g: (counts[g], totals[g]))
        else:
            winner = max(range(len(self.reps)), key=lambda g: (totals[g], counts[g]))
        return self.reps[winner]

    def _tally(self) -> tuple[list[int], list[list[float]]]:
        """Each group's leaf count and its score totals per aggregation, summed in leaf order."""
        if self._tallies is None:
            n = len(self.reps)
            counts, totals = [0] * n, [[0.0] * n for _ in AGGS]
            for group, values in zip(self.group_of, self.scores, strict=True):
                counts[group] += 1
                for column, value in zip(totals, values, strict=True):  # one column per AGGS entry
                    column[group] += value
            self._tallies = (counts, totals)
        return self._tallies

    def covers(self, gold: str) -> bool:
        """Whether any leaf's answer is correct against `gold` (`grade_answer`): one check per
        distinct normal form, those the cheap test decides before those math-verify must.

        Representatives first; the other forms matter only because equivalence need not be
        transitive (a member may match the gold when its group's representative does not).
        """
        reps = set(self.reps)
        others = [answer for answer in self._by_key_first.values() if answer not in reps]
        undecided = []
        for answer in [*self.reps, *others]:
            verdict = _cheap_verdict(gold, answer)
            if verdict:
                return True
            if verdict is None:
                undecided.append(answer)
        return any(is_equivalent(gold, answer) for answer in undecided)


@dataclass(frozen=True)
class Grades:
    """A problem graded under several agg x vote combinations at once."""

    correct: tuple[bool, ...]  # one per requested combination, in order
    covered: bool  # some leaf's answer is correct against the gold
    # Per combination: True if the cheap test graded the chosen answer, False if math-verify did,
    # None if there was no answer to grade.
    by_value: tuple[bool | None, ...] = ()


def grade_ballot(ballot: Ballot, gold: str, combos: Sequence[tuple[str, str]]) -> Grades:
    """Grade every combination (`grade_answer`); each distinct chosen answer is graded once."""
    verdicts: dict[str, Verdict] = {}
    correct: list[bool] = []
    by_value: list[bool | None] = []
    for agg, vote in combos:
        answer = ballot.choose(agg, vote)
        if answer is None:
            correct.append(False)
            by_value.append(None)
            continue
        if answer not in verdicts:
            verdicts[answer] = grade_answer(gold, answer)
        correct.append(verdicts[answer].correct)
        by_value.append(verdicts[answer].by_value)
    covered = any(v.correct for v in verdicts.values()) or ballot.covers(gold)
    return Grades(tuple(correct), covered, tuple(by_value))


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def expand_choices(values: Sequence[str], allowed: tuple[str, ...], default: str) -> list[str]:
    """Option values with `all` standing for every allowed one; [default] when none was given."""
    if not values:
        return [default]
    out: list[str] = []
    for value in values:
        for item in allowed if value == "all" else (value,):
            check_choice(item, allowed, "choice")
            if item not in out:
                out.append(item)
    return out
