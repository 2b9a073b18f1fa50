"""Search configuration: every knob of one run's search, with the paper's reference defaults."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from etsq import validation
from etsq.errors import ConfigError

# Reference lambda_s per width from the paper's hyper-parameter files.
_LAMBDA_S_POINTS: tuple[tuple[int, float], ...] = ((16, 1.5), (64, 1.4), (256, 1.45))


def default_lambda_s(width: int) -> float:
    """Paper's lambda_s for W=16/64/256; piecewise-linear in log2(W) between, clamped outside."""
    xs = [math.log2(w) for w, _ in _LAMBDA_S_POINTS]
    ys = [v for _, v in _LAMBDA_S_POINTS]
    x = math.log2(max(width, 1))
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable")


COSTS = ("uniform", "tokens")
# The numeric fields, each with its range in etsq.validation.LIMITS.
_NUMBERS = (
    "width", "seed", "temperature", "softmax_temp", "max_step_tokens", "max_tokens", "max_depth",
    "lambda_b", "lambda_s", "cluster_threshold", "beam_k", "dvts_subtrees",
)  # fmt: skip


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of one search; stored verbatim (as JSON) in the run's config."""

    method: str = "rebase"
    width: int = 16
    seed: int = 0
    temperature: float = 1.0  # policy sampling temperature
    softmax_temp: float = 0.2  # REBASE's T in exp(s / T)
    max_step_tokens: int = 256
    max_tokens: int = 1024
    max_depth: int = 25
    step_delimiter: str = "\n\n"
    lambda_b: float = 1.0
    lambda_s: float | None = None  # None: default_lambda_s(width)
    cost: str = "uniform"  # "uniform" | "tokens"
    cluster_threshold: float = 0.05
    beam_k: int | None = None  # beam search: fixed beam count, else ceil(sqrt(remaining))
    dvts_subtrees: int | None = None  # DVTS: fixed subtree count, else ceil(sqrt(W))
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field (etsq.validation); integer-valued floats are stored as floats."""
        for name in _NUMBERS:
            object.__setattr__(self, name, validation.number(name, getattr(self, name)))
        validation.text("method", self.method, max_chars=32)
        validation.choice("cost", self.cost, COSTS)
        if not isinstance(self.step_delimiter, str) or not 0 < len(self.step_delimiter) <= 64:
            raise ConfigError(f"step_delimiter must be 1 to 64 characters, got {self.step_delimiter!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a mapping, got {self.extra!r}")

    @property
    def effective_lambda_s(self) -> float:
        return default_lambda_s(self.width) if self.lambda_s is None else self.lambda_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
