"""Particle filtering's select step: the resampling distribution, its temperature, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from etsq.search.config import SearchConfig
from etsq.search.methods import SelectContext, get_method
from etsq.search.methods.particle import resample, resampling_weights
from etsq.search.tree import Tree

SCORES = [0.9, 0.5, 0.1, 0.5, 0.7]


def _frontier(scores: list[float]) -> tuple[Tree, list[int]]:
    tree = Tree("prompt", 10)
    return tree, [tree.add_child(0, f"step {i}", 3, score=s).idx for i, s in enumerate(scores)]


def test_weights_are_the_softmax_of_scores_over_temperature() -> None:
    weights = resampling_weights(SCORES, 0.2)
    expected = [math.exp(s / 0.2) for s in SCORES]
    assert weights.tolist() == pytest.approx([w / sum(expected) for w in expected])
    assert weights[1] == weights[3]  # equal scores, equal chances


def test_draws_follow_the_weights() -> None:
    """Many independent depths: each particle's draws match remaining * p_i (chi-square, seeded)."""
    remaining, trials, temp = 8, 4000, 0.3
    totals = np.zeros(len(SCORES))
    for trial in range(trials):
        totals += resample(SCORES, remaining, temp, np.random.default_rng(trial))
    expected = remaining * trials * resampling_weights(SCORES, temp)
    assert totals.sum() == remaining * trials
    assert chisquare(totals, expected).pvalue > 1e-3
    assert np.abs(totals / expected - 1).max() < 0.05


def test_one_depth_hands_out_exactly_remaining() -> None:
    tree, frontier = _frontier(SCORES)
    cfg = SearchConfig(method="particle", width=16)
    for seed in range(50):
        sel = get_method("particle").select(
            tree, frontier, 11, cfg, SelectContext(rng=np.random.default_rng(seed))
        )
        assert set(sel.counts) == set(frontier)
        assert sum(sel.counts.values()) == 11
        assert sel.info["survivors"] == len(sel.kept)


def test_temperature_moves_between_greedy_and_uniform() -> None:
    rng = np.random.default_rng(0)
    cold = resample(SCORES, 1000, 0.001, rng)
    assert cold == [1000, 0, 0, 0, 0]  # all draws on the best particle
    hot = np.array(resample(SCORES, 100_000, 1e6, rng))
    assert np.abs(hot / 20_000 - 1).max() < 0.03  # about uniform


def test_same_seed_same_particles_and_other_seeds_differ() -> None:
    draws = {tuple(resample(SCORES, 12, 0.5, np.random.default_rng(seed))) for seed in range(20)}
    assert len(draws) > 5
    first = resample(SCORES, 12, 0.5, np.random.default_rng(7))
    assert resample(SCORES, 12, 0.5, np.random.default_rng(7)) == first


def test_nothing_left_draws_nothing() -> None:
    assert resample(SCORES, 0, 0.2, np.random.default_rng(0)) == [0] * len(SCORES)
    assert resample([], 5, 0.2, np.random.default_rng(0)) == []
