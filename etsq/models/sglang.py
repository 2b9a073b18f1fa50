"""A policy and a PRM on a stock SGLang server, through its native API.

Endpoints and fields are SGLang's documented ones (docs: basic_usage/native_api,
basic_usage/sampling_params; `io_struct.GenerateReqInput`):

- `GET /get_model_info` -> `model_path`, `tokenizer_path`, `is_generation`: identity and kind check
- `GET /health`, `GET /metrics` (`--enable-metrics`), `POST /tokenize` (`prompt` -> `tokens`)
- `POST /generate` with a batch `text` list and one `sampling_params` dict per item; each response
  item has `text` and `meta_info` with `prompt_tokens`, `completion_tokens`, `cached_tokens` and
  `finish_reason` (`{"type": "stop", "matched": str | token id}` or `{"type": "length"}`).

Policy: all children of a node go in one `/generate` request as a batch of the same text, one item per
child with its own `sampling_seed` (with `sampling_params.n` all children would share one seed and so
one sample); the radix cache computes the shared prefix once.  `no_stop_trim` keeps the step delimiter.

PRM (token-probability families only): the rendered text ends with the step tag; `/generate` with
`return_logprob`, `token_ids_logprob` [good, bad] and `max_new_tokens` 1 returns the two labels'
log-probabilities at the next position (`meta_info.output_token_ids_logprobs[0]`).  The reference
implementation's SGLang fork instead takes `sampling_params.forward_only` and `logits_require_id`
and returns `scores` (one per step tag); `prm_api="fork"` speaks that.

Likelihood-family PRMs: the text's token ids (`/tokenize`) as `input_ids`, `max_new_tokens` 0,
`return_logprob` and a per-item `logprob_start_len` at the solution's first token, so
`meta_info.input_token_logprobs` holds exactly the solution tokens' log-probabilities
(`likelihood_score` reads them).

Reward-head PRMs (Qwen2.5-Math-PRM) are refused: SGLang serves reward models as embedding models
(`--is-embedding`, `/classify`, `/v1/embeddings`) that pool one value per sequence (LAST, CLS or
MEAN pooling, e.g. the outcome RM `Qwen2ForRewardModel`); it has no per-token or per-step pooling and
no `Qwen2ForProcessRewardModel`, so it cannot return a score at each step separator.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from etsq.errors import ConfigError, ModelError, PermanentError
from etsq.models.base import PRM, ExpandRequest, Policy, SamplingParams, ScoreRequest, StepSample, child_seed
from etsq.models.config import PRM_APIS, ModelConfig
from etsq.models.http import RetryConfig, client_for, gather_all
from etsq.models.prm_families import (
    Family,
    LikelihoodFamily,
    PRMFamily,
    RewardHeadFamily,
    get_family,
    is_likelihood,
    likelihood_score,
    token_family,
)
from etsq.models.prompts import template_tokenizer
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
    two_way,
)
from etsq.settings import Settings

BACKEND = "sglang"


def load(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The backend loader (see etsq.models.backends): the run's models, once both servers answer."""
    return load_connected(_connect_pair, cfg, settings)


@lru_cache(maxsize=8)
def _connect_pair(
    cfg: ModelConfig, retry: RetryConfig
) -> tuple[SGLangPolicy, SGLangPRM | SGLangLikelihoodPRM]:
    # Cached per process: a long-lived worker keeps one pooled client per server across jobs.
    assert cfg.policy_url and cfg.prm_url, "load_models resolves the URLs"
    policy = SGLangPolicy(connect(cfg.policy_url, cfg.policy, retry))
    prm_served = connect(cfg.prm_url, cfg.prm, retry)
    if is_likelihood(cfg.prm_family):
        return policy, SGLangLikelihoodPRM(prm_served, cfg.prm_family, cfg.prm_api)
    return policy, SGLangPRM(prm_served, cfg.prm_family, cfg.prm_api)


