"""A policy and a PRM on an OpenAI-compatible completions server (vLLM), over `/v1/completions`.

- `GET /v1/models` -> `data[0].id`: the served model (and the kind check)
- `POST /tokenize` (vLLM) -> `tokens`: the server's own tokenizer, for token counts and label ids
- `GET /metrics` (vLLM): `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_hits_total`,
  `vllm:prefix_cache_queries_total`, `vllm:prompt_tokens_cached_total`, `vllm:cache_config_info`

Policy: all children of a node are one request with `n` and a per-request `seed` (vLLM derives a
distinct stream per choice), so the shared prompt is prefilled once; `stop` is the step delimiter,
kept in the text by vLLM's `include_stop_str_in_output`.  Each choice's token count is the length of
its `token_ids` (vLLM's `return_token_ids`), prompt and cached-prompt tokens come from `usage`
(`usage.prompt_tokens_details.cached_tokens` when the server runs with
`--enable-prompt-tokens-details`).  Finish: `stop` with a string `stop_reason` is the delimiter,
`stop` without one is EOS, `length` is `max_tokens`.

PRM, token-probability families: the label is read from the next-token distribution at the end of
the rendered text, one one-token generation request per text: `max_tokens: 1`, `logprobs: 2` and
vLLM's `logprob_token_ids: [good, bad]`, which returns those two tokens' log-probabilities over the
whole vocabulary (vLLM's default `--logprobs-mode raw_logprobs`: before temperature or any logits
processor) whatever the top-k holds; `return_tokens_as_token_ids` keys them "token_id:N".  A
generation request reads the prefix cache, so a PRM text that starts with what the policy already
prefilled (the `judge` family's does) is served from the policy's cached blocks.  One text per
request, because vLLM reports a multi-prompt request's `cached_tokens` for its last prompt only.
A server that returns no such logprobs (an OpenAI-compatible server without vLLM's extension) is
scored with prompt logprobs instead: the text's tokens + each label token, `echo`, `max_tokens: 0`;
exact, but a request that wants prompt logprobs skips the prefix cache (vLLM's
`skip_reading_prefix_cache`).

PRM, likelihood families (`likelihood`): the text's token ids (`/tokenize`), `echo` with
`max_tokens: 0` and `logprobs: 0`, which returns `token_logprobs` for every prompt token; the
solution's are the last ones (the text's tokens past its prompt's), read by `likelihood_score`.
Prompt logprobs skip the prefix cache, so these texts are prefilled whole.

PRM, reward-head families (Qwen2.5-Math-PRM): vLLM's pooling runner, `POST /pooling` with
`task: token_classify` and `use_activation: false`.  With STEP pooling the server returns one row of
label logits per step separator (`--pooler-config '{"step_tag_id": N}'`, which vLLM presets to
151651, Qwen's `<extra_0>`) or one per token without a step tag; the rendered text ends with the
newest step's separator, so the last row is its score: softmax(row)[good].  vLLM's pooling runner
runs without prefix caching (token-wise pooling needs every position's hidden state), so each
request prefills its whole text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from etsq.errors import ModelError, PermanentError
from etsq.models.base import PRM, ExpandRequest, Policy, SamplingParams, ScoreRequest, StepSample
from etsq.models.config import ModelConfig
from etsq.models.http import RetryConfig, client_for, gather_all
from etsq.models.prm_families import (
    Family,
    LikelihoodFamily,
    RewardHeadFamily,
    get_family,
    likelihood_score,
    token_family,
)
from etsq.models.prompts import has_chat_template, template_tokenizer
from etsq.models.remote import (
    RemoteLikelihoodPRM,
    RemotePolicy,
    RemotePRM,
    ServedModel,
    abort,
    batches,
    delimited_step,
    label_token_ids,
    load_connected,
    single_token,
    softmax_at,
    tokenize,
    two_way,
)
from etsq.settings import Settings

BACKEND = "openai"


def load(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The backend loader (see etsq.models.backends): the run's models, once both servers answer."""
    return load_connected(_connect_pair, cfg, settings)


@lru_cache(maxsize=8)
def _connect_pair(
    cfg: ModelConfig, retry: RetryConfig
) -> tuple[OpenAIPolicy, OpenAIPRM | PoolingPRM | LikelihoodPRM]:
    # Cached per process: a long-lived worker keeps one pooled client per server across jobs.
    assert cfg.policy_url and cfg.prm_url, "load_models resolves the URLs"
    policy = OpenAIPolicy(connect(cfg.policy_url, cfg.policy, retry))
    return policy, make_prm(connect(cfg.prm_url, cfg.prm, retry), cfg.prm_family)


