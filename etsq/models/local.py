"""In-process transformers models: a policy that samples reasoning steps and a PRM that scores them.

One `LoadedModel` (weights + tokenizer) can back both roles.  The policy samples with a per-request
`torch.Generator` seeded from the request's seed, so a request's samples do not depend on which other
requests share its batch.  Steps stop at a text delimiter ("\\n\\n"), at EOS or at `max_step_tokens`.
The PRM reads the next-token logits of two label tokens ("Yes"/"No" for an LM judge, "+"/"-" for
Math-Shepherd) and returns p(good) from a 2-way softmax; a likelihood-family PRM
(`LocalLikelihoodPRM`) reads its own log-probabilities of the solution's tokens instead.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from etsq.errors import ConfigError, ModelError
from etsq.models.base import ExpandRequest, ModelInfo, SamplingParams, ScoreRequest, StepSample
from etsq.models.prm_families import (
    PRM_FAMILIES,
    Family,
    LikelihoodFamily,
    PRMFamily,
    get_family,
    judge_text,
    likelihood_score,
    shepherd_text,
    token_family,
)
from etsq.models.prompts import SYSTEM_PROMPT, format_question

__all__ = [
    "PRM_FAMILIES",
    "SYSTEM_PROMPT",
    "LoadedModel",
    "LocalPRM",
    "LocalPolicy",
    "PRMFamily",
    "get_family",
    "judge_text",
    "load_causal_lm",
    "shepherd_text",
    "split_step",
]

BACKEND = "transformers"
MAX_EXPAND_ROWS = 16  # sequences per generate() call: bounds KV-cache memory
MAX_SCORE_ROWS = 8  # sequences per PRM forward pass: bounds activation memory


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, loaded once and shared by the policy and the PRM."""

    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")


def configure_threads(wanted: int | None = None) -> int:
    """Set torch's intra-op threads to `wanted` (ETSQ_TORCH_THREADS), else one fewer than this process's CPUs.

    One core is left to the rest of the worker (Celery, database writes, the CLI beside it):
    OpenMP threads that share a core spin against each other, and on 2 cores generation measured
    1.3 tok/s with 2 threads against 32.8 tok/s with 1.
    """
    threads = wanted or max(1, len(os.sched_getaffinity(0)) - 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, threads))
    return int(torch.get_num_threads())


def load_dtype() -> torch.dtype | str:
    # Most CPUs lack fast bf16 matmuls (8x slower than fp32 on AVX2), so CPU inference runs in fp32.
    return "auto" if torch.cuda.is_available() else torch.float32


