"""Grading: whether two answers are mathematically equivalent (extraction: `etsq.answers`).

Equivalence uses HuggingFace `math_verify` (LaTeX/sympy parsing + symbolic comparison), with a
normalised string comparison as the fallback. math_verify guards parsing and comparison with
SIGALRM timeouts, which only work in the main thread; elsewhere (threaded workers) those are
switched off and a deadline thread bounds the wait instead, so no call can hang its caller.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

T = TypeVar("T")

# Seconds math_verify may spend on one parse / one comparison (its signal timeouts take ints).
PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5
# Longer "answers" are runaway generations; sympy on them is slow and never worth it.
MAX_PARSE_CHARS = 1000


# --------------------------------------------------------------------------- equivalence


def is_equivalent(a: str, b: str) -> bool:
    """Whether answers `a` and `b` are mathematically equal (`a` plays the gold role).

    Identical (normalised) strings are always equivalent; otherwise both are parsed with
    math_verify and compared symbolically. An unparsable answer only matches by string.
    """
    return _is_equivalent_cached(a, b)


@lru_cache(maxsize=1 << 16)
def _is_equivalent_cached(a: str, b: str) -> bool:
    norm_a, norm_b = normalise(a), normalise(b)
    if not norm_a or not norm_b:
        return False
    if norm_a == norm_b:
        return True
    parsed_a, parsed_b = _parse(a), _parse(b)
    if not parsed_a or not parsed_b:
        return False
    return _guarded(_verify, False, parsed_a, parsed_b)


def normalise(answer: str) -> str:
    """A canonical string form: no spacing, `\\left`/`\\right`, `$`, `\\text`, final dot."""
    text = re.sub(r"\\text(?:bf|rm)?\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", r"\1\2", answer)
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\\?\$", "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", text).rstrip(".")


@lru_cache(maxsize=1 << 14)
def _parse(answer: str) -> tuple[Any, ...]:
    """math_verify's parse of a bare answer (boxed so its LaTeX extractor finds it)."""
    if len(answer) > MAX_PARSE_CHARS:
        return ()
    for wrapped in (f"\\boxed{{{answer}}}", f"${answer}$"):
        parsed: list[Any] = _guarded(_parse_once, [], wrapped)
        if parsed:
            return tuple(parsed)
    return ()


# math_verify pulls in sympy and an ANTLR parser (~0.35 s); it is imported when first needed, so
# that the search loop and the CLI, which only extract answers, never pay for it.


def _parse_once(wrapped: str, timeout_s: int | None) -> list[Any]:
    from math_verify import parse

    return list(parse(wrapped, parsing_timeout=timeout_s))


def _verify(gold: tuple[Any, ...], target: tuple[Any, ...], timeout_s: int | None) -> bool:
    from math_verify import verify

    return bool(verify(list(gold), list(target), timeout_seconds=timeout_s))


# --------------------------------------------------------------------------- timeouts


class _TimeoutDisabledFilter(logging.Filter):
    """Drops math_verify's "Timeout is disabled" warning: we bound those calls ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_TimeoutDisabledFilter())


def _guarded(fn: Callable[..., T], default: T, *args: Any) -> T:
    """Run a math_verify call with a timeout that works in whichever thread we are in."""
    if threading.current_thread() is threading.main_thread():
        timeout_s = PARSE_TIMEOUT_S if fn is _parse_once else VERIFY_TIMEOUT_S
        return fn(*args, timeout_s)
    # signal.alarm is main-thread only: disable it and bound the wait from outside instead.
    limit = PARSE_TIMEOUT_S if fn is _parse_once else VERIFY_TIMEOUT_S
    return run_with_deadline(lambda: fn(*args, None), default, float(limit))


def run_with_deadline(fn: Callable[[], T], default: T, seconds: float) -> T:
    """`fn()` or, if it raises or has not returned after `seconds`, `default`.

    A Python thread cannot be killed: a runaway call is abandoned in a daemon thread (it keeps
    a core busy until it ends) so that the caller, at least, moves on.
    """
    result: list[T] = []

    def target() -> None:
        # A failing math_verify call means "no parse" / "not equivalent": the default.
        with contextlib.suppress(Exception):
            result.append(fn())

    worker = threading.Thread(target=target, name="etsq-grading", daemon=True)
    worker.start()
    worker.join(seconds)
    return result[0] if result else default
