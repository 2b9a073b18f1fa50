"""Method regression tests on the testbed: width must buy accuracy, and ETS must not keep more KV.

Every method runs in-process on the same arith test problems with the trained tiny policy and PRM
(`etsq testbed`), and is graded as `etsq aggregate` grades (score of the last step, PRM-weighted
vote).  A change that breaks sampling, the PRM's scores, a method's weighting, voting, grading or
ETS's pruning shows up here as lost accuracy or kept KV; the sim backend, whose answers are random,
cannot show either.  "One sample" is W=1 averaged over several seeds per problem, so that the
comparison's noise is mostly the searches'.  The PRM is read by the `likelihood` family (README,
"The testbed").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.testbed_search import (
    Outcome,
    Testbed,
    accuracy,
    correctness,
    difference_interval,
    load_testbed,
    mean_correctness,
    run_method,
)

N_PROBLEMS = 100
WIDTH = 16
SINGLE_SEEDS = 4


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    from etsq.queue.execute import load_embedder

    testbed = load_testbed(tmp_path_factory.mktemp("home"), N_PROBLEMS)
    testbed.embedder = load_embedder(None)
    yield testbed


@pytest.fixture(scope="module")
def outcomes(bed: Testbed) -> dict[str, list[Outcome]]:
    """Each configuration searched once for the whole module."""
    runs = {f"single/{seed}": run_method(bed, "rebase", 1, seed=seed) for seed in range(SINGLE_SEEDS)}
    return runs | {
        "rebase": run_method(bed, "rebase", WIDTH),
        "bon-majority": run_method(bed, "bon", WIDTH, vote="majority"),
        "ets": run_method(bed, "ets", WIDTH),
        "particle": run_method(bed, "particle", WIDTH),
    }


def _single(outcomes: dict[str, list[Outcome]]) -> list[float]:
    return mean_correctness([outcomes[f"single/{seed}"] for seed in range(SINGLE_SEEDS)])


def _report(outcomes: dict[str, list[Outcome]]) -> str:
    single = sum(_single(outcomes)) / N_PROBLEMS
    searched = ", ".join(f"{name} {accuracy(runs):.3f}" for name, runs in outcomes.items() if "/" not in name)
    return f"one sample {single:.3f}, {searched}"


def _beats_one_sample(outcomes: dict[str, list[Outcome]], method: str) -> None:
    diff, low, high = difference_interval(correctness(outcomes[method]), _single(outcomes))
    assert low > 0, f"{method} W={WIDTH} - W=1: {diff:+.3f} [{low:+.3f}, {high:+.3f}]; {_report(outcomes)}"


def test_rebase_at_width_16_beats_one_sample(outcomes: dict[str, list[Outcome]]) -> None:
    _beats_one_sample(outcomes, "rebase")


def test_rebase_spends_its_width_where_the_prm_points(outcomes: dict[str, list[Outcome]]) -> None:
    """More of REBASE's leaves are right than of independent samples (one sample's accuracy).

    The final PRM-weighted vote can rescue a search that expanded the wrong nodes, so accuracy alone
    does not show that REBASE's weighting works: with the weights inverted on purpose (low scores
    expanded most), REBASE still beat one sample on accuracy, while its share of right leaves fell
    from 0.74 to 0.55 against one sample's 0.57.
    """
    shares = [o.leaf_share for o in outcomes["rebase"]]
    diff, low, high = difference_interval(shares, _single(outcomes))
    assert low > 0, f"REBASE's right leaves - one sample: {diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def test_particle_filtering_beats_one_sample(outcomes: dict[str, list[Outcome]]) -> None:
    _beats_one_sample(outcomes, "particle")


def test_rebase_is_not_below_best_of_n_with_a_majority_vote(outcomes: dict[str, list[Outcome]]) -> None:
    """Within noise: the interval of REBASE - BoN(majority) reaches 0 or above."""
    diff, low, high = difference_interval(
        correctness(outcomes["rebase"]), correctness(outcomes["bon-majority"])
    )
    assert high >= 0, f"REBASE - BoN majority: {diff:+.3f} [{low:+.3f}, {high:+.3f}]; {_report(outcomes)}"


def test_ets_keeps_rebases_accuracy(outcomes: dict[str, list[Outcome]]) -> None:
    """Within noise: pruning to fewer distinct nodes may not cost accuracy (ETS - REBASE reaches 0)."""
    diff, low, high = difference_interval(correctness(outcomes["ets"]), correctness(outcomes["rebase"]))
    assert high >= 0, f"ETS - REBASE: {diff:+.3f} [{low:+.3f}, {high:+.3f}]; {_report(outcomes)}"


def test_sixteen_samples_with_a_majority_vote_beat_one(outcomes: dict[str, list[Outcome]]) -> None:
    _beats_one_sample(outcomes, "bon-majority")


def test_ets_keeps_no_more_kv_than_rebase(outcomes: dict[str, list[Outcome]]) -> None:
    ets = sum(o.kv_after for o in outcomes["ets"])
    rebase = sum(o.kv_after for o in outcomes["rebase"])
    assert ets <= rebase, f"kv_after summed over {N_PROBLEMS} problems: ETS {ets}, REBASE {rebase}"


def test_every_search_spends_its_width(outcomes: dict[str, list[Outcome]]) -> None:
    """The comparisons above are at equal budgets: every W=16 search ended with 16 leaves' worth."""
    searched = [runs for name, runs in outcomes.items() if "/" not in name]
    assert all(o.policy_calls >= WIDTH for runs in searched for o in runs)
    assert all(o.policy_calls >= 1 for name, runs in outcomes.items() if "/" in name for o in runs)


def test_the_testbed_is_hard_enough_for_search_to_matter(outcomes: dict[str, list[Outcome]]) -> None:
    """A policy that always (or never) solves the problems would make the tests above vacuous."""
    single = sum(_single(outcomes)) / N_PROBLEMS
    coverage = sum(o.covered for o in outcomes["rebase"]) / N_PROBLEMS
    assert 0.2 <= single <= 0.7 and coverage >= 0.8, _report(outcomes)
