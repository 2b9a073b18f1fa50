"""The policy and PRM interfaces the search loop talks to, and their request/result shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ExpandRequest:
    """Sample `n` next steps continuing `text` (prompt + steps so far)."""

    text: str
    n: int
    seed: int


@dataclass(frozen=True)
class StepSample:
    """One sampled step: its text (delimiter included when it stopped on one)."""

    text: str
    tokens: int
    finish_reason: str  # "stop" (step delimiter) | "eos" | "length" (max_step_tokens)


@dataclass(frozen=True)
class ScoreRequest:
    """Score the newest step of a trajectory: `steps[-1]` given the question and earlier steps."""

    question: str
    steps: tuple[str, ...]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    max_step_tokens: int = 256
    step_delimiter: str = "\n\n"


@dataclass
class ModelInfo:
    """Identity of a model as recorded in a run: where it came from and what it is."""

    name: str
    backend: str
    details: dict[str, str] = field(default_factory=dict)


class Policy(Protocol):
    info: ModelInfo

    def format_prompt(self, question: str) -> str:
        """The root text: the question in the model's prompt template."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def expand(self, requests: list[ExpandRequest], params: SamplingParams) -> list[list[StepSample]]:
        """One list of `n` samples per request, in request order."""
        ...

    def server_stats(self) -> dict[str, Any]:
        """The serving server's KV figures since the last call (see etsq.models.metrics); {} in-process."""
        ...


class PRM(Protocol):
    info: ModelInfo

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """p(good) / (p(good) + p(bad)) of each request's newest step, in [0, 1]."""
        ...

    def server_stats(self) -> dict[str, Any]:
        """Like Policy.server_stats, for the PRM's own requests."""
        ...


def child_seed(seed: int, index: int) -> int:
    """The seed of child `index` of a request: distinct per child, stable across runs (31 bits)."""
    return (seed * 1_000_003 + index * 7_919 + 1) & 0x7FFFFFFF
