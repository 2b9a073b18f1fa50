"""Sweeps: a YAML grid (datasets x methods x widths x other parameters) turned into run specs.

Example file:

    datasets: [gsm8k, math500]
    methods: [ets, rebase]
    widths: [16, 64]
    limit: 50                 # optional, every run
    seeds: [0]                # optional
    params:                   # optional: a list per search parameter makes it a grid axis
      lambda_b: [1.0, 2.0]
      max_tokens: 1024
    models:                   # optional, the same for every run
      backend: local
      policy: smollm2

Each run is identified by its config hash, so submitting a sweep again creates nothing new.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from etsq.errors import ConfigError, UserError
from etsq.models.config import ModelConfig
from etsq.runs import RunSpec
from etsq.search.config import SearchConfig

_TOP_KEYS = {"datasets", "methods", "widths", "limit", "seeds", "params", "models"}
_SEARCH_FIELDS = set(SearchConfig.__dataclass_fields__) - {"method", "width", "seed", "extra"}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_sweep(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read sweep file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sweep file is a mapping with datasets, methods and widths")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(
            f"{path}: unknown keys {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    missing = {"datasets", "methods", "widths"} - set(data)
    if missing:
        raise UserError(f"{path}: missing {', '.join(sorted(missing))}")
    return data


def _param_grid(params: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    unknown = set(params) - _SEARCH_FIELDS
    if unknown:
        raise UserError(f"{path}: unknown search parameters {', '.join(sorted(unknown))}")
    keys = sorted(params)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(_as_list(params[k]) for k in keys))
    ]


def sweep_specs(path: Path) -> list[RunSpec]:
    """Every run of the grid, in a stable order; raises a UserError naming the file on bad input."""
    data = read_sweep(path)
    try:
        models = ModelConfig.create(**(data.get("models") or {}))
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: models: {exc}") from None
    grid = itertools.product(
        _as_list(data["datasets"]),
        _as_list(data["methods"]),
        _as_list(data["widths"]),
        _as_list(data.get("seeds", 0)),
        _param_grid(data.get("params") or {}, path),
    )
    try:
        return [
            RunSpec(
                dataset=str(ds),
                models=models,
                limit=data.get("limit"),
                search=SearchConfig(method=str(method), width=int(width), seed=int(seed), **params),
            )
            for ds, method, width, seed, params in grid
        ]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
