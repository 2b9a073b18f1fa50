"""Model backends: where a run's policy and PRM run, one loader per backend in one registry.

| backend | policy and PRM |
| --- | --- |
| `local` | in-process transformers (`etsq.models.registry`) |
| `sglang` | an SGLang server's native API (`etsq.models.sglang`) |
| `openai` | an OpenAI-compatible completions server such as vLLM (`etsq.models.openai_compat`) |
| `sim` | synthetic steps and scores, for load and fault tests (`etsq.models.sim`) |

A loader is named as "module:function" and imported on first use, so that the CLI (which lists the
backends) does not import torch or an HTTP stack to print its help.  Each loader takes the run's
`ModelConfig` (server URLs already resolved) and the `Settings`, and returns `(Policy, PRM)`.
Adding a backend: a module with such a `load` function and one line in `BACKENDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from etsq.errors import ConfigError, TransientError
from etsq.models.base import PRM, Policy
from etsq.models.config import BACKEND_NAMES, ModelConfig
from etsq.settings import Settings

Loader = Callable[[ModelConfig, Settings], tuple[Policy, PRM]]


@dataclass(frozen=True)
class Backend:
    """One way of running the models."""

    name: str
    loader: str  # "module:function"
    remote: bool  # served over HTTP: needs URLs; checked to answer at every job start
    help: str

    def load(self, cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
        module, _, attr = self.loader.partition(":")
        load = cast(Loader, getattr(importlib.import_module(module), attr))
        return load(cfg, settings)


BACKENDS: dict[str, Backend] = {
    "local": Backend("local", "etsq.models.registry:load", False, "in-process transformers"),
    "sglang": Backend("sglang", "etsq.models.sglang:load", True, "an SGLang server"),
    "openai": Backend("openai", "etsq.models.openai_compat:load", True, "an OpenAI-compatible server (vLLM)"),
    "sim": Backend("sim", "etsq.models.sim:load", False, "synthetic; load tests only"),
}
assert tuple(BACKENDS) == BACKEND_NAMES, "ModelConfig validates against the same names"


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def load_models(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The run's policy and PRM; a server URL the run leaves unset comes from the worker's settings."""
    resolved = cfg.with_servers(settings.backend, settings.policy_url, settings.prm_url)
    return get_backend(cfg.backend).load(resolved, settings)


def check_servers(cfg: ModelConfig, settings: Settings) -> list[str]:
    """Connect to a configuration's servers as a job would; one line per server.

    Raises TransientError for a server that does not answer and ModelError for one of the wrong kind
    (not that API, or a PRM whose tokenizer lacks the family's label tokens).
    """
    resolved = cfg.with_servers(settings.backend, settings.policy_url, settings.prm_url)
    try:
        policy, prm = get_backend(cfg.backend).load(resolved, settings)
    except TransientError as exc:
        where = resolved.describe_servers()
        raise TransientError(f"cannot reach the {cfg.backend} servers ({where}): {exc}") from exc
    return [
        f"policy: {policy.info.name} at {resolved.policy_url}",
        f"prm: {prm.info.name} at {resolved.prm_url}",
    ]
