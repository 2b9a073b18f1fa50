"""PRM families: how a kind of PRM is prompted and where its score is read.

One registry serves every backend.  A family renders a scoring request (question + steps, the newest
last) into the text at whose end the newest step's score is read.  Two kinds:

Token-probability families (`PRMFamily`) name a "good" and a "bad" label token and read the PRM's
next token after the text: score = p(good) / (p(good) + p(bad)).
- `judge`: an instruct model asked whether the newest step is correct, labels Yes/No (the embedded
  default).  The text is the policy's own prompt and steps, verbatim, followed by the question, so a
  server holding the policy's KV cache serves the PRM request's prefix from that cache.
- `math-shepherd`: Math-Shepherd's format, each step followed by the tag " ки", labels +/-
- `rlhflow`: RLHFlow's Llama PRMs, one user turn per step and an assistant turn answering +/-

Reward-head families (`RewardHeadFamily`) are classification models: a head over the hidden state
gives two labels' logits at every step separator; score = softmax(logits)[good] at the newest one.
- `qwen-prm`: Qwen2.5-Math-PRM (`Qwen2ForProcessRewardModel`): Qwen's chat template with the system
  prompt "Please reason step by step, and put your final answer within \\boxed{}.", the steps as the
  assistant's answer joined by `<extra_0>` and ending with one; label 1 is "correct".

Likelihood families (`LikelihoodFamily`) read no label: the PRM is a causal LM (the policy itself,
or one fine-tuned to find wrong tokens unlikely, as the testbed's is), and the score is its
probability of the least likely solution token so far.
- `likelihood`: the text is the policy's own prompt and steps, verbatim (the `judge` prefix, so a
  server holding the policy's KV cache serves it); the solution tokens are those after the prompt;
  score = exp(min over them of log p(token | the tokens before it)).  Taking the minimum over the
  whole solution, not the newest step, makes the score fall at the first mistake and stay low, as
  the verifier's labels do (a step after a wrong one is wrong).  The testbed's PRM is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from etsq.errors import ConfigError
from etsq.models.base import ScoreRequest
from etsq.models.prompts import SYSTEM_PROMPT, chat, format_question, has_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHEPHERD_TAG = "ки"
JUDGE_QUESTION = "Is the last step of this solution correct? Answer Yes or No."
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_SEPARATOR = "<extra_0>"
_SENTINEL = "\x1fETSQ-STEPS\x1f"  # stands for the steps while a chat template is rendered

Render = Callable[["PreTrainedTokenizerBase | None", ScoreRequest], str]


def judge_text(tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
    """The policy's prompt and steps, verbatim, then a user turn asking if the newest step is correct."""
    return format_question(tokenizer, req.question) + "".join(req.steps) + _judge_suffix(tokenizer)


