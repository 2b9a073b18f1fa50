"""Registry of search methods: one module per method, each a select function over the frontier.

Adding a method: its module (a `select` function, see `SelectFn`), one line in `METHODS` naming the
`SearchConfig` fields its select step reads (`params`), its tests.

A run stores, and is identified by, the shared fields (`SHARED_PARAMS`) and its method's `params`
only (`stored_search`): a parameter the method does not read cannot split one run into two.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any

from etsq.errors import ConfigError
from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, SelectFn, Selection

# What every method's search reads (the loop, the policy, the seeds): part of every run's identity.
SHARED_PARAMS = (
    "method", "width", "seed", "temperature", "max_step_tokens", "max_tokens", "max_depth", "step_delimiter",
)  # fmt: skip
# The model-config field a method with `needs_embedder` reads (its sentence-embedding model).
EMBEDDING_PARAM = "embedding"


@dataclass(frozen=True)
class Method:
    """A search method: its module (whose `select` is the select step), the `SearchConfig` fields that
    step reads beyond the shared ones, and whether it needs sentence embeddings (then the model
    config's `embedding` counts too).  The module is imported on first use of `select`: every
    command reads the registry, only a search needs numpy and the ILP solver."""

    module: str
    params: tuple[str, ...] = ()
    needs_embedder: bool = False

    @property
    def select(self) -> SelectFn:
        fn: SelectFn = importlib.import_module(f"etsq.search.methods.{self.module}").select
        return fn

    def reads(self, name: str) -> bool:
        """Whether a run of this method depends on the search field or model field `name`."""
        if name == EMBEDDING_PARAM:
            return self.needs_embedder
        return name in SHARED_PARAMS or name in self.params


_ETS_PARAMS = ("softmax_temp", "lambda_b", "lambda_s", "cost", "cluster_threshold")

METHODS: dict[str, Method] = {
    "rebase": Method("rebase", params=("softmax_temp",)),
    "bon": Method("bon"),
    "beam": Method("beam", params=("beam_k",)),
    "dvts": Method("dvts", params=("dvts_subtrees",)),
    "ets": Method("ets", params=_ETS_PARAMS, needs_embedder=True),
    "particle": Method("particle", params=("softmax_temp",)),
}

# Fields of SearchConfig a method may read (every one but `extra`, which is stored only when set).
SEARCH_PARAMS = tuple(f.name for f in fields(SearchConfig) if f.name != "extra")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


def stored_search(cfg: SearchConfig) -> dict[str, Any]:
    """The search config a run stores and hashes: the shared fields and the method's own."""
    method = get_method(cfg.method)
    stored = {name: getattr(cfg, name) for name in SEARCH_PARAMS if method.reads(name)}
    if cfg.extra:
        stored["extra"] = dict(cfg.extra)
    return stored


def stored_models(method: str, models: dict[str, Any]) -> dict[str, Any]:
    """A stored model config without the embedding model, unless the method reads it."""
    if get_method(method).needs_embedder:
        return dict(models)
    return {key: value for key, value in models.items() if key != EMBEDDING_PARAM}


def ignored_params(method: str, names: list[str]) -> list[str]:
    """Those of `names` (search fields, or `embedding`) that the method does not read."""
    m = get_method(method)
    return [name for name in names if not m.reads(name)]


__all__ = [
    "METHODS",
    "SEARCH_PARAMS",
    "SHARED_PARAMS",
    "Method",
    "SelectContext",
    "SelectFn",
    "Selection",
    "get_method",
    "ignored_params",
    "stored_models",
    "stored_search",
]
