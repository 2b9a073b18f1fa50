"""Sweeps: a YAML grid (datasets x methods x widths x other parameters) turned into run specs.

Example file:

    datasets: [gsm8k, math500]
    methods: [ets, rebase]
    widths: [16, 64]
    limit: 50                 # optional, every run
    seeds: [0]                # optional
    params:                   # optional: a list per search parameter makes it a grid axis
      softmax_temp: [0.2, 0.5]
      max_tokens: 1024
    models:                   # optional, the same for every run
      backend: local
      policy: smollm2

Values are typed strictly (etsq.validation): `widths: [4.7]` or `[true]` is refused, not truncated.
Each run is identified by its problems and configuration, so submitting a sweep again creates
nothing new.  A run's configuration holds only the parameters its method reads, so grid points
that differ only in a parameter their method ignores (`lambda_b` for rebase) are one run: the grid
`SweepGrid.points` becomes `len(SweepGrid.specs)` runs.  A grid with no runs (an empty list on
any axis) is an error.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from etsq.errors import ConfigError, UserError
from etsq.models.config import ModelConfig
from etsq.search.config import SearchConfig
from etsq.search.methods import get_method
from etsq.store.runs import RunSpec

_TOP_KEYS = {"datasets", "methods", "widths", "limit", "seeds", "params", "models"}
_SEARCH_FIELDS = set(SearchConfig.__dataclass_fields__) - {"method", "width", "seed", "extra"}
MAX_RUNS = 100_000  # a grid this size is a typo, not a sweep


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_sweep(path: Path) -> dict[str, Any]:
    """The file's mapping, with its keys checked; a UserError naming the file otherwise."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read sweep file {path}: {exc.strerror}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "nested too deeply"
        raise UserError(f"{path}: invalid YAML: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sweep file is a mapping with datasets, methods and widths")
    unknown = sorted(map(str, set(data) - _TOP_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    missing = {"datasets", "methods", "widths"} - set(data)
    if missing:
        raise UserError(f"{path}: missing {', '.join(sorted(missing))}")
    return data


def _mapping(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UserError(f"{path}: {key} must be a mapping of names to values, got {value!r}")
    return value


def _param_axes(params: dict[str, Any], path: Path) -> dict[str, list[Any]]:
    unknown = set(params) - _SEARCH_FIELDS
    if unknown:
        raise UserError(
            f"{path}: unknown search parameters {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_SEARCH_FIELDS))}"
        )
    return {key: _as_list(params[key]) for key in sorted(params)}


def _axes(data: dict[str, Any], path: Path) -> list[list[Any]]:
    """The grid's axes (datasets, methods, widths, seeds, parameter combinations), sizes checked."""
    params = _param_axes(_mapping(data, "params", path), path)
    axes = {
        "datasets": _as_list(data["datasets"]),
        "methods": _as_list(data["methods"]),
        "widths": _as_list(data["widths"]),
        "seeds": _as_list(data.get("seeds", 0)),
        **{f"params.{key}": values for key, values in params.items()},
    }
    empty = [name for name, axis in axes.items() if not axis]
    if empty:
        raise UserError(f"{path}: the grid has no runs: {', '.join(empty)} is empty")
    total = math.prod(len(axis) for axis in axes.values())
    if total > MAX_RUNS:
        raise UserError(f"{path}: the grid has {total:,} runs, more than {MAX_RUNS:,}")
    combos = [dict(zip(params, combo, strict=True)) for combo in itertools.product(*params.values())]
    return [axes["datasets"], axes["methods"], axes["widths"], axes["seeds"], combos]


@dataclass(frozen=True)
class SweepGrid:
    """A sweep file's grid: how many points it has, and the distinct runs they make."""

    points: int
    specs: list[RunSpec]


def sweep_specs(path: Path) -> list[RunSpec]:
    """Every distinct run of the grid, in a stable order (see `sweep_grid`)."""
    return sweep_grid(path).specs


def _key(spec: RunSpec) -> str:
    """Grid points with one key are one run: the same problems and the same stored configuration."""
    return json.dumps([spec.dataset, spec.limit, spec.settings()], sort_keys=True)


def sweep_grid(path: Path) -> SweepGrid:
    """The grid's points and its distinct runs, in a stable order (a point whose run an earlier
    point makes adds nothing); raises a UserError naming the file on bad input."""
    data = read_sweep(path)
    try:
        models = ModelConfig.create(**_mapping(data, "models", path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: models: {exc}") from None
    specs: dict[str, RunSpec] = {}
    points = 0
    for ds, method, width, seed, params in itertools.product(*_axes(data, path)):
        try:
            search = SearchConfig(method=method, width=width, seed=seed, **params)
            get_method(search.method)
            spec = RunSpec(dataset=ds, models=models, limit=data.get("limit"), search=search)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        points += 1
        specs.setdefault(_key(spec), spec)
    return SweepGrid(points, list(specs.values()))
