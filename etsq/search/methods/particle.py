"""Particle filtering: the frontier's particles are resampled by a softmax of their PRM scores.

After Puri et al. 2025 ("A Probabilistic Inference Approach to Inference-Time Scaling of LLMs using
Particle-Based Monte Carlo Methods", arXiv 2502.01618). In etsq's tree terms:

- **particles**: the frontier nodes of the depth (live, unfinished partial solutions); the loop's
  root expansion makes the first W particles, as for every method.
- **weights**: `p_i = exp(s_i / T) / sum_j exp(s_j / T)`, where `s_i` is node i's PRM score (its
  newest step's) and `T` the run's `softmax_temp` (reference 0.2, shared with REBASE; computed as
  `exp((s_i - s_max) / T)` so nothing overflows).
- **resampling**: `remaining` draws with replacement from the frontier with probabilities `p`
  (multinomial resampling): node i gets `n_i` = the number of times it was drawn, so
  `sum(n_i) == remaining` and `E[n_i] = remaining * p_i`. A node drawn `n_i` times is continued by
  `n_i` children (each an independent step sample: a resampled copy of the particle that moves on);
  a node never drawn is pruned. The draw uses the select step's RNG, seeded by (run seed, problem,
  depth), so a resumed search draws the same particles.
- **finished particles**: a particle whose newest step ends the trajectory (answer, EOS, limits)
  becomes a leaf and takes one unit of the width, as in every etsq method; it is not resampled
  again. The paper keeps finished particles in the resampling pool (so a good finished particle
  can displace live ones); etsq's width accounting, which the KV and call comparisons between
  methods rely on, makes every leaf permanent instead.

Against REBASE at the same T: REBASE gives node i about `remaining * p_i` children deterministically
(rounded up along the score order); particle filtering gives it that many in expectation, so weaker
particles survive by chance and the spread of the search is random.
"""

from __future__ import annotations

import numpy as np

from etsq.search.config import SearchConfig
from etsq.search.methods.base import SelectContext, Selection
from etsq.search.methods.rebase import frontier_scores
from etsq.search.tree import Tree


def resampling_weights(scores: list[float], temperature: float) -> np.ndarray:
    """softmax(scores / temperature): the probability of drawing each particle."""
    values = np.asarray(scores, dtype=np.float64)
    logits = (values - values.max()) / temperature
    weights: np.ndarray = np.exp(logits)
    return weights / float(weights.sum())


def resample(scores: list[float], remaining: int, temperature: float, rng: np.random.Generator) -> list[int]:
    """How many times each particle is drawn in `remaining` multinomial draws."""
    if remaining <= 0 or not scores:
        return [0] * len(scores)
    return [int(n) for n in rng.multinomial(remaining, resampling_weights(scores, temperature))]


def select(
    tree: Tree, frontier: list[int], remaining: int, cfg: SearchConfig, ctx: SelectContext
) -> Selection:
    """Multinomial resampling of the frontier by softmax(score / softmax_temp)."""
    counts = resample(frontier_scores(tree, frontier), remaining, cfg.softmax_temp, ctx.rng)
    survivors = sum(1 for n in counts if n > 0)
    return Selection(counts=dict(zip(frontier, counts, strict=True)), info={"survivors": survivors})
