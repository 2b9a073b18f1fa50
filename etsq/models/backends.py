"""Model backends: where a run's policy and PRM run, one loader per backend in one registry.

| backend | policy and PRM |
| --- | --- |
| `local` | in-process transformers (`etsq.models.registry`) |
| `sglang` | an SGLang server's native API (`etsq.models.sglang`) |
| `openai` | an OpenAI-compatible completions server such as vLLM (`etsq.models.openai_compat`) |
| `sim` | synthetic steps and scores, for load and fault tests (`etsq.models.sim`) |

A `Backend` is the one record of a backend: its name, its loader, whether it is served over HTTP
(and so takes server URLs), its default models, the fields a run of it stores, what it accepts, and
its help line.  `ModelConfig` validates and stores by it, and submit, the worker and `--help` read it.

A loader is named as "module:function" and imported on first use, so that the CLI (which lists the
backends) does not import torch or an HTTP stack to print its help.  Each loader takes the run's
`ModelConfig` (server URLs already resolved) and the `Settings`, and returns `(Policy, PRM)`.
Adding a backend: a module with such a `load` function and one record in `BACKENDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from etsq.errors import ConfigError, TransientError
from etsq.models.base import PRM, Policy
from etsq.settings import Settings

if TYPE_CHECKING:  # config.py reads the records below; it is imported only for the types
    from etsq.models.config import ModelConfig

Loader = Callable[["ModelConfig", Settings], tuple[Policy, PRM]]

PRM_APIS = ("logprob", "fork")  # SGLang: stock /generate logprobs, or the reference fork's forward_only
# The models a `local` run gets when it names none: the testbed's tiny arith policy and PRM (shipped in
# the package, `etsq testbed build` remakes them), on which search visibly beats a single sample.
# `--policy-model smollm2` is the small real model; a GPU box names its own.
DEFAULT_POLICY = "testbed"
DEFAULT_PRM: str | None = "testbed-prm"
# The PRM family a named model is read with when a run names none (any other model: judge).
MODEL_PRM_FAMILIES: dict[str, str] = {"testbed-prm": "likelihood"}

_SERVED = ("backend", "policy_url", "prm_url", "policy", "prm", "prm_family", "prm_api", "embedding")


@dataclass(frozen=True)
class Backend:
    """One way of running the models: the one place each fact about a backend is written."""

    name: str
    loader: str  # "module:function"
    remote: bool  # served over HTTP: takes server URLs; checked to answer at every job start
    help: str  # `--backend`'s help: where the models run
    stored: tuple[str, ...]  # the fields a run stores (`ModelConfig.to_dict`), in the order written
    default_policy: str | None = None  # the policy model when a run names none
    default_prm: str | None = None  # the PRM model when a run names none (None: the policy model)
    synthetic: bool = False  # models named after the backend, no PRM prompt: load and fault tests
    prm_apis: tuple[str, ...] = ("logprob",)  # the `--prm-api` values its servers answer

    def load(self, cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
        module, _, attr = self.loader.partition(":")
        load = cast(Loader, getattr(importlib.import_module(module), attr))
        return load(cfg, settings)


BACKENDS: dict[str, Backend] = {
    "local": Backend(
        "local",
        "etsq.models.registry:load",
        remote=False,
        help="in-process transformers",
        stored=("backend", "policy", "prm", "prm_family", "embedding"),
        default_policy=DEFAULT_POLICY,
        default_prm=DEFAULT_PRM,
    ),
    "sglang": Backend(
        "sglang",
        "etsq.models.sglang:load",
        remote=True,
        help="an SGLang server",
        stored=_SERVED,
        prm_apis=PRM_APIS,
    ),
    "openai": Backend(
        "openai",
        "etsq.models.openai_compat:load",
        remote=True,
        help="an OpenAI-compatible server (vLLM)",
        stored=_SERVED,
    ),
    "sim": Backend(
        "sim",
        "etsq.models.sim:load",
        remote=False,
        help="synthetic steps and scores; load tests only",
        stored=("backend", "synthetic", "policy", "prm", "sim_latency_s", "sim_answer_every", "embedding"),
        synthetic=True,
    ),
}
BACKEND_NAMES = tuple(BACKENDS)
REMOTE_BACKENDS = tuple(name for name, backend in BACKENDS.items() if backend.remote)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def remote_choices() -> str:
    """ "--backend sglang or --backend openai": what an option that needs a server asks for."""
    return " or ".join(f"--backend {name}" for name in REMOTE_BACKENDS)


def backends_help() -> str:
    """`--backend`'s help, one clause per backend."""
    return "Where the models run: " + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()) + "."


def load_models(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The run's policy and PRM; a server URL the run leaves unset comes from the worker's settings."""
    resolved = cfg.with_servers(settings.policy_url, settings.prm_url)
    return get_backend(cfg.backend).load(resolved, settings)


def check_servers(cfg: ModelConfig, settings: Settings) -> list[str]:
    """Connect to a configuration's servers as a job would; one line per server.

    Raises TransientError for a server that does not answer and ModelError for one of the wrong kind
    (not that API, or a PRM whose tokenizer lacks the family's label tokens).
    """
    resolved = cfg.with_servers(settings.policy_url, settings.prm_url)
    try:
        policy, prm = get_backend(cfg.backend).load(resolved, settings)
    except TransientError as exc:
        where = resolved.describe_servers()
        raise TransientError(f"cannot reach the {cfg.backend} servers ({where}): {exc}") from exc
    return [
        f"policy: {policy.info.name} at {resolved.policy_url}",
        f"prm: {prm.info.name} at {resolved.prm_url}",
    ]
