"""A run's short label: what sets it apart, read off its stored config (`ets W=16 λb=2 · sim`).

`method W=width`, then each parameter the run's method reads (`etsq.search.methods.Method.params`,
then the shared ones and the embedding model) whose stored value differs from `SearchConfig`'s
default, then ` · sim` when its models are synthetic (` · reference` for an imported file).  A pure
function of the stored config: every view that lists runs shows the same label for a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from etsq.search.config import SearchConfig
from etsq.search.methods import METHODS, SHARED_PARAMS

# How a parameter is written in a label; any other is written under its field name.
SHORT_NAMES = {
    "softmax_temp": "T",
    "lambda_b": "λb",
    "lambda_s": "λs",
    "cost": "cost",
    "cluster_threshold": "thr",
    "beam_k": "k",
    "dvts_subtrees": "subtrees",
    "embedding": "emb",
    "temperature": "temp",
    "max_step_tokens": "step_tokens",
    "max_depth": "depth",
    "step_delimiter": "delim",
}
# Backends whose runs are not a real model's: the label says so.
NOT_MODELS = ("sim", "reference")
_DEFAULTS = {f.name: f.default for f in fields(SearchConfig) if f.default is not MISSING}
_NOT_LABELLED = {"method", "width", "extra"}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, str) and ("/" in value or "\\" in value) and value.strip("/\\"):
        return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]  # a model path: its last part
    return str(value) if not isinstance(value, str) or value.isprintable() else repr(value)


def _differs(name: str, value: Any) -> bool:
    if name not in _DEFAULTS:
        return value is not None
    default = _DEFAULTS[name]
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return not isinstance(value, bool) and float(value) != float(default)
    return bool(value != default)


def _param_names(method: str, search: dict[str, Any]) -> list[str]:
    """The method's own parameters first (registry order), then the shared ones."""
    known = METHODS.get(method)
    own = list(known.params) if known else [k for k in search if k not in SHARED_PARAMS]
    return [*own, *(name for name in SHARED_PARAMS if name not in own)]


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def run_backend(config: dict[str, Any]) -> str | None:
    """The stored run's model backend (`reference` for an imported file)."""
    if config.get("source") == "reference":
        return "reference"
    backend = _section(config, "models").get("backend")
    return None if backend is None else str(backend)


def run_label(config: dict[str, Any]) -> str:
    """The label of a run from its stored config (its `search` and `models` parts)."""
    search, models = _section(config, "search"), _section(config, "models")
    method = str(search.get("method", config.get("method", "?")))
    parts = [method, f"W={search.get('width', config.get('width', '?'))}"]
    for name in _param_names(method, search):
        if name in _NOT_LABELLED or name not in search or not _differs(name, search[name]):
            continue
        parts.append(f"{SHORT_NAMES.get(name, name)}={_value(search[name])}")
    if models.get("embedding") is not None:
        parts.append(f"emb={_value(models['embedding'])}")
    label = " ".join(parts)
    backend = run_backend(config)
    return f"{label} · {backend}" if backend in NOT_MODELS else label


def without_width(label: str, width: int) -> str:
    """The label with its `W=` part left out: what names one line of a plot across widths."""
    return label.replace(f" W={width}", "", 1)


def shown_label(row: dict[str, Any]) -> str:
    """A listed run's label as tables show it: with the run it duplicates, if it is a duplicate."""
    label = str(row.get("label") or f"{row.get('method')} W={row.get('width')}")
    dup = row.get("duplicate_of")
    return label if dup is None else f"{label} (duplicate of run {dup})"


def sim_note(rows: Sequence[dict[str, Any]]) -> str | None:
    """What a page or table of these runs says in its title when some ran on the sim backend."""
    backends = {
        ("run", row["run_id"]) if row.get("run_id") is not None else ("row", i): row.get("backend")
        for i, row in enumerate(rows)
    }
    sim = sum(1 for backend in backends.values() if backend == "sim")
    if not sim:
        return None
    if sim == len(backends):
        return "all runs on the sim backend (synthetic models)"
    return f"{sim} of {len(backends)} runs on the sim backend (synthetic models)"
