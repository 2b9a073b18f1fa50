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

PRM (token-probability families): prompt logprobs.  The rendered text is tokenized by the server and
sent twice as token ids, once followed by the good label and once by the bad one, with `echo`,
`max_tokens: 0` and `logprobs: 0`; the last prompt token's logprob is log p(label | text).  This is
exact for any label, but costly on vLLM: a request that wants prompt logprobs computes them at every
prompt position and skips reading the prefix cache (vLLM's `skip_reading_prefix_cache`; measured: 0
cached tokens on every PRM request), so each score prefills its text twice.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from etsq.errors import ModelError, PermanentError
from etsq.models.base import PRM, ExpandRequest, Policy, SamplingParams, ScoreRequest, StepSample
from etsq.models.config import ModelConfig
from etsq.models.http import RetryConfig, client_for, gather_all
from etsq.models.prm_families import PRMFamily, get_family
from etsq.models.prompts import has_chat_template, template_tokenizer
from etsq.models.remote import (
    RemotePolicy,
    RemotePRM,
    ServedModel,
    abort,
    batches,
    delimited_step,
    label_token_ids,
    ready,
    tokenize,
    two_way,
)
from etsq.settings import Settings

BACKEND = "openai"


def load(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The backend loader (see etsq.models.backends): the run's models, once both servers answer."""
    return ready(*_connect_pair(cfg, RetryConfig.from_settings(settings)))


@lru_cache(maxsize=8)
def _connect_pair(cfg: ModelConfig, retry: RetryConfig) -> tuple[OpenAIPolicy, OpenAIPRM]:
    # Cached per process: a long-lived worker keeps one pooled client per server across jobs.
    assert cfg.policy_url and cfg.prm_url, "load_models resolves the URLs"
    policy = OpenAIPolicy(connect(cfg.policy_url, cfg.policy, retry))
    return policy, OpenAIPRM(connect(cfg.prm_url, cfg.prm, retry), cfg.prm_family)


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


class OpenAIPRM(RemotePRM):
    """The `PRM` protocol on an OpenAI-compatible server, from prompt logprobs of the label tokens."""

    health_path = "/v1/models"

    def __init__(self, served: ServedModel, family: str | PRMFamily = "judge") -> None:
        super().__init__(served, "vllm")
        self.family = get_family(family)
        self.label_ids = label_token_ids(self.family, self._tokenize_label, served.url)
        self.info = served.info("prm", family=self.family.name, prm_api="prompt-logprobs")

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        texts = [self.family.render(self.served.template, req) for req in requests]

        async def fan_out() -> list[float]:
            prefixes = await gather_all(
                *(tokenize(self.served, t, self.family.add_special_tokens) for t in texts)
            )
            prompts = [[*ids, label] for ids in prefixes for label in self.label_ids]
            results = await gather_all(*(self._logprobs(group) for group in batches(prompts)))
            flat = [lp for group in results for lp in group]
            return [two_way(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

        return self._run(fan_out)  # type: ignore[no-any-return]

    async def _logprobs(self, prompts: list[list[int]]) -> list[float]:
        """log p(last token | the tokens before it) of each prompt."""
        body = {
            "model": self.served.model_id,
            "prompt": prompts,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 0,
            "temperature": 0.0,
        }
        out = await self.client.post_json("/v1/completions", body)
        usage = out.get("usage") or {}
        self.monitor.add_usage(int(usage.get("prompt_tokens", 0)), cached_tokens(usage))
        return [self._last_logprob(c) for c in _choices(out, len(prompts), self.served.url)]

    def _last_logprob(self, choice: dict[str, Any]) -> float:
        values = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
        if not values or values[-1] is None:
            raise ModelError(
                f"{self.served.url} returned no prompt logprobs (echo + logprobs): {choice!r:.200}"
            )
        return float(values[-1])