def connect(url: str, tokenizer_spec: str | None = None, retry: RetryConfig | None = None) -> ServedModel:
    """The model an OpenAI-compatible server serves; ModelError if the URL is not one."""
    client = client_for(url, retry)
    try:
        listing = client.call(client.get_json("/v1/models"))
    except PermanentError as exc:
        raise ModelError(
            f"{client.base_url} is not an OpenAI-compatible server (GET /v1/models: {exc})"
        ) from exc
    data = listing.get("data") if isinstance(listing, dict) else None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise ModelError(
            f"{client.base_url} is not an OpenAI-compatible server: /v1/models said {listing!r:.200}"
        )
    model = data[0]
    root = str(model.get("root") or model["id"])
    source = tokenizer_spec or root
    details = {
        "root": root,
        **({"max_model_len": str(model["max_model_len"])} if "max_model_len" in model else {}),
    }
    return ServedModel(BACKEND, client, str(model["id"]), source, template_tokenizer(source), details)


def finish_reason(choice: dict[str, Any], where: str) -> str:
    reason = choice.get("finish_reason")
    if reason == "stop":
        return "stop" if isinstance(choice.get("stop_reason"), str) else "eos"
    if reason == "length" or reason is None:
        return "length"
    if reason == "abort":
        raise abort(where, choice)
    raise ModelError(f"{where}: unknown finish_reason {reason!r}")


def cached_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        return int(details["cached_tokens"])
    return None


def _choices(out: Any, expected: int, where: str) -> list[dict[str, Any]]:
    choices = out.get("choices") if isinstance(out, dict) else None
    if not isinstance(choices, list) or len(choices) != expected:
        raise ModelError(f"{where}: expected {expected} choices, got {str(out)[:200]}")
    return sorted(choices, key=lambda c: int(c.get("index", 0)))


class OpenAIPolicy(RemotePolicy):
    """The `Policy` protocol on an OpenAI-compatible server."""

    health_path = "/v1/models"  # every OpenAI-compatible server has it; /health is vLLM's own

    def __init__(self, served: ServedModel) -> None:
        super().__init__(served, "vllm")
        # A chat template already writes BOS into the text; plain prompts get the tokenizer's.
        self.add_special_tokens = not has_chat_template(served.template)

    async def _expand_one(self, req: ExpandRequest, params: SamplingParams) -> list[StepSample]:
        out = await self.client.post_json("/v1/completions", self._body(req, params))
        usage = out.get("usage") or {}
        self.monitor.add_usage(int(usage.get("prompt_tokens", 0)), cached_tokens(usage))
        choices = _choices(out, req.n, self.served.url)
        return [self._step(c, usage, req.n, params.step_delimiter) for c in choices]

    def _body(self, req: ExpandRequest, params: SamplingParams) -> dict[str, Any]:
        return {
            "model": self.served.model_id,
            "prompt": req.text,
            "n": req.n,
            "max_tokens": params.max_step_tokens,
            "temperature": params.temperature,
            "stop": [params.step_delimiter] if params.step_delimiter else [],
            "seed": req.seed,
            "include_stop_str_in_output": True,
            "return_token_ids": True,
            "add_special_tokens": self.add_special_tokens,
            "skip_special_tokens": True,
        }

    def _step(self, choice: dict[str, Any], usage: dict[str, Any], n: int, delimiter: str) -> StepSample:
        if choice.get("token_ids") is not None:
            tokens = len(choice["token_ids"])
        elif n == 1 and "completion_tokens" in usage:
            tokens = int(usage["completion_tokens"])
        else:
            raise ModelError(f"{self.served.url} reports no per-choice token ids (vLLM's return_token_ids)")
        reason = finish_reason(choice, self.served.url)
        return delimited_step(str(choice.get("text", "")), reason, delimiter, tokens)


NEXT_TOKEN, PROMPT_LOGPROBS, POOLING = "next-token", "prompt-logprobs", "pooling"
_TOKEN_ID = "token_id:"  # vLLM's key prefix with return_tokens_as_token_ids


def make_prm(served: ServedModel, family: str | Family = "judge") -> OpenAIPRM | PoolingPRM | LikelihoodPRM:
    """The PRM client for `family` on this server: label logprobs, the pooling API for a reward
    head, or prompt logprobs for a likelihood family."""
    found = get_family(family)
    if isinstance(found, LikelihoodFamily):
        return LikelihoodPRM(served, found)
    if isinstance(found, RewardHeadFamily):
        return PoolingPRM(served, found)
    return OpenAIPRM(served, found)