def connect(url: str, tokenizer_spec: str | None = None, retry: RetryConfig | None = None) -> ServedModel:
    """The model an SGLang server serves; ModelError if the URL is not an SGLang generation server."""
    client = client_for(url, retry)
    try:
        info = client.call(client.get_json("/get_model_info"))
    except PermanentError as exc:
        raise ModelError(f"{client.base_url} is not an SGLang server (GET /get_model_info: {exc})") from exc
    if not isinstance(info, dict) or "model_path" not in info:
        raise ModelError(f"{client.base_url} is not an SGLang server: /get_model_info said {info!r:.200}")
    if info.get("is_generation") is False:
        raise ModelError(f"{client.base_url} serves an embedding model, not a generation model")
    source = tokenizer_spec or info.get("tokenizer_path") or info["model_path"]
    details = {k: str(info[k]) for k in ("model_path", "tokenizer_path", "weight_version") if info.get(k)}
    return ServedModel(BACKEND, client, str(info["model_path"]), source, template_tokenizer(source), details)


def finish_reason(reason: Any, where: str) -> str:
    """SGLang's finish_reason as a StepSample reason: a matched stop string, EOS (a token id) or length."""
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "length" or kind is None:
        return "length"
    if kind == "stop":
        matched = reason.get("matched") if isinstance(reason, dict) else None
        return "stop" if isinstance(matched, str) else "eos"
    if kind == "abort":
        raise abort(where, reason)
    raise ModelError(f"{where}: unknown finish_reason {reason!r}")


def _token_family(family: str | Family, where: str) -> PRMFamily:
    """The family, refused with one line when it is a reward-head PRM (SGLang has no step pooling)."""
    found = get_family(family)
    if isinstance(found, RewardHeadFamily):
        raise ModelError(
            f"{where}: SGLang cannot serve the reward-head PRM family {found.name!r}: its reward models "
            "(--is-embedding) give one score per sequence, not one per step; use --backend openai "
            "with a vLLM pooling server, or --backend local"
        )
    return token_family(found, "SGLang's /generate")


def _items(out: Any, expected: int, where: str) -> list[dict[str, Any]]:
    items = out if isinstance(out, list) else [out]
    if len(items) != expected or not all(isinstance(i, dict) and "meta_info" in i for i in items):
        raise ModelError(f"{where}: expected {expected} results with meta_info, got {str(out)[:200]}")
    return items


class SGLangPolicy(RemotePolicy):
    """The `Policy` protocol on an SGLang server."""

    def __init__(self, served: ServedModel) -> None:
        super().__init__(served, "sglang")

    async def _expand_one(self, req: ExpandRequest, params: SamplingParams) -> list[StepSample]:
        body = {
            "text": [req.text] * req.n,
            "sampling_params": [self._sampling(params, child_seed(req.seed, i)) for i in range(req.n)],
        }
        out = await self.client.post_json("/generate", body)
        return [self._step(item, params.step_delimiter) for item in _items(out, req.n, self.served.url)]

    @staticmethod
    def _sampling(params: SamplingParams, seed: int) -> dict[str, Any]:
        return {
            "max_new_tokens": params.max_step_tokens,
            "temperature": params.temperature,
            "stop": [params.step_delimiter] if params.step_delimiter else [],
            "no_stop_trim": True,
            "skip_special_tokens": True,
            "sampling_seed": seed,
        }

    def _step(self, item: dict[str, Any], delimiter: str) -> StepSample:
        meta = item["meta_info"]
        self.monitor.add_usage(int(meta.get("prompt_tokens", 0)), meta.get("cached_tokens"))
        reason = finish_reason(meta.get("finish_reason"), self.served.url)
        return delimited_step(str(item.get("text", "")), reason, delimiter, int(meta["completion_tokens"]))


