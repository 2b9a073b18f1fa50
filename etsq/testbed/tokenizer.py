"""The testbed tokenizer: every number 0..99 and every signed digit ("+3", "-7") is one token.

A word-level `tokenizers` model behind a regex pre-tokenizer that isolates, in order: the
Math-Shepherd step tag " ки", the answer phrase, the step delimiter "\\n\\n", a sign and a digit
(an operation of the task: one token, so "which operation comes next" is a one-token lookup),
one- or two-digit numbers, then any single character (so "+" and "-" alone, the PRM's labels).
The fused decoder concatenates tokens, so decoding gives back the text exactly (spaces and newlines
included); a character outside the vocabulary (printable ASCII and the newline) is `<unk>`.
No special token is added on encoding: the policy's prompt and the PRM's text tokenize the same
with or without `add_special_tokens`, on every backend.

The chat template ignores the system message and renders `Q: <question>\\nA:\\n`, the prompt the
policy is trained on.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from etsq.testbed.arith import ANSWER_PHRASE, STEP_DELIMITER

SHEPHERD_TAG = " ки"  # etsq.models.prm_families: each PRM step ends with " " + SHEPHERD_TAG
GOOD, BAD = "+", "-"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PROMPT_PREFIX, PROMPT_SUFFIX = "Q: ", "\nA:\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + PROMPT_PREFIX
    + "{{ message['content'] }}{% endif %}{% endfor %}"
    + "{% if add_generation_prompt %}{{ '"
    + PROMPT_SUFFIX.replace("\n", "\\n")
    + "' }}{% endif %}"
)
WORDS = (SHEPHERD_TAG, ANSWER_PHRASE, STEP_DELIMITER)
MAX_LENGTH = 256


def prompt(question: str) -> str:
    """The policy's prompt for a question: what the chat template renders."""
    return f"{PROMPT_PREFIX}{question}{PROMPT_SUFFIX}"


def vocabulary() -> list[str]:
    """Special tokens, the task's words, numbers 0..99 (and 00..09), then single characters."""
    numbers = [str(i) for i in range(100)] + [f"0{i}" for i in range(10)]
    numbers += [f"{sign}{d}" for sign in "+-" for d in range(10)]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab: list[str] = [*SPECIAL_TOKENS, *WORDS]
    for token in numbers + chars:
        if token not in vocab:
            vocab.append(token)
    return vocab


def _split_pattern() -> str:
    words = "|".join(re.escape(w) for w in WORDS)
    return f"{words}|[+-][0-9]|[0-9][0-9]?|[^\\n]|\\n"


def build_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` with the testbed vocabulary and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_split_pattern()), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(path: Path) -> None:
    build_tokenizer().save_pretrained(str(path))
