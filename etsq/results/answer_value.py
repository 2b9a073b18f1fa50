"""The numeric value of a simple LaTeX answer: a cheap test before math-verify's symbolic one.

Grading a W=256 search groups hundreds of answers per problem by equivalence; math-verify decides
each pair with sympy in 1-140 ms.  Most pairs need no sympy: `2\\sqrt{5}` and `3\\sqrt{7}` differ
by value, `\\sqrt{20}` and `2\\sqrt{5}` agree exactly.  This module evaluates the answers a small
grammar covers (numbers, + - * / ^, \\frac, \\sqrt, \\pi, the imaginary unit i, parentheses and
braces, implicit products, single-letter variables set to fixed generic values, and comma lists
such as `(1, -2)`) and returns None for anything else (intervals, text, units, degrees, matrices,
e, ...), which is left to math-verify.
"""

from __future__ import annotations

import cmath
import math
import re
from dataclasses import dataclass
from functools import lru_cache

from etsq.results.grading import normalise

_TOKEN_RE = re.compile(r"\d+\.?\d*|\.\d+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^(){}\[\]]|.")
_TIMES = {"*", "\\cdot", "\\times"}
_ATOM_START = re.compile(r"\d|\.|\\pi$|\\frac$|\\sqrt$|[a-zA-Z]$|[({]")
# Letters that are constants or operators in answers, not variables: left to math-verify.
_NOT_VARIABLES = frozenset("eE")
_MAX_EXPONENT = 64.0


@dataclass(frozen=True)
class AnswerValue:
    """An answer's value (one per item of a comma list): `exact` when it holds no decimal literal,
    no variable, and i at most once and linearly."""

    values: tuple[complex, ...]
    exact: bool
    symbols: frozenset[str]
    parenthesised: bool = False  # a list written `(a, b)`, not `a, b`


class _Unsupported(Exception):
    """Outside the grammar: the answer has no value here."""


def _variable_value(letter: str) -> complex:
    # Generic, irrational-looking points: two different functions of x almost never agree there.
    return math.sqrt(2) / 3 + 0.1137 * (ord(letter.lower()) - 96) + (0.0421 if letter.isupper() else 0.0)


class _Parser:
    """Recursive descent over the tokens of a normalised answer."""

    def __init__(self, text: str) -> None:
        self.tokens = _TOKEN_RE.findall(text)
        self.pos = 0
        self.exact = True
        self.symbols: set[str] = set()
        self.parenthesised = False
        self.i_count = 0

    def linear_in_i(self) -> bool:
        """At most one i, never divided by or raised: the same number whether i is the imaginary
        unit or a symbol (`i^2` is -1 to one reader, a square to another)."""
        return self.i_count == 0 or (self.i_count == 1 and not {"/", "\\frac", "^"} & set(self.tokens))

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _Unsupported
        self.pos += 1
        return token

    def parse(self) -> tuple[complex, ...]:
        """A comma list, bare or in one pair of parentheses; a single value otherwise."""
        if self.tokens[:1] == ["("] and self.tokens[-1:] == [")"] and _closes_at_end(self.tokens):
            self.tokens = self.tokens[1:-1]
            self.parenthesised = True
        values = [self.expr()]
        while self.peek() == ",":
            self.take()
            values.append(self.expr())
        if self.peek() is not None:
            raise _Unsupported
        return tuple(values)

    def expr(self) -> complex:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> complex:
        value = self.unary()
        while True:
            token = self.peek()
            if token in _TIMES:
                self.take()
                value *= self.unary()
            elif token == "/":
                self.take()
                value = _divide(value, self.unary())
            elif token is not None and _ATOM_START.match(token):
                if token == "\\frac" and self.tokens[self.pos - 1][0].isdigit():
                    raise _Unsupported  # `1\frac{4}{5}` is a mixed number to some, a product to others
                value *= self.power()  # an implicit product: 2\sqrt{5}, 3x
            else:
                return value

    def unary(self) -> complex:
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> complex:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.unary() if self.peek() in ("-", "+") else self.argument()
        if exponent.imag or abs(exponent) > _MAX_EXPONENT:
            raise _Unsupported
        if (base.imag or base.real < 0) and not exponent.real.is_integer():
            raise _Unsupported  # a branch choice math-verify may make differently
        return _checked(base ** (int(exponent.real) if exponent.real.is_integer() else exponent.real))

    def atom(self) -> complex:
        token = self.take()
        if token in ("(", "{"):
            value = self.expr()
            self.take(")" if token == "(" else "}")
            return value
        if token == "\\frac":
            return _divide(self.argument(), self.argument())
        if token == "\\sqrt":
            return self.root()
        return self.leaf(token)

    def root(self) -> complex:
        degree: complex = 2.0
        if self.peek() == "[":
            self.take()
            degree = self.expr()
            self.take("]")
        radicand = self.argument()
        if radicand.imag or radicand.real < 0 or degree.imag or degree.real <= 0:
            raise _Unsupported
        return _checked(radicand.real ** (1 / degree.real))

    def argument(self) -> complex:
        """A braced group, or one token: `\\frac43`, `\\sqrt2`, `x^2`."""
        if self.peek() == "{":
            return self.atom()
        token = self.take()
        if token.isdigit() and len(token) > 1:
            self.tokens.insert(self.pos, token[1:])  # `\frac43`: the 3 is the next argument
            token = token[0]
        return self.leaf(token)

    def leaf(self, token: str) -> complex:
        if token == "\\pi":
            return math.pi
        if token[0].isdigit() or token[0] == ".":
            self.exact = self.exact and "." not in token
            return float(token)
        if token == "i":
            self.i_count += 1
            return 1j
        if len(token) == 1 and token.isalpha() and token not in _NOT_VARIABLES:
            self.exact = False
            self.symbols.add(token)
            return _variable_value(token)
        raise _Unsupported


def _closes_at_end(tokens: list[str]) -> bool:
    """Whether the parenthesis opening `tokens` is the one closing it."""
    depth = 0
    for i, token in enumerate(tokens):
        depth += {"(": 1, ")": -1}.get(token, 0)
        if depth == 0:
            return i == len(tokens) - 1
    return False


def _divide(a: complex, b: complex) -> complex:
    if b == 0:
        raise _Unsupported
    return a / b


def _checked(value: complex) -> complex:
    if not cmath.isfinite(value):
        raise _Unsupported
    return value


@lru_cache(maxsize=1 << 16)
def answer_value(answer: str) -> AnswerValue | None:
    """The value of `answer`, or None when it lies outside the grammar (or has none)."""
    text = normalise(answer)
    if not text:
        return None
    parser = _Parser(text)
    try:
        values = parser.parse()
    except (_Unsupported, OverflowError, ValueError, ZeroDivisionError, TypeError):
        return None
    if not all(cmath.isfinite(v) for v in values):
        return None
    exact = parser.exact and parser.linear_in_i()
    return AnswerValue(values, exact, frozenset(parser.symbols), parser.parenthesised and len(values) > 1)
