"""What the HTTP backends share: a served model's identity, the policy and PRM bases, step parsing.

`ServedModel` is one model behind one server URL as the backends see it: the pooled client, the KV
monitor, the served model's id and the tokenizer whose chat template formats prompts.
`RemotePolicy` and `RemotePRM` hold what the SGLang and OpenAI-compatible clients do alike (prompt
formatting, token counting through `/tokenize`, the per-depth fan-out, label token ids); each backend
module adds only its own request and response shapes.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from etsq.errors import ConfigError, ModelError, PermanentError, TransientError
from etsq.models.base import PRM, ExpandRequest, ModelInfo, Policy, SamplingParams, ScoreRequest, StepSample
from etsq.models.http import RetryConfig, ServerClient, gather_all
from etsq.models.metrics import KVMonitor
from etsq.models.prm_families import LikelihoodFamily, PRMFamily
from etsq.models.prompts import format_question, has_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from etsq.models.config import ModelConfig
    from etsq.settings import Settings

MAX_BATCH = 64  # prompts per request: bounds request size and the server's batch


@dataclass
class ServedModel:
    """One model behind one server: how to reach it and what it is."""

    backend: str  # "sglang" | "openai"
    client: ServerClient
    model_id: str
    tokenizer_source: str | None
    template: PreTrainedTokenizerBase | None
    details: dict[str, str]

    @property
    def url(self) -> str:
        return self.client.base_url

    def info(self, role: str, **extra: str) -> ModelInfo:
        template = "chat" if has_chat_template(self.template) else "plain"
        details = {"url": self.url, "model_id": self.model_id, "template": template, "role": role}
        return ModelInfo(self.model_id, self.backend, {**self.details, **details, **extra})

    def format_prompt(self, question: str) -> str:
        return format_question(self.template, question)


class RemoteRole:
    """Base of the HTTP policies and PRMs: the per-depth KV monitor and the reachability check."""

    health_path = "/health"

    def __init__(self, served: ServedModel, flavour: str) -> None:
        self.served = served
        self.client = served.client
        self.monitor = KVMonitor(served.client, flavour)

    def server_stats(self) -> dict[str, Any]:
        """The calling job's server figures since its last call (the job's thread names the job)."""
        owner = threading.get_ident()
        figures = self.monitor.take_sampled(owner)
        return figures if figures is not None else self.client.call(self.monitor.take(owner))

    def ensure_reachable(self) -> None:
        """Raise TransientError (after the client's retries) unless the server answers its health check."""
        self.client.call(self.client.request("GET", self.health_path))

    def _run(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run `work()` on the background loop while the monitor samples the server's KV."""

        owner = threading.get_ident()  # the job's thread; the monitor keeps each job's figures apart

        async def watched() -> Any:
            return await self.monitor.watch(work(), owner)

        return self.client.call(watched())


class RemotePolicy(RemoteRole):
    """The `Policy` protocol over HTTP: every child of a depth is requested at once."""

    add_special_tokens = True  # whether the server adds the tokenizer's BOS to a raw text prompt

    def __init__(self, served: ServedModel, flavour: str) -> None:
        super().__init__(served, flavour)
        self.info = served.info("policy")

    def format_prompt(self, question: str) -> str:
        return self.served.format_prompt(question)

    def count_tokens(self, text: str) -> int:
        # Count what the server will prefill for this text.
        return len(self.client.call(tokenize(self.served, text, self.add_special_tokens)))

    def expand(self, requests: list[ExpandRequest], params: SamplingParams) -> list[list[StepSample]]:
        if params.max_step_tokens < 1:
            raise ConfigError(f"max_step_tokens must be >= 1, got {params.max_step_tokens}")

        async def fan_out() -> list[list[StepSample]]:
            return await gather_all(*(self._expand_one(req, params) for req in requests if req.n > 0))

        samples = iter(self._run(fan_out))
        return [next(samples) if req.n > 0 else [] for req in requests]

    async def _expand_one(self, req: ExpandRequest, params: SamplingParams) -> list[StepSample]:
        """The `req.n` children of one node, in one request."""
        raise NotImplementedError


class RemotePRM(RemoteRole):
    """Base of the HTTP PRMs: label token ids come from the server's own tokenizer."""

    def _tokenize_label(self, label: str) -> list[int]:
        return self.client.call(tokenize(self.served, label, False))


class RemoteLikelihoodPRM(RemotePRM):
    """A likelihood-family PRM on a server: the solution tokens' log-probabilities, read by
    `likelihood_score`; each backend sends a batch of rows in `_scores`, each row the family's text
    (or its token ids, for a backend that sends ids) and the position of its first solution token."""

    family: LikelihoodFamily
    api_description = ""  # what `_scores` asks the server for, named when the probe fails
    # Whether `_scores` sends the text, which the server tokenizes itself: then a scored text costs no
    # /tokenize round trip of its own, only its problem's prompt does, once.  Else rows carry token ids.
    sends_text = False

    def __init__(self, served: ServedModel, flavour: str) -> None:
        super().__init__(served, flavour)
        # Prompt token counts by prompt text: every node of a problem shares its prompt, so it is
        # tokenized once per problem.
        self._prompt_lengths: dict[str, asyncio.Future[int]] = {}

    def _probe(self) -> None:
        """Refuse a server that cannot return these log-probabilities (ModelError, one line)."""
        try:
            self.score([ScoreRequest("1+1", ("2",))])
        except PermanentError as exc:
            raise ModelError(
                f"{self.served.url} cannot score PRM family {self.family.name!r}: "
                f"{self.api_description} failed ({exc})"
            ) from exc

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        async def fan_out() -> list[float]:
            rows = await gather_all(*(self._row(req) for req in requests))
            results = await gather_all(*(self._scores(group) for group in batches(rows)))
            return [score for group in results for score in group]

        return self._run(fan_out)  # type: ignore[no-any-return]

    async def _row(self, req: ScoreRequest) -> tuple[str | list[int], int]:
        """The family's text (as token ids unless `sends_text`) and its first solution token's index:
        the prompt's token count (the text's tokens start with the prompt's)."""
        special = self.family.add_special_tokens
        text = self.family.render(self.served.template, req)
        start = await self._prompt_length(self.family.prompt(self.served.template, req), special)
        if self.sends_text:
            return text, start
        ids = await tokenize(self.served, text, special)
        return ids, min(start, len(ids) - 1)  # at least one solution token

    async def _prompt_length(self, prompt: str, special: bool) -> int:
        """The prompt's token count, one /tokenize per prompt: a depth's texts, scored at once, share
        the count in flight.  A failed count is not kept."""
        lengths = self._prompt_lengths
        counting = lengths.get(prompt)
        if counting is None:
            if len(lengths) >= 4096:  # a long-lived worker: forget finished problems' prompts
                lengths.clear()
            counting = lengths[prompt] = asyncio.ensure_future(self._count(prompt, special))
            counting.add_done_callback(lambda done: self._forget_failed(prompt, done))
        return await asyncio.shield(counting)  # one caller cancelled does not cancel the others'

    def _forget_failed(self, prompt: str, done: asyncio.Future[int]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._prompt_lengths.get(prompt) is done:
            del self._prompt_lengths[prompt]

    async def _count(self, prompt: str, special: bool) -> int:
        return len(await tokenize(self.served, prompt, special))

    async def _scores(self, rows: list[tuple[str | list[int], int]]) -> list[float]:
        raise NotImplementedError


# Held while a backend connects a run's servers.  Its connection is cached per process, but the
# cache lets concurrent first calls each connect, and a worker's first jobs arrive together: each
# then loaded the server's tokenizer, and transformers' lazy imports, entered from several threads
# at once, failed some of them ("cannot import name 'AutoTokenizer'"), 14 of 80 jobs in one sweep.
_CONNECTING = threading.Lock()


def load_connected(
    connect_pair: Callable[[ModelConfig, RetryConfig], tuple[Policy, PRM]],
    cfg: ModelConfig,
    settings: Settings,
) -> tuple[Policy, PRM]:
    """A backend's loader: its (cached) `connect_pair`, called one at a time, once both servers answer."""
    with _CONNECTING:
        pair = connect_pair(cfg, RetryConfig.from_settings(settings))
    return ready(*pair)


def ready(policy: Policy, prm: PRM) -> tuple[Policy, PRM]:
    """The models, once both servers answer their health check (TransientError otherwise)."""
    for model in (policy, prm):
        if isinstance(model, RemoteRole):
            model.ensure_reachable()
    return policy, prm


async def tokenize(served: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids from the server's `/tokenize` (SGLang and vLLM take the same body)."""
    body = {"model": served.model_id, "prompt": text, "add_special_tokens": add_special_tokens}
    try:
        out = await served.client.post_json("/tokenize", body)
    except PermanentError as exc:  # an older or stricter server: the local tokenizer, if there is one
        return local_tokens(served, text, add_special_tokens, exc)
    return [int(t) for t in out["tokens"]]


def local_tokens(served: ServedModel, text: str, add_special_tokens: bool, exc: PermanentError) -> list[int]:
    """Token ids from the local copy of the served tokenizer, for a server without /tokenize (404)."""
    if "HTTP 404" not in str(exc):
        raise exc
    if served.template is None:
        raise ModelError(
            f"{served.url} has no /tokenize endpoint and no local tokenizer ({served.tokenizer_source}) "
            "to count tokens with; pass --policy-model/--prm-model DIR"
        ) from exc
    return list(served.template.encode(text, add_special_tokens=add_special_tokens))


def delimited_step(text: str, reason: str, delimiter: str, tokens: int) -> StepSample:
    """A step from a server's completion: cut after the first delimiter, which is kept in the text.

    A server that trims the matched stop string (or overshoots it) still yields the same step text.
    """
    if delimiter and delimiter in text:
        return StepSample(text[: text.index(delimiter) + len(delimiter)], tokens, "stop")
    if reason == "stop" and delimiter:
        return StepSample(text + delimiter, tokens, "stop")
    return StepSample(text, tokens, reason)


def two_way(good_logprob: float, bad_logprob: float) -> float:
    """p(good) / (p(good) + p(bad)) from two log-probabilities, computed stably."""
    top = max(good_logprob, bad_logprob)
    if math.isinf(top) and top < 0:
        return 0.5  # neither label has any mass: no opinion
    good, bad = math.exp(good_logprob - top), math.exp(bad_logprob - top)
    return good / (good + bad)


def softmax_at(logits: list[float], index: int) -> float:
    """softmax(logits)[index], computed stably."""
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return weights[index] / sum(weights)


def single_token(ids: list[int], label: str, where: str) -> int:
    """The one token id of a PRM label; a label the tokenizer splits cannot be read from one logit."""
    if len(ids) != 1:
        raise ModelError(
            f"{where} is the wrong kind of PRM server: its tokenizer has no single token for the "
            f"PRM label {label!r} (it is {len(ids)} tokens {ids})"
        )
    return ids[0]


def label_token_ids(
    family: PRMFamily, tokenize: Callable[[str], list[int]], where: str, step_tag: bool = False
) -> list[int]:
    """The [good, bad] (and optionally step-tag) token ids, read from the server's tokenizer."""
    ids = [single_token(tokenize(label), label, where) for label in family.labels]
    if step_tag:
        if not family.step_tag:
            raise ModelError(f"PRM family {family.name!r} has no step tag to score at")
        ids.append(_tag_token(family.step_tag, tokenize, where))
    return ids


def _tag_token(tag: str, tokenize: Callable[[str], list[int]], where: str) -> int:
    # BPE tokenizers merge the tag with its leading space; SentencePiece ones add the space themselves.
    ids = tokenize(tag)
    return ids[0] if len(ids) == 1 else single_token(tokenize(tag.strip()), tag.strip(), where)


def batches(items: list[Any], size: int = MAX_BATCH) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def abort(where: str, detail: Any) -> TransientError:
    """A server that aborted a request (overload, restart, preemption): retrying later may work."""
    return TransientError(f"{where}: the server aborted the request: {detail}")