def load_causal_lm(path: str, threads: int | None = None) -> LoadedModel:
    """Load a model directory or hub id for inference; raises ModelError when that fails."""
    configure_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load model {path!r}: {exc}") from exc
    if torch.cuda.is_available():
        model = model.to("cuda")
    prepare_tokenizer(tokenizer, path)
    return LoadedModel(path, model.eval(), tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    # Batches are left-padded so every row's next token sits at the last position.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token


class _Loaded(Protocol):
    """What batch encoding needs of a loaded model (a causal LM here, a reward model in reward_head)."""

    model: Any
    tokenizer: Any


def encode_batch(loaded: _Loaded, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
    """Left-padded input ids and attention mask on the model's device."""
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    return {k: v.to(loaded.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _info(name: str, loaded: LoadedModel, **details: str) -> ModelInfo:
    return ModelInfo(name, BACKEND, {"path": loaded.path, "dtype": loaded.dtype, **details})


def chunks(items: Sequence[Any], size: Callable[[Any], int], limit: int) -> Iterator[list[Any]]:
    """Consecutive groups whose total size stays within `limit` (an oversized item goes alone)."""
    group: list[Any] = []
    total = 0
    for item in items:
        if group and total + size(item) > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += size(item)
    if group:
        yield group


# --------------------------------------------------------------------------- policy


def split_step(
    generated: Sequence[int], eos_ids: set[int], decode: Callable[[Sequence[int]], str], delimiter: str
) -> StepSample:
    """Turn one row of generated token ids into a step: cut after the first delimiter, or at EOS.

    `tokens` counts the generated tokens the step used, including the one completing the delimiter
    and the EOS token (which is left out of the text).  Anything after that is padding or overshoot.
    """
    eos_at = next((i for i, t in enumerate(generated) if t in eos_ids), None)
    body = list(generated if eos_at is None else generated[:eos_at])
    stop = _delimiter_end(body, decode, delimiter)
    if stop is not None:
        text = decode(body[:stop])
        return StepSample(text[: text.index(delimiter) + len(delimiter)], stop, "stop")
    if eos_at is not None:
        return StepSample(decode(body), eos_at + 1, "eos")
    return StepSample(decode(body), len(body), "length")


def _delimiter_end(body: list[int], decode: Callable[[Sequence[int]], str], delimiter: str) -> int | None:
    """The fewest leading tokens whose text contains the delimiter (a binary search: it only grows)."""
    if not delimiter or delimiter not in decode(body):
        return None
    return bisect.bisect_left(range(1, len(body) + 1), True, key=lambda k: delimiter in decode(body[:k])) + 1


class _SeededSampler(LogitsProcessor):
    """A logits processor that samples each request's rows from that request's own generator.

    It returns scores that are -inf everywhere but the chosen token, so generate() runs greedy and
    keeps exactly that choice.  Temperature <= 0 means greedy.
    """

    def __init__(self, requests: Sequence[ExpandRequest], temperature: float) -> None:
        self.temperature = temperature
        self.groups: list[tuple[slice, torch.Generator]] = []
        start = 0
        for req in requests:
            generator = torch.Generator().manual_seed(req.seed & 0xFFFF_FFFF_FFFF_FFFF)
            self.groups.append((slice(start, start + req.n), generator))
            start += req.n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice = self._choose(scores.float())
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice.to(scores.device).unsqueeze(1), 0.0)

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return scores.argmax(dim=-1)
        # Generators live on the CPU; sampling there keeps results identical across devices.
        probs = torch.softmax(scores / self.temperature, dim=-1).cpu()
        picks = [torch.multinomial(probs[rows], 1, generator=gen).squeeze(1) for rows, gen in self.groups]
        return torch.cat(picks)


class _DelimiterStop(StoppingCriteria):
    """A stopping criterion: a row is done once its generated text contains the delimiter."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int, delimiter: str) -> None:
        self.tokenizer, self.prompt_len, self.delimiter = tokenizer, prompt_len, delimiter

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :])
        done = [bool(self.delimiter) and self.delimiter in text for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class LocalPolicy:
    """The `Policy` protocol on an in-process causal LM."""

    def __init__(self, loaded: LoadedModel, name: str | None = None, max_rows: int = MAX_EXPAND_ROWS) -> None:
        self.loaded = loaded
        self.max_rows = max_rows
        self.eos_ids = _eos_ids(loaded)
        self.info = _info(name or loaded.path, loaded, role="policy")

    def format_prompt(self, question: str) -> str:
        return format_question(self.loaded.tokenizer, question)

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def expand(self, requests: list[ExpandRequest], params: SamplingParams) -> list[list[StepSample]]:
        if params.max_step_tokens < 1:
            raise ConfigError(f"max_step_tokens must be >= 1, got {params.max_step_tokens}")
        results: list[list[StepSample]] = []
        for chunk in chunks(requests, lambda r: r.n, self.max_rows):
            results.extend(self._expand_chunk(chunk, params))
        return results

    def _expand_chunk(self, chunk: list[ExpandRequest], params: SamplingParams) -> list[list[StepSample]]:
        texts = [req.text for req in chunk for _ in range(req.n)]
        if not texts:  # only n=0 requests
            return [[] for _ in chunk]
        enc = encode_batch(self.loaded, texts)
        prompt_len = enc["input_ids"].shape[1]
        stop = _DelimiterStop(self.loaded.tokenizer, prompt_len, params.step_delimiter)
        with torch.inference_mode():
            out = self.loaded.model.generate(
                **enc,
                generation_config=self._generation_config(params),
                logits_processor=LogitsProcessorList([_SeededSampler(chunk, params.temperature)]),
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        rows = iter(zip(enc["input_ids"].tolist(), out[:, prompt_len:].tolist(), strict=True))
        return [[self._to_step(*next(rows), params.step_delimiter) for _ in range(req.n)] for req in chunk]

    def server_stats(self) -> dict[str, Any]:
        return {}  # no server: the analytic KV is the only figure

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # Sampling happens in _SeededSampler, so generate() itself runs greedy with no other processors.
        return GenerationConfig(
            max_new_tokens=params.max_step_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.loaded.tokenizer.pad_token_id,
        )

    def _to_step(self, prompt_ids: list[int], generated: list[int], delimiter: str) -> StepSample:
        decode = _context_decoder(self.loaded.tokenizer, prompt_ids)
        return split_step(generated, self.eos_ids, decode, delimiter)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    configured = loaded.model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def _context_decoder(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]
) -> Callable[[Sequence[int]], str]:
    """Decode generated ids after a few prompt tokens, so tokenizers that drop a leading space keep it."""
    context = prompt_ids[-4:]  # left padding: the last tokens are real prompt tokens
    prefix = tokenizer.decode(context)

    def decode(ids: Sequence[int]) -> str:
        text = str(tokenizer.decode(context + list(ids)))
        return str(text[len(prefix) :] if text.startswith(prefix) else tokenizer.decode(list(ids)))

    return decode


# --------------------------------------------------------------------------- PRM


Item = TypeVar("Item")


def score_by_length(
    items: list[Item],
    score_items: Callable[[list[Item]], list[float]],
    max_rows: int,
    length: Callable[[Item], int],
) -> list[float]:
    """Scores of `items` in their order, computed in batches of at most `max_rows` similar lengths
    (scoring similar lengths together wastes less compute on padding)."""
    order = sorted(range(len(items)), key=lambda i: length(items[i]))
    scores = [0.0] * len(items)
    for chunk in chunks(order, lambda _: 1, max_rows):
        for i, p in zip(chunk, score_items([items[i] for i in chunk]), strict=True):
            scores[i] = p
    return scores


def label_token_id(tokenizer: PreTrainedTokenizerBase, label: str, path: str) -> int:
    """The single token id of a label; a label split in several tokens cannot be read from one logit."""
    ids = tokenizer.encode(label, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelError(
            f"PRM label {label!r} is {len(ids)} tokens {ids} in the tokenizer of {path!r}, not one"
        )
    return int(ids[0])


class LocalPRM:
    """The `PRM` protocol on an in-process causal LM, prompted as one of `PRM_FAMILIES`."""

    def __init__(
        self,
        loaded: LoadedModel,
        family: str | Family = "judge",
        name: str | None = None,
        max_rows: int = MAX_SCORE_ROWS,
    ) -> None:
        self.loaded = loaded
        self.family = token_family(family, "a causal LM's next-token logits")
        self.max_rows = max_rows
        self.label_ids = [label_token_id(loaded.tokenizer, label, loaded.path) for label in self._labels()]
        self.info = _info(name or loaded.path, loaded, role="prm", family=self.family.name)

    def server_stats(self) -> dict[str, Any]:
        return {}

    def _labels(self) -> tuple[str, str]:
        return self.family.good, self.family.bad

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        texts = [self.family.render(self.loaded.tokenizer, req) for req in requests]
        return score_by_length(texts, self._score_texts, self.max_rows, len)

    def _score_texts(self, texts: list[str]) -> list[float]:
        enc = encode_batch(self.loaded, texts, self.family.add_special_tokens)
        # Left padding shifts tokens right; positions must count real tokens only, as generate() does.
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.loaded.model(**enc, position_ids=positions, use_cache=False, logits_to_keep=1)
        pair = out.logits[:, -1, self.label_ids].float()
        return [float(p) for p in torch.softmax(pair, dim=-1)[:, 0].tolist()]


class LocalLikelihoodPRM:
    """The `PRM` protocol for a likelihood family (`likelihood_score`) on an in-process causal LM."""

    def __init__(
        self,
        loaded: LoadedModel,
        family: str | Family = "likelihood",
        name: str | None = None,
        max_rows: int = MAX_SCORE_ROWS,
    ) -> None:
        found = get_family(family)
        if not isinstance(found, LikelihoodFamily):
            raise ConfigError(f"PRM family {found.name!r} is not a likelihood family")
        self.loaded, self.family, self.max_rows = loaded, found, max_rows
        self.info = _info(name or loaded.path, loaded, role="prm", family=found.name)

    def server_stats(self) -> dict[str, Any]:
        return {}

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        rows = [self._encode(req) for req in requests]
        return score_by_length(rows, self._score_rows, self.max_rows, lambda row: len(row[0]))

    def _encode(self, req: ScoreRequest) -> tuple[list[int], int]:
        """The text's token ids and how many of them (at the end) are the solution's."""
        tokenizer, special = self.loaded.tokenizer, self.family.add_special_tokens
        ids = tokenizer.encode(self.family.render(tokenizer, req), add_special_tokens=special)
        head = tokenizer.encode(self.family.prompt(tokenizer, req), add_special_tokens=special)
        return list(ids), max(1, len(ids) - len(head))

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[float]:
        width = max(len(ids) for ids, _ in rows)
        pad = self.loaded.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r, _ in rows], device=self.loaded.model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _ in rows], device=ids.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(n for _, n in rows) + 1  # rows end together: the last positions hold every solution
        with torch.inference_mode():
            out = self.loaded.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=keep,
            )
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        taken = logprobs.gather(-1, ids[:, width - keep + 1 :, None])[..., 0]
        return [likelihood_score(taken[i, taken.shape[1] - n :].tolist()) for i, (_, n) in enumerate(rows)]
