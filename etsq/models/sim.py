"""The `sim` backend: synthetic steps, token counts and scores, for load and fault tests only.

Everything is a pure function of the request's seed (policy) or text (PRM), so a simulated
search is exactly reproducible and resumable. Step texts come from a small vocabulary, so
ETS's embedding cache is warm after the first few steps and benchmarks measure orchestration,
not embedding. `latency_s` makes each request take that long, like a server at load.
A run using it is labelled `"synthetic": true` in its config; it is never a default.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from etsq.models.base import PRM, ExpandRequest, ModelInfo, Policy, SamplingParams, ScoreRequest, StepSample
from etsq.models.config import ModelConfig
from etsq.settings import Settings

_PHRASES = (
    "Let x be the unknown quantity",
    "Multiply both sides by two",
    "Add the two partial sums",
    "Subtract the smaller number",
    "Divide the total by the count",
    "Check the units of the result",
    "Write the equation for the total",
    "Simplify the fraction",
    "Substitute the known value",
    "Compute the difference",
    "Factor the expression",
    "Square both sides",
)


def _unit_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def load(cfg: ModelConfig, settings: Settings) -> tuple[Policy, PRM]:
    """The backend loader (see etsq.models.backends)."""
    return SimPolicy(cfg.sim_latency_s, cfg.sim_answer_every), SimPRM(cfg.sim_latency_s)


class SimPolicy:
    """Instant (or `latency_s`-slow) synthetic steps; about one in `answer_every` steps ends."""

    def __init__(self, latency_s: float = 0.0, answer_every: int = 4) -> None:
        self.latency_s, self.answer_every = latency_s, answer_every
        self.info = ModelInfo("sim", "sim", {"synthetic": "true", "latency_s": str(latency_s)})

    def format_prompt(self, question: str) -> str:
        return f"Question: {question}\nAnswer step by step.\n\n"

    def count_tokens(self, text: str) -> int:
        return max(1, len(text.split()))

    def server_stats(self) -> dict[str, Any]:
        return {}  # no server

    def expand(self, requests: list[ExpandRequest], params: SamplingParams) -> list[list[StepSample]]:
        if self.latency_s:
            time.sleep(self.latency_s)
        return [
            [self._sample(np.random.default_rng([req.seed, i]), params) for i in range(req.n)]
            for req in requests
        ]

    def _sample(self, rng: np.random.Generator, params: SamplingParams) -> StepSample:
        phrase = _PHRASES[int(rng.integers(len(_PHRASES)))]
        tokens = (
            int(rng.integers(8, min(64, params.max_step_tokens) + 1))
            if params.max_step_tokens > 8
            else params.max_step_tokens
        )
        if rng.random() < 1 / self.answer_every:
            return StepSample(f"{phrase}. The answer is {int(rng.integers(1, 6))}.", tokens, "eos")
        return StepSample(f"{phrase}.{params.step_delimiter}", tokens, "stop")


class SimPRM:
    """A score per step from a hash of the question and the trajectory: deterministic, in [0, 1]."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.info = ModelInfo("sim", "sim", {"synthetic": "true"})

    def server_stats(self) -> dict[str, Any]:
        return {}

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        if self.latency_s:
            time.sleep(self.latency_s)
        return [_unit_hash(req.question + "\x1f".join(req.steps)) for req in requests]
