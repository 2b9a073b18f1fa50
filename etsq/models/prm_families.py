"""PRM families: how a kind of token-probability PRM is prompted and which labels it answers with.

One registry serves every backend.  A family renders a scoring request (question + steps, the newest
last) into the text after which the PRM's next token is read, names the "good" and "bad" label
tokens (score = p(good) / (p(good) + p(bad))), and names its step tag:

- `judge`: an instruct model asked "Is the new step correct?", labels Yes/No (the embedded default)
- `math-shepherd`: Math-Shepherd's format, each step followed by the tag " ки", labels +/-
- `rlhflow`: RLHFlow's Llama PRMs, one user turn per step and an assistant turn answering +/-
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from etsq.errors import ConfigError
from etsq.models.base import ScoreRequest
from etsq.models.prompts import chat, has_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHEPHERD_TAG = "ки"


def _numbered(steps: Sequence[str]) -> str:
    return "\n".join(f"Step {i}: {step.strip()}" for i, step in enumerate(steps, 1)) or "(none)"


def judge_text(tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
    """A chat prompt asking an instruct model whether the newest step is correct."""
    content = (
        f"Problem:\n{req.question}\n\nEarlier steps:\n{_numbered(req.steps[:-1])}\n\n"
        f"New step:\n{req.steps[-1].strip()}\n\nIs the new step correct? Answer Yes or No."
    )
    if tokenizer is None or not has_chat_template(tokenizer):
        return f"{content}\nAnswer:"
    return chat(tokenizer, [{"role": "user", "content": content}])


def shepherd_text(tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
    """Math-Shepherd's format: the question, then each step followed by the step tag " ки"."""
    return f"{req.question} " + "\n".join(f"{step.strip()} {SHEPHERD_TAG}" for step in req.steps)


def rlhflow_text(tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
    """RLHFlow's PRM conversation: question + first step, then one user turn per step, earlier ones
    answered "+"; the label is the next token of the assistant turn after the newest step."""
    turns = [f"{req.question} {req.steps[0].strip()}", *(s.strip() for s in req.steps[1:])]
    if tokenizer is None or not has_chat_template(tokenizer):
        return "".join(
            f"User: {t}\nAssistant: {'+' if i < len(turns) - 1 else ''}" for i, t in enumerate(turns)
        )
    messages: list[dict[str, str]] = []
    for turn in turns[:-1]:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "+"}]
    return chat(tokenizer, [*messages, {"role": "user", "content": turns[-1]}])


@dataclass(frozen=True)
class PRMFamily:
    """How a kind of PRM is prompted and which two next tokens mean good and bad."""

    name: str
    good: str
    bad: str
    render: Callable[[PreTrainedTokenizerBase | None, ScoreRequest], str]
    add_special_tokens: bool  # chat templates already carry BOS; raw text needs the tokenizer's
    step_tag: str | None = None  # the tag as it follows a step; the reference SGLang fork scores there

    @property
    def labels(self) -> tuple[str, str]:
        return self.good, self.bad


PRM_FAMILIES: dict[str, PRMFamily] = {
    "judge": PRMFamily("judge", "Yes", "No", judge_text, add_special_tokens=False),
    "math-shepherd": PRMFamily(
        "math-shepherd", "+", "-", shepherd_text, add_special_tokens=True, step_tag=f" {SHEPHERD_TAG}"
    ),
    "rlhflow": PRMFamily("rlhflow", "+", "-", rlhflow_text, add_special_tokens=False),
}


def get_family(family: str | PRMFamily) -> PRMFamily:
    if isinstance(family, PRMFamily):
        return family
    if family not in PRM_FAMILIES:
        raise ConfigError(f"unknown PRM family {family!r}; known: {', '.join(sorted(PRM_FAMILIES))}")
    return PRM_FAMILIES[family]
