"""Answers: a trajectory's final answer, and a dataset row's ground truth, as text.

The search reads `extract_answer` to end a trajectory, datasets read `gold_answer`; whether two
answers are equal is grading's question (`etsq.results.grading`).
"""

from __future__ import annotations

import re

from etsq.errors import DatasetError

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(r"the (?:final )?answer is\s*:?\s*", re.IGNORECASE)
_HASHES_RE = re.compile(r"####\s*(.*)")
_STEP_TAG = "ки"  # Math-Shepherd's step tag may trail the final answer
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def extract_answer(text: str) -> str | None:
    """The final answer of a trajectory, or None when it states none.

    Priority: content of the last balanced `\\boxed{...}` / `\\fbox{...}`, then what follows the
    last "The (final) answer is", then what follows GSM8K's last `####`.
    """
    for extractor in (_last_boxed, _after_answer_is, _after_hashes):
        answer = extractor(text)
        if answer:
            return answer
    return None


def _last_boxed(text: str) -> str | None:
    # A truncated trajectory may end inside a box; the last *closed* box is the answer then.
    for match in reversed(list(_BOXED_RE.finditer(text))):
        content = _balanced_content(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _balanced_content(text: str, start: int) -> str | None:
    """Text from `start` up to the brace closing an already-open `{`; None if never closed."""
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # escaped braces (\{ \}) are set delimiters, not grouping
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    math = _leading_math(rest)
    if math is not None:
        return math.strip() or None
    line = _strip_tag(rest.split("\n", 1)[0])
    # Cut at the end of the sentence ("18. I hope it is correct."), not at a decimal point.
    return re.split(r"\.(?:\s|$)", line, maxsplit=1)[0].strip() or None


def _leading_math(rest: str) -> str | None:
    """Content of a `$...$`, `$$...$$`, `\\(...\\)` or `\\[...\\]` opening `rest`, else None."""
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            if end != -1:
                return rest[len(opener) : end]
    return None


def _after_hashes(text: str) -> str | None:
    matches = _HASHES_RE.findall(text)
    if not matches:
        return None
    return _strip_tag(matches[-1]).strip() or None


def _strip_tag(line: str) -> str:
    return line.replace(_STEP_TAG, "").strip()


def gold_answer(row_answer: str, dataset: str) -> str:
    """The ground-truth answer of a dataset row's answer field.

    GSM8K's field is a worked solution ending in `#### 72`: the part after the last `####`, with
    thousands separators removed. MATH500's field already is the answer. Other datasets: as
    GSM8K when the field has a `####` line, else the field itself.
    """
    final = _after_hashes(row_answer)
    if dataset == "gsm8k" and final is None:
        raise DatasetError("GSM8K answer has no '#### <answer>' line")
    if final is None or dataset == "math500":
        return row_answer.strip()
    return _THOUSANDS_RE.sub("", final)
