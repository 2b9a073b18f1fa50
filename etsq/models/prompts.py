"""Prompt templates shared by every backend: the policy's question prompt and chat templates.

A model's chat template lives in its tokenizer.  In-process models have theirs; for a model behind a
server, `template_tokenizer` loads the tokenizer files the server reports (a local directory or a
hub id already in the local cache), and without one the plain text template is used.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "Solve the following math problem step by step. Separate the steps with a blank line. "
    "Finish with the sentence 'The answer is: \\boxed{ANSWER}', where ANSWER is the final answer."
)


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Messages rendered by the tokenizer's chat template, ending with the assistant's turn."""
    text: Any = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def format_question(tokenizer: PreTrainedTokenizerBase | None, question: str) -> str:
    """The root text: the question in the model's prompt template (plain text without one)."""
    if tokenizer is None or not has_chat_template(tokenizer):
        return f"{SYSTEM_PROMPT}\n\nQuestion: {question}\n\nAnswer:\n"
    template = tokenizer.chat_template
    if isinstance(template, str):  # the key names the template: one set later renders anew
        return _rendered_question(tokenizer, template, question)
    return _render_question(tokenizer, question)


@lru_cache(maxsize=4096)
def _rendered_question(tokenizer: PreTrainedTokenizerBase, template: str, question: str) -> str:
    # PRM families put the question before the steps of every scored node: a search rendered it
    # through jinja once per node, on the HTTP loop (12% of that thread's CPU at W=8).
    return _render_question(tokenizer, question)


def _render_question(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    try:
        return chat(tokenizer, messages)
    except Exception:  # jinja raises for templates without a system role
        return chat(tokenizer, [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{question}"}])


def template_tokenizer(source: str | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer at `source` (a directory or a cached hub id) for its chat template, else None.

    Only local files are read: a worker must not stall on a download, and the plain template works.
    """
    if not source:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("no local tokenizer for %s (%s); using the plain prompt template", source, exc)
        return None
