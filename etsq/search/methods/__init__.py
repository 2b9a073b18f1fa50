"""Registry of select methods: one module per method, each a function over the frontier."""

from __future__ import annotations

from etsq.errors import ConfigError
from etsq.search.methods.base import SelectContext, SelectFn, Selection
from etsq.search.methods.beam import select as beam_select
from etsq.search.methods.bon import select as bon_select
from etsq.search.methods.dvts import select as dvts_select
from etsq.search.methods.ets import select as ets_select
from etsq.search.methods.rebase import select as rebase_select

METHODS: dict[str, SelectFn] = {
    "rebase": rebase_select,
    "bon": bon_select,
    "beam": beam_select,
    "dvts": dvts_select,
    "ets": ets_select,
}


def get_method(name: str) -> SelectFn:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "SelectContext", "SelectFn", "Selection", "get_method"]
