"""Choosing a backend: in-process transformers, an SGLang server or an OpenAI-compatible server.

A run's `models` config names the backend and, for the HTTP ones, the policy and PRM server URLs;
a worker's own settings (`etsq worker --backend/--policy-url/--prm-url`) fill in what a run leaves
unset.  Server-backed models are cached per process by their whole spec, so a long-lived worker keeps
one pooled client per server across jobs; every job start checks that the servers still answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from etsq.errors import ConfigError, ModelError, TransientError
from etsq.models.base import PRM, Policy

BACKENDS = ("local", "sglang", "openai", "sim")  # sim: synthetic, for load and fault tests
HTTP_BACKENDS = ("sglang", "openai")
PRM_APIS = ("logprob", "fork")  # SGLang: stock /generate logprobs, or the reference fork's forward_only


@dataclass(frozen=True)
class ServerSpec:
    """Which servers serve a run, and how its PRM is asked."""

    backend: str
    policy_url: str
    prm_url: str
    prm_family: str = "judge"
    prm_api: str = "logprob"
    policy_tokenizer: str | None = None  # where the chat template comes from; None: what the server reports
    prm_tokenizer: str | None = None

    def describe(self) -> str:
        return f"{self.backend} policy {self.policy_url}, PRM {self.prm_url}"


def server_spec(models: dict[str, Any], defaults: dict[str, str | None] | None = None) -> ServerSpec:
    """The run's server spec, with the worker's `defaults` for unset backend or URLs."""
    defaults = defaults or {}
    backend = models.get("backend") or defaults.get("backend") or "local"
    if backend not in HTTP_BACKENDS:
        raise ConfigError(f"backend {backend!r} is not served over HTTP; known: {', '.join(HTTP_BACKENDS)}")
    policy_url = models.get("policy_url") or defaults.get("policy_url")
    if not policy_url:
        raise ConfigError(f"backend {backend!r} needs a policy server URL (--policy-url on submit or worker)")
    prm_url = models.get("prm_url") or defaults.get("prm_url") or policy_url
    return ServerSpec(
        backend,
        policy_url,
        prm_url,
        models.get("prm_family") or "judge",
        models.get("prm_api") or "logprob",
        models.get("policy"),
        models.get("prm"),
    )


@lru_cache(maxsize=8)
def load_server_models(spec: ServerSpec) -> tuple[Policy, PRM]:
    """The policy and PRM on the spec's servers; raises ModelError for a server of the wrong kind."""
    if spec.backend == "sglang":
        from etsq.models import sglang

        policy_model = sglang.connect(spec.policy_url, spec.policy_tokenizer)
        prm_model = sglang.connect(spec.prm_url, spec.prm_tokenizer)
        return sglang.SGLangPolicy(policy_model), sglang.SGLangPRM(prm_model, spec.prm_family, spec.prm_api)
    from etsq.models import openai_compat as oc

    if spec.prm_api != "logprob":
        raise ConfigError(
            f"prm api {spec.prm_api!r} is SGLang's; OpenAI-compatible servers use prompt logprobs"
        )
    policy_model, prm_model = (
        oc.connect(spec.policy_url, spec.policy_tokenizer),
        oc.connect(spec.prm_url, spec.prm_tokenizer),
    )
    return oc.OpenAIPolicy(policy_model), oc.OpenAIPRM(prm_model, spec.prm_family)


def ensure_reachable(policy: Policy, prm: PRM) -> None:
    """Raise TransientError unless both servers answer (no-op for in-process models)."""
    for model in (policy, prm):
        check = getattr(model, "ensure_reachable", None)
        if check is not None:
            check()


def check_servers(spec: ServerSpec) -> list[str]:
    """Connect to the spec's servers as a worker would; one line per server, or a one-line error.

    Raises TransientError for a server that does not answer and ModelError for one of the wrong
    kind (not that API, or a PRM whose tokenizer lacks the family's label tokens).
    """
    try:
        policy, prm = load_server_models(spec)
    except TransientError as exc:
        raise TransientError(f"cannot reach the {spec.backend} servers ({spec.describe()}): {exc}") from exc
    except ModelError:
        load_server_models.cache_clear()
        raise
    return [f"policy: {policy.info.name} at {spec.policy_url}", f"prm: {prm.info.name} at {spec.prm_url}"]