def label_logprobs(choice: dict[str, Any]) -> dict[int, float]:
    """Token id -> log-probability at the first generated position (`token_id:N` keys)."""
    tops = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
    return {
        int(key[len(_TOKEN_ID) :]): float(value)
        for key, value in tops.items()
        if isinstance(key, str) and key.startswith(_TOKEN_ID) and value is not None
    }


async def echo_choices(
    prm: RemotePRM, prompts: list[list[int]] | list[str], add_special_tokens: bool | None = None
) -> list[dict[str, Any]]:
    """One prompt-logprob request (`echo`, `max_tokens: 0`): a choice per prompt, usage recorded.
    Texts are tokenized by the server, with its special tokens unless `add_special_tokens` is False."""
    body: dict[str, Any] = {
        "model": prm.served.model_id,
        "prompt": prompts,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
        "temperature": 0.0,
    }
    if add_special_tokens is not None:
        body["add_special_tokens"] = add_special_tokens  # vLLM's extra parameter
    out = await prm.client.post_json("/v1/completions", body)
    usage = out.get("usage") or {}
    prm.monitor.add_usage(int(usage.get("prompt_tokens", 0)), cached_tokens(usage))
    return _choices(out, len(prompts), prm.served.url)


class OpenAIPRM(RemotePRM):
    """The `PRM` protocol on an OpenAI-compatible server: the label tokens' next-token log-probabilities."""

    health_path = "/v1/models"

    def __init__(self, served: ServedModel, family: str | Family = "judge") -> None:
        super().__init__(served, "vllm")
        self.family = token_family(family, "an OpenAI-compatible completions server")
        self.label_ids = label_token_ids(self.family, self._tokenize_label, served.url)
        self.api = self._probe()
        self.info = served.info("prm", family=self.family.name, prm_api=self.api)

    def _probe(self) -> str:
        """Which API scores here: vLLM's label logprobs, else prompt logprobs (ModelError: no completions)."""
        try:
            read = self.client.call(self._label_read([self.label_ids[0]]))
        except PermanentError as exc:
            raise ModelError(
                f"{self.served.url} cannot score PRM family {self.family.name!r}: a one-token "
                f"completion with logprobs failed ({exc})"
            ) from exc
        return NEXT_TOKEN if read is not None else PROMPT_LOGPROBS

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        texts = [self.family.render(self.served.template, req) for req in requests]

        async def fan_out() -> list[float]:
            if self.api == PROMPT_LOGPROBS:
                return await self._prompt_logprob_scores(texts)
            # One request per text: vLLM reports a batch's cached tokens for its last prompt only.
            reads = await gather_all(*(self._label_read(text) for text in texts))
            missing = [t for t, read in zip(texts, reads, strict=True) if read is None]
            fallback = iter(await self._prompt_logprob_scores(missing) if missing else [])
            return [read if read is not None else next(fallback) for read in reads]

        return self._run(fan_out)  # type: ignore[no-any-return]

    async def _label_read(self, prompt: str | list[int]) -> float | None:
        """The prompt's score from one generated position; None where the labels are missing."""
        body = {
            "model": self.served.model_id,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": len(self.label_ids),
            "logprob_token_ids": self.label_ids,
            "return_tokens_as_token_ids": True,
            "add_special_tokens": self.family.add_special_tokens,
        }
        out = await self.client.post_json("/v1/completions", body)
        usage = out.get("usage") or {}
        self.monitor.add_usage(int(usage.get("prompt_tokens", 0)), cached_tokens(usage))
        [choice] = _choices(out, 1, self.served.url)
        return self._two_way(choice)

    def _two_way(self, choice: dict[str, Any]) -> float | None:
        found = label_logprobs(choice)
        good, bad = self.label_ids
        return two_way(found[good], found[bad]) if good in found and bad in found else None

    async def _prompt_logprob_scores(self, texts: list[str]) -> list[float]:
        prefixes = await gather_all(
            *(tokenize(self.served, t, self.family.add_special_tokens) for t in texts)
        )
        prompts = [[*ids, label] for ids in prefixes for label in self.label_ids]
        results = await gather_all(*(self._logprobs(group) for group in batches(prompts)))
        flat = [lp for group in results for lp in group]
        return [two_way(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    async def _logprobs(self, prompts: list[list[int]]) -> list[float]:
        """log p(last token | the tokens before it) of each prompt."""
        return [self._last_logprob(c) for c in await echo_choices(self, prompts)]

    def _last_logprob(self, choice: dict[str, Any]) -> float:
        values = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
        if not values or values[-1] is None:
            raise ModelError(
                f"{self.served.url} returned no prompt logprobs (echo + logprobs): {choice!r:.200}"
            )
        return float(values[-1])


class PoolingPRM(RemotePRM):
    """A reward-head PRM on vLLM's pooling runner: the head's labels at the newest step separator."""

    health_path = "/v1/models"

    def __init__(self, served: ServedModel, family: RewardHeadFamily) -> None:
        super().__init__(served, "vllm")
        self.family = family
        self.separator_id = single_token(self._tokenize_label(family.separator), family.separator, served.url)
        self._check_head()
        self.info = served.info("prm", family=family.name, prm_api=POOLING)

    def _check_head(self) -> None:
        """Refuse a server without a pooling model that has this family's head (ModelError)."""
        try:
            self.client.call(self._pool([[self.separator_id]]))
        except PermanentError as exc:
            raise ModelError(
                f"{self.served.url} has no process reward head for PRM family {self.family.name!r} "
                f"(POST /pooling, task token_classify: {exc}); serve the PRM with vLLM's pooling runner"
            ) from exc

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        texts = [self.family.render(self.served.template, req) for req in requests]

        async def fan_out() -> list[float]:
            groups = await gather_all(*(self._pool(group) for group in batches(texts)))
            return [score for group in groups for score in group]

        return self._run(fan_out)  # type: ignore[no-any-return]

    async def _pool(self, inputs: list[str] | list[list[int]]) -> list[float]:
        body = {
            "model": self.served.model_id,
            "input": inputs,
            "task": "token_classify",
            "use_activation": False,  # raw logits: the softmax is ours, whatever the server's activation
            "add_special_tokens": self.family.add_special_tokens,
        }
        out = await self.client.post_json("/pooling", body)
        usage = out.get("usage") or {}
        self.monitor.add_usage(int(usage.get("prompt_tokens", 0)), cached_tokens(usage))
        items = out.get("data") if isinstance(out, dict) else None
        if not isinstance(items, list) or len(items) != len(inputs):
            raise ModelError(
                f"{self.served.url}: expected {len(inputs)} pooling results, got {str(out)[:200]}"
            )
        return [self._newest(item) for item in sorted(items, key=lambda i: int(i.get("index", 0)))]

    def _newest(self, item: dict[str, Any]) -> float:
        """The good label's probability in the last row: the newest step's separator."""
        rows = item.get("data")
        if not isinstance(rows, list) or not rows:
            raise ModelError(
                f"{self.served.url} returned no row at the step separator {self.family.separator!r} "
                f"(token {self.separator_id}): start vLLM with "
                f"--pooler-config '{{\"step_tag_id\": {self.separator_id}}}'"
            )
        logits = rows[-1]
        if not isinstance(logits, list) or len(logits) != self.family.n_labels:
            raise ModelError(
                f"{self.served.url} has no {self.family.n_labels}-label process reward head: a step row "
                f"is {str(logits)[:100]}"
            )
        return softmax_at([float(x) for x in logits], self.family.good)


class LikelihoodPRM(RemoteLikelihoodPRM):
    """A likelihood-family PRM on an OpenAI-compatible server: its prompt logprobs of the solution."""

    api_description = "prompt logprobs (echo, max_tokens 0)"
    health_path = "/v1/models"

    def __init__(self, served: ServedModel, family: LikelihoodFamily) -> None:
        super().__init__(served, "vllm")
        self.family = family
        self.info = served.info("prm", family=family.name, prm_api=PROMPT_LOGPROBS)
        self._probe()

    # The server tokenizes each text (as /tokenize would: same tokenizer, same special tokens), so a
    # scored text costs no /tokenize round trip of its own.
    sends_text = True

    async def _scores(self, rows: list[tuple[str | list[int], int]]) -> list[float]:
        prompts: Any = [prompt for prompt, _ in rows]  # texts (or token ids, with sends_text off)
        choices = await echo_choices(self, prompts, self.family.add_special_tokens)
        return [self._read(choice, start) for choice, (_, start) in zip(choices, rows, strict=True)]

    def _read(self, choice: dict[str, Any], start: int) -> float:
        values = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
        tail = values[min(start, len(values) - 1) :] if values else []  # at least one solution token
        if not tail or any(v is None for v in tail):
            raise ModelError(
                f"{self.served.url} returned no prompt logprobs for the solution's tokens (from token "
                f"{start}): {choice!r:.200}"
            )
        return likelihood_score([float(v) for v in tail])