@lru_cache(maxsize=16)
def _judge_suffix(tokenizer: PreTrainedTokenizerBase | None) -> str:
    """What follows the steps: the end of the assistant's turn, the question, the reply's start.

    Cut from the chat template's rendering of a conversation whose assistant turn is a placeholder;
    the text before the placeholder is the policy's prompt (format_question), checked here.
    """
    if tokenizer is None or not has_chat_template(tokenizer):
        return f"\n\n{JUDGE_QUESTION}\nAnswer:"
    root = format_question(tokenizer, "Q")
    messages = [{"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": JUDGE_QUESTION}]
    try:
        rendered = chat(
            tokenizer,
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Q"}, *messages],
        )
    except Exception:  # templates without a system role: format_question folds it into the user turn
        rendered = chat(tokenizer, [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\nQ"}, *messages])
    before, found, after = rendered.partition(_SENTINEL)
    if not found or before != root:
        # A template that rewrites earlier turns: the question follows the steps as plain text.
        return f"\n\n{JUDGE_QUESTION}"
    return after


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


def qwen_prm_text(tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
    """Qwen2.5-Math-PRM's input, cut right after the newest step's `<extra_0>`.

    The model card renders the whole conversation (the assistant's turn closed); the PRM is causal,
    so what follows the last separator cannot change its score, and ending there makes the
    newest step's separator the text's last token on every backend.
    """
    answer = "".join(f"{step.strip()}{QWEN_PRM_SEPARATOR}" for step in req.steps)
    if tokenizer is None or not has_chat_template(tokenizer):
        return f"{QWEN_PRM_SYSTEM}\n\n{req.question}\n\n{answer}"
    messages = [
        {"role": "system", "content": QWEN_PRM_SYSTEM},
        {"role": "user", "content": req.question},
        {"role": "assistant", "content": answer},
    ]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    return text[: text.rindex(QWEN_PRM_SEPARATOR) + len(QWEN_PRM_SEPARATOR)]


@dataclass(frozen=True)
class PRMFamily:
    """A token-probability PRM: how it is prompted and which two next tokens mean good and bad."""

    name: str
    good: str
    bad: str
    render: Render
    add_special_tokens: bool  # chat templates already carry BOS; raw text needs the tokenizer's
    step_tag: str | None = None  # the tag as it follows a step; the reference SGLang fork scores there
    revision: int = 1  # raised whenever `render` changes what the PRM reads (see ModelConfig.prm_revision)

    @property
    def labels(self) -> tuple[str, str]:
        return self.good, self.bad


@dataclass(frozen=True)
class RewardHeadFamily:
    """A PRM with a classification head read at each step separator (no label tokens)."""

    name: str
    separator: str  # one special token; the rendered text ends with the newest step's
    render: Render
    good: int = 1  # the head's label that means "correct"
    n_labels: int = 2
    add_special_tokens: bool = False
    revision: int = 1


@dataclass(frozen=True)
class LikelihoodFamily:
    """A PRM read from its own log-probabilities of the solution's tokens (see `likelihood_score`)."""

    name: str
    prompt: Render  # the text before the solution: its tokens are not scored
    add_special_tokens: bool = False
    revision: int = 1

    def render(self, tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
        return self.prompt(tokenizer, req) + "".join(req.steps)


def policy_prompt(tokenizer: PreTrainedTokenizerBase | None, req: ScoreRequest) -> str:
    return format_question(tokenizer, req.question)


def likelihood_score(logprobs: Sequence[float]) -> float:
    """The probability of the least likely of the solution's tokens (their log-probabilities)."""
    if not logprobs:
        raise ValueError("a likelihood score needs at least one solution token")
    return math.exp(min(logprobs))


Family = PRMFamily | RewardHeadFamily | LikelihoodFamily

PRM_FAMILIES: dict[str, Family] = {
    # Revision 2: the policy's own prompt and steps, then the question (1 restated the problem).
    "judge": PRMFamily("judge", "Yes", "No", judge_text, add_special_tokens=False, revision=2),
    "math-shepherd": PRMFamily(
        "math-shepherd", "+", "-", shepherd_text, add_special_tokens=True, step_tag=f" {SHEPHERD_TAG}"
    ),
    "rlhflow": PRMFamily("rlhflow", "+", "-", rlhflow_text, add_special_tokens=False),
    "qwen-prm": RewardHeadFamily("qwen-prm", QWEN_PRM_SEPARATOR, qwen_prm_text),
    "likelihood": LikelihoodFamily("likelihood", policy_prompt),
}


def get_family(family: str | Family) -> Family:
    if isinstance(family, (PRMFamily, RewardHeadFamily, LikelihoodFamily)):
        return family
    if family not in PRM_FAMILIES:
        raise ConfigError(f"unknown PRM family {family!r}; known: {', '.join(sorted(PRM_FAMILIES))}")
    return PRM_FAMILIES[family]


def token_family(family: str | Family, backend: str) -> PRMFamily:
    """The family, which must be a token-probability one for `backend` (ConfigError otherwise)."""
    found = get_family(family)
    if isinstance(found, RewardHeadFamily):
        raise ConfigError(f"PRM family {found.name!r} is a reward-head model, which {backend} cannot score")
    if isinstance(found, LikelihoodFamily):
        raise ConfigError(f"PRM family {found.name!r} reads token likelihoods, not label tokens")
    return found


def is_reward_head(family: str | Family) -> bool:
    return isinstance(get_family(family), RewardHeadFamily)


def is_likelihood(family: str | Family) -> bool:
    return isinstance(get_family(family), LikelihoodFamily)