class SGLangPRM(RemotePRM):
    """The `PRM` protocol on an SGLang server, prompted as one of the PRM families."""

    def __init__(self, served: ServedModel, family: str | Family = "judge", api: str = "logprob") -> None:
        super().__init__(served, "sglang")
        if api not in PRM_APIS:
            raise ConfigError(f"unknown SGLang PRM api {api!r}; known: {', '.join(PRM_APIS)}")
        self.family, self.api = _token_family(family, served.url), api
        self.label_ids = label_token_ids(
            self.family, self._tokenize_label, served.url, step_tag=api == "fork"
        )
        self.info = served.info("prm", family=self.family.name, prm_api=api)

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        texts = [self.family.render(self.served.template, req) for req in requests]
        one = self._score_fork if self.api == "fork" else self._score_batch
        groups = [[t] for t in texts] if self.api == "fork" else batches(texts)

        async def fan_out() -> list[float]:
            results = await gather_all(*(one(group) for group in groups))
            return [score for group in results for score in group]

        return self._run(fan_out)  # type: ignore[no-any-return]

    async def _score_batch(self, texts: list[str]) -> list[float]:
        body = {
            "text": texts,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "token_ids_logprob": [self.label_ids[:2]] * len(texts),
        }
        out = await self.client.post_json("/generate", body)
        return [self._read(item) for item in _items(out, len(texts), self.served.url)]

    def _read(self, item: dict[str, Any]) -> float:
        meta = item["meta_info"]
        self.monitor.add_usage(int(meta.get("prompt_tokens", 0)), meta.get("cached_tokens"))
        rows = (meta.get("output_token_ids_logprobs") or [None])[0]
        logprobs = {int(row[1]): float(row[0]) for row in rows or [] if row and row[0] is not None}
        good, bad = self.label_ids[:2]
        if good not in logprobs or bad not in logprobs:
            raise ModelError(
                f"{self.served.url}: no logprobs for label tokens {good}, {bad} in {rows!r:.200}"
            )
        return two_way(logprobs[good], logprobs[bad])

    async def _score_fork(self, texts: list[str]) -> list[float]:
        sampling = {"max_new_tokens": 0, "forward_only": True, "logits_require_id": self.label_ids}
        out = await self.client.post_json("/generate", {"text": texts[0], "sampling_params": sampling})
        scores = out.get("scores") if isinstance(out, dict) else None
        scores = scores if scores is not None else (out.get("meta_info") or {}).get("scores")
        if not scores:
            raise ModelError(
                f"{self.served.url} returned no scores for forward_only: is it the reference fork?"
            )
        return [float(scores[-1])]


class SGLangLikelihoodPRM(RemoteLikelihoodPRM):
    """A likelihood-family PRM on an SGLang server: its input logprobs of the solution's tokens."""

    api_description = "input logprobs (return_logprob, logprob_start_len)"
    health_path = "/health"

    def __init__(
        self, served: ServedModel, family: str | Family = "likelihood", api: str = "logprob"
    ) -> None:
        super().__init__(served, "sglang")
        found = get_family(family)
        if not isinstance(found, LikelihoodFamily):
            raise ConfigError(f"PRM family {found.name!r} is not a likelihood family")
        if api != "logprob":
            raise ConfigError(f"SGLang PRM api {api!r} cannot read token likelihoods; use --prm-api logprob")
        self.family = found
        self.info = served.info("prm", family=found.name, prm_api=api)
        self._probe()

    async def _scores(self, rows: list[tuple[str | list[int], int]]) -> list[float]:
        body = {
            "input_ids": [ids for ids, _ in rows],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": [start for _, start in rows],
        }
        out = await self.client.post_json("/generate", body)
        items = _items(out, len(rows), self.served.url)
        return [self._read(item, len(ids) - start) for item, (ids, start) in zip(items, rows, strict=True)]

    def _read(self, item: dict[str, Any], n: int) -> float:
        meta = item["meta_info"]
        self.monitor.add_usage(int(meta.get("prompt_tokens", 0)), meta.get("cached_tokens"))
        values = [row[0] for row in meta.get("input_token_logprobs") or [] if row and row[0] is not None]
        if len(values) < n:
            raise ModelError(
                f"{self.served.url} returned {len(values)} input logprobs for a {n}-token solution: "
                f"{meta.get('input_token_logprobs')!r:.200}"
            )
        return likelihood_score([float(v) for v in values[-n:]])
