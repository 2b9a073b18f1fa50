"""Registry of search methods: one module per method, each a select function over the frontier.

Adding a method: its module (a `select` function, see `SelectFn`), one line in `METHODS`, its tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from etsq.errors import ConfigError
from etsq.search.methods import beam, bon, dvts, ets, particle, rebase
from etsq.search.methods.base import SelectContext, SelectFn, Selection


@dataclass(frozen=True)
class Method:
    """A search method: its select step, and whether that step needs sentence embeddings."""

    select: SelectFn
    needs_embedder: bool = False


METHODS: dict[str, Method] = {
    "rebase": Method(rebase.select),
    "bon": Method(bon.select),
    "beam": Method(beam.select),
    "dvts": Method(dvts.select),
    "ets": Method(ets.select, needs_embedder=True),
    "particle": Method(particle.select),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "SelectContext", "SelectFn", "Selection", "get_method"]
