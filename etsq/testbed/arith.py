"""Multi-step arithmetic problems: a seeded generator, a step verifier and the shipped test split.

A problem is a chain of additions and subtractions written as one expression, e.g. the question
`17+3-5+8`; its solution evaluates it left to right, one operation per step:

    17+3=20
    20-5=15
    15+8=23. The answer is \\boxed{23}

Design (chosen so that a sub-million-parameter model learns it in minutes on a CPU, yet makes
errors at temperature 1.0):
- operations: `+` and `-` only, each with a one-digit operand (1..9); the start value and every
  running value stay within 0..MAX_VALUE, so every number is one token of the testbed tokenizer
  and each step is a lookup in a table of about 2 x 9 x MAX_VALUE facts.  The sign of each
  operation is drawn among those that keep the running value in range.
- 3 to 8 operations (uniform), so the depth of a search tree is 3 to 8 and errors compound.
- the operations of one problem are distinct (no "+3" twice), so "the operation after the one the
  previous step used" names exactly one place in the question: a small transformer learns that
  lookup (an induction head) quickly, while with repeats it confuses which operand comes next.
- compact steps without spaces: a step is 6 tokens ("a", "+", "b", "=", "c", "\\n\\n"), the last
  adds ". The answer is \\boxed{", "c", "}" (the answer phrase is one token).

Steps are joined so that each ends with the step delimiter "\\n\\n" (`solution_text`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_OPS = 3
MAX_OPS = 8
MAX_OPERAND = 9
MAX_VALUE = 39
STEP_DELIMITER = "\n\n"
ANSWER_PHRASE = ". The answer is \\boxed{"
TEST_SEED = 0
TRAIN_SEED = 1
TEST_SIZE = 1000
TEST_FILENAME = "arith_test.jsonl"

_STEP_RE = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*(\d+)\s*(.*?)\s*$", re.DOTALL)
_BOXED_RE = re.compile(r"^\.?\s*The answer is \\boxed\{\s*(\d+)\s*\}\.?$")


@dataclass(frozen=True)
class Op:
    """One operation of a problem: `sign` ("+" or "-") and its operand."""

    sign: str
    operand: int

    def apply(self, value: int) -> int:
        return value + self.operand if self.sign == "+" else value - self.operand


@dataclass(frozen=True)
class Problem:
    """A start value and its operations; the question, steps and answer follow from them."""

    start: int
    ops: tuple[Op, ...]

    @property
    def question(self) -> str:
        return str(self.start) + "".join(f"{op.sign}{op.operand}" for op in self.ops)

    @property
    def values(self) -> list[int]:
        """The running values: the start, then the value after each operation."""
        values = [self.start]
        for op in self.ops:
            values.append(op.apply(values[-1]))
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def steps(self) -> list[str]:
        """The correct solution, one step per operation, the last one stating the answer."""
        values = self.values
        steps = [f"{values[i]}{op.sign}{op.operand}={values[i + 1]}" for i, op in enumerate(self.ops)]
        steps[-1] += f"{ANSWER_PHRASE}{values[-1]}}}"
        return steps


def solution_text(steps: Sequence[str]) -> str:
    """The steps as the policy writes them: each followed by the step delimiter."""
    return "".join(step + STEP_DELIMITER for step in steps)


def random_problem(rng: random.Random) -> Problem:
    """One problem: 3 to 8 distinct operations, every running value within 0..MAX_VALUE."""
    n_ops = rng.randint(MIN_OPS, MAX_OPS)
    value = start = rng.randint(0, MAX_VALUE)
    ops: list[Op] = []
    for _ in range(n_ops):
        # MAX_VALUE >= 2 * MAX_OPERAND: every operand fits with one sign, so 18 - 7 pairs leave a choice
        choices = [
            op
            for op in (Op(sign, b) for b in range(1, MAX_OPERAND + 1) for sign in "+-")
            if op not in ops and 0 <= op.apply(value) <= MAX_VALUE
        ]
        op = rng.choice(choices)
        value = op.apply(value)
        ops.append(op)
    return Problem(start, tuple(ops))


def generate(seed: int, exclude: frozenset[str] = frozenset()) -> Iterator[Problem]:
    """An endless stream of distinct problems from `seed`, skipping questions in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    while True:
        problem = random_problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            yield problem


def heldout_problems(n: int = TEST_SIZE) -> list[Problem]:
    """The first `n` problems of the test split (seed TEST_SEED)."""
    stream = generate(TEST_SEED)
    return [next(stream) for _ in range(n)]


def train_stream(seed: int = TRAIN_SEED) -> Iterator[Problem]:
    """Training problems: another seed, and never a question of the test split."""
    return generate(seed + 1_000_003 * TRAIN_SEED, frozenset(p.question for p in heldout_problems()))


def heldout_rows(n: int = TEST_SIZE) -> list[dict[str, object]]:
    """The test split as dataset rows (fields `id`, `problem`, `answer`, `steps`)."""
    return [
        {"id": f"arith-{i}", "problem": p.question, "answer": str(p.answer), "steps": p.steps}
        for i, p in enumerate(heldout_problems(n))
    ]


def heldout_jsonl(n: int = TEST_SIZE) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in heldout_rows(n))


def write_test_split(path: Path) -> None:
    """Write the test split (what ships as etsq/data/arith_test.jsonl)."""
    path.write_text(heldout_jsonl(), encoding="utf-8")


def parse_question(question: str) -> Problem | None:
    """The problem a question text states, or None when it is not one of ours."""
    match = re.fullmatch(r"\s*(\d+)((?:[+-]\d+)+)\s*", question)
    if match is None:
        return None
    ops = tuple(Op(sign, int(num)) for sign, num in re.findall(r"([+-])(\d+)", match.group(2)))
    return Problem(int(match.group(1)), ops)


def verify_steps(problem: Problem | str, steps: Sequence[str]) -> list[bool]:
    """Whether each step is correct given the question and the steps before it.

    Step k is correct when every earlier step is, it reads "a±b=c" with a the running value after
    k-1 operations (a copied wrong result is wrong), ±b the question's k-th operation (not another
    operand) and c the right result, and it states the answer (". The answer is \\boxed{c}") if and
    only if it is the last operation.  Steps beyond the last operation are wrong.  Once a step is
    wrong, so is every later one: the trajectory can no longer reach the answer honestly.
    """
    if isinstance(problem, str):
        parsed = parse_question(problem)
        if parsed is None:
            return [False] * len(steps)
        problem = parsed
    values = problem.values
    labels: list[bool] = []
    ok = True
    for k, step in enumerate(steps):
        ok = (
            ok
            and k < len(problem.ops)
            and _step_ok(step, values[k], problem.ops[k], k == len(problem.ops) - 1)
        )
        labels.append(ok)
    return labels


def _step_ok(step: str, before: int, op: Op, last: bool) -> bool:
    match = _STEP_RE.match(step)
    if match is None:
        return False
    a, sign, b, c, rest = match.groups()
    after = op.apply(before)
    if (int(a), sign, int(b), int(c)) != (before, op.sign, op.operand, after):
        return False
    if not last:
        return rest == ""
    boxed = _BOXED_RE.match(rest)
    return boxed is not None and int(boxed.group(1)) == after
