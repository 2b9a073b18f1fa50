"""Tests for the select methods (bon, rebase, beam, dvts, ets), ETS's program and its clusters.

Trees are hand-built or grown the way the search grows them (REBASE allocation per depth) from a
seed; a fake embedder maps step texts to fixed vectors, so clusters are known in advance.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage

from etsq.errors import ConfigError
from etsq.search import ilp
from etsq.search.clusters import cluster_embeddings, cluster_texts
from etsq.search.config import SearchConfig
from etsq.search.loop import select_step
from etsq.search.methods import METHODS, SelectContext, Selection, get_method
from etsq.search.methods.beam import beam_count
from etsq.search.methods.dvts import split_evenly, subtree_count, subtree_groups, widths_left
from etsq.search.methods.rebase import frontier_scores, rebase_allocate, score_order
from etsq.search.tree import Tree

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
DIM = 8


class FakeEmbedder:
    """Fixed vectors per text; counts calls so tests can see what reached the model."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.calls = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.stack([self.table[t] for t in texts])


def _unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v)
    return out


def grow_tree(seed: int, width: int, depth: int, n_protos: int = 4) -> tuple[Tree, list[int], FakeEmbedder]:
    """A tree whose depth-`depth` frontier holds `width` nodes, grown with REBASE per depth.

    Steps are "s<k>" (one of n_protos shared texts/vectors: the clusters) or unique texts
    with random vectors; token counts and scores are random, with repeated scores for ties.
    """
    rng = np.random.default_rng(seed)
    tree = Tree("prompt", int(rng.integers(5, 50)))
    protos = [_unit(v) for v in rng.normal(size=(n_protos, DIM))]
    table: dict[str, np.ndarray] = {}

    def add_children(parent: int, n: int) -> None:
        for _ in range(n):
            score = float(rng.choice([rng.random(), 0.5, 0.9]))
            node = tree.add_child(parent, "", int(rng.integers(1, 40)), score=score)
            k = int(rng.integers(0, n_protos + 2))
            node.text = f"s{k}" if k < n_protos else f"u{node.idx}"
            table[node.text] = protos[k] if k < n_protos else _unit(rng.normal(size=DIM))

    add_children(0, width)
    for d in range(1, depth):
        frontier = tree.frontier(d)
        for idx, n in zip(
            frontier, rebase_allocate(frontier_scores(tree, frontier), width, 0.2), strict=True
        ):
            add_children(idx, n)
    return tree, tree.frontier(depth), FakeEmbedder(table)


def run_select(
    name: str, tree: Tree, frontier: list[int], cfg: SearchConfig, emb: FakeEmbedder | None = None
) -> Selection:
    return get_method(name).select(tree, frontier, len(frontier), cfg, SelectContext(embedder=emb))


trees = st.tuples(st.integers(0, 10**6), st.integers(2, 12), st.integers(1, 4))


# --------------------------------------------------------------------------- registry, bon


def test_registry_has_all_methods() -> None:
    assert set(METHODS) >= {"bon", "rebase", "beam", "dvts", "ets", "particle"}
    with pytest.raises(ConfigError):
        get_method("nope")


@SETTINGS
@given(trees)
def test_bon_one_child_each(spec: tuple[int, int, int]) -> None:
    tree, frontier, _ = grow_tree(*spec)
    sel = run_select("bon", tree, frontier, SearchConfig(width=spec[1], method="bon"))
    assert sel.counts == {i: 1 for i in frontier}
    assert sum(sel.counts.values()) == len(frontier)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_root_gets_the_whole_width(name: str) -> None:
    tree = Tree("prompt", 10)
    select = get_method(name).select
    sel = select_step(select, tree, [0], 16, 0, SearchConfig(width=16, method=name), SelectContext())
    assert sel.counts == {0: 16}


# --------------------------------------------------------------------------- rebase


@pytest.mark.parametrize(
    ("scores", "remaining", "temp", "expected"),
    [
        # w = 1, e^-2, e^-4; mass 1.1536: ceil(4 / 1.1536) = 4 takes everything.
        ([0.9, 0.5, 0.1], 4, 0.2, [4, 0, 0]),
        # equal weights: ceil(6/4) = 2, ceil(4/3) = 2, ceil(2/2) = 1, ceil(1/1) = 1.
        ([0.5, 0.5, 0.5, 0.5], 6, 0.2, [2, 2, 1, 1]),
        # T = 1: w = e^-0.6 = 0.5488 and 1; ceil(3 / 1.5488) = 2 to the best, 1 left.
        ([0.2, 0.8], 3, 1.0, [1, 2]),
        # w = 1, e^-0.5 = 0.6065, e^-1 = 0.3679 (mass 1.9744): ceil(5/1.9744) = 3,
        # ceil(2 * 0.6065 / 0.9744) = 2, nothing left for the last.
        ([0.3, 0.2, 0.1], 5, 0.2, [3, 2, 0]),
        ([0.3, 0.2], 0, 0.2, [0, 0]),
        # huge scores must not overflow exp (the max is subtracted first): w = 1, e^-0.5,
        # ceil(2 / 1.6065) = 2; equal huge scores split evenly.
        ([1000.0, 999.9], 2, 0.2, [2, 0]),
        ([1000.0, 1000.0], 2, 0.2, [1, 1]),
    ],
)
def test_rebase_hand_computed(scores: list[float], remaining: int, temp: float, expected: list[int]) -> None:
    assert rebase_allocate(scores, remaining, temp) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    st.integers(0, 300),
    st.sampled_from([0.05, 0.2, 1.0, 5.0]),
)
def test_rebase_hands_out_exactly_remaining(scores: list[float], remaining: int, temp: float) -> None:
    counts = rebase_allocate(scores, remaining, temp)
    assert sum(counts) == remaining and min(counts) >= 0
    ranked = [counts[i] for i in score_order(scores)]
    first_zero = ranked.index(0) if 0 in ranked else len(ranked)
    assert all(n == 0 for n in ranked[first_zero:])  # pruned nodes are the lowest-scored
    if remaining >= 1:
        assert counts[score_order(scores)[0]] >= 1


@SETTINGS
@given(trees)
def test_rebase_select_matches_allocation(spec: tuple[int, int, int]) -> None:
    tree, frontier, _ = grow_tree(*spec)
    cfg = SearchConfig(width=spec[1])
    sel = run_select("rebase", tree, frontier, cfg)
    expected = rebase_allocate(frontier_scores(tree, frontier), len(frontier), cfg.softmax_temp)
    assert [sel.counts[i] for i in frontier] == expected
    assert sum(sel.counts.values()) == len(frontier)


# --------------------------------------------------------------------------- beam


@SETTINGS
@given(trees, st.sampled_from([None, 1, 2, 3]))
def test_beam_keeps_top_k(spec: tuple[int, int, int], beam_k: int | None) -> None:
    tree, frontier, _ = grow_tree(*spec)
    remaining = len(frontier)
    sel = run_select("beam", tree, frontier, SearchConfig(width=spec[1], beam_k=beam_k))
    k = beam_count(remaining, beam_k)
    assert k == (beam_k or math.ceil(math.sqrt(remaining)))
    kept = sel.kept
    assert len(kept) == min(k, len(frontier))
    assert all(sel.counts[i] == math.ceil(remaining / k) for i in kept)
    worst_kept = min(tree.nodes[i].score or 0.0 for i in kept)
    assert all((tree.nodes[i].score or 0.0) <= worst_kept for i in frontier if i not in kept)
    assert remaining <= sum(sel.counts.values()) <= remaining + k - 1


# --------------------------------------------------------------------------- dvts


def simulate(
    name: str, width: int, seed: int, p_terminal: float = 0.25, cfg_extra: dict[str, Any] | None = None
) -> Tree:
    """The search loop with random steps: a terminal with probability p_terminal."""
    rng = np.random.default_rng(seed)
    cfg = SearchConfig(width=width, method=name, lambda_s=0.0, **(cfg_extra or {}))
    tree = Tree("prompt", 10)
    select_fn = get_method(name).select
    frontier, depth = [0], 0
    while depth < 12:
        remaining = width - len(tree.leaves())
        if remaining <= 0 or not frontier:
            break
        sel = select_step(select_fn, tree, frontier, remaining, depth, cfg, SelectContext())
        for idx, n in sel.counts.items():
            for _ in range(n):
                tree.add_child(
                    idx, "s", 5, score=float(rng.random()), terminal=bool(rng.random() < p_terminal)
                )
        depth += 1
        frontier = tree.frontier(depth)
    for idx in tree.frontier(depth):
        tree.nodes[idx].terminal = True  # the depth cap ends what is left
    return tree


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("width", [3, 16])
def test_every_registered_method_decides_for_the_whole_frontier(name: str, width: int) -> None:
    """What the loop needs of any method: a count >= 0 for each frontier node, progress, determinism."""
    for seed in range(3):
        tree, frontier, emb = grow_tree(seed, width, 3)
        cfg = SearchConfig(method=name, width=width, lambda_s=0.0)
        remaining = width - len(tree.leaves())
        if remaining <= 0 or not frontier:
            continue
        # The loop gives every depth a fresh RNG seeded from (seed, problem, depth): the same context
        # twice must give the same decision (a resumed search repeats it).
        sel = get_method(name).select(tree, frontier, remaining, cfg, SelectContext(embedder=emb))
        assert set(sel.counts) == set(frontier)
        assert all(n >= 0 for n in sel.counts.values()) and sum(sel.counts.values()) >= 1
        again = get_method(name).select(tree, frontier, remaining, cfg, SelectContext(embedder=emb))
        assert again.counts == sel.counts


@pytest.mark.parametrize("name", ["bon", "rebase", "ets", "particle"])
@pytest.mark.parametrize("width", [1, 5, 16, 30])
def test_loop_finishes_exactly_w_leaves(name: str, width: int) -> None:
    for seed in range(3):
        assert len(simulate(name, width, seed).leaves()) == width


@pytest.mark.parametrize("width", [4, 9, 16, 30])
def test_dvts_loop_finishes_w_leaves_one_chain_per_subtree(width: int) -> None:
    for seed in range(3):
        tree = simulate("dvts", width, seed)
        assert len(tree.leaves()) == width
        n_subtrees = subtree_count(width, None, width)
        for depth in range(2, 13):
            parents = {tree.nodes[i].parent for i in tree.at_depth(depth)}
            assert len(parents) <= n_subtrees  # one kept node per subtree per depth


@SETTINGS
@given(st.integers(0, 10**6), st.integers(2, 40), st.sampled_from([None, 2, 3]))
def test_dvts_invariants(seed: int, width: int, fixed: int | None) -> None:
    rng = np.random.default_rng(seed)
    tree = simulate("dvts", width, seed, p_terminal=0.2, cfg_extra={"dvts_subtrees": fixed})
    depth = int(rng.integers(1, max(2, max(n.depth for n in tree.nodes) + 1)))
    frontier = [i for i in tree.at_depth(depth) if not tree.nodes[i].terminal]
    if not frontier:
        return
    n_sub = subtree_count(width, fixed, len(tree.at_depth(1)))
    groups = subtree_groups(tree, n_sub)
    sub_tree = _truncate(tree, depth)  # select afresh over this depth, as if it were the newest
    left = widths_left(sub_tree, groups, width, n_sub)
    cfg = SearchConfig(width=width, dvts_subtrees=fixed)
    sel = get_method("dvts").select(sub_tree, frontier, width - len(sub_tree.leaves()), cfg, SelectContext())
    assert sum(split_evenly(width, n_sub)) == width
    live = {groups[sub_tree.subtree_root(i)] for i in frontier}
    assert sum(sel.counts.values()) == sum(max(left[g], 0) for g in live)
    units = [
        (groups[sub_tree.subtree_root(i)], -1 if depth == 1 else sub_tree.nodes[i].parent) for i in sel.kept
    ]
    assert len(units) == len(set(units))  # at most one kept node per (subtree, parent)


def _truncate(tree: Tree, depth: int) -> Tree:
    """Copy of the tree's nodes down to `depth` (the state a select at `depth` sees)."""
    out = Tree(tree.root.text, tree.root.tokens)
    for node in tree.nodes[1:]:
        if node.depth <= depth:
            assert node.parent is not None
            out.add_child(node.parent, node.text, node.tokens, score=node.score, terminal=node.terminal)
    return out


def test_dvts_hand_built() -> None:
    tree = Tree("p", 3)
    first = [tree.add_child(0, "a", 1, score=s).idx for s in (0.1, 0.7, 0.3, 0.2)]
    sel = get_method("dvts").select(tree, first, 4, SearchConfig(width=4), SelectContext())
    assert sel.counts == {first[0]: 0, first[1]: 2, first[2]: 2, first[3]: 0}  # 2 subtrees of 2
    kids = [tree.add_child(first[1], "b", 1, score=s).idx for s in (0.4, 0.9)]
    kids += [tree.add_child(first[2], "b", 1, score=0.5, terminal=True).idx]
    kids += [tree.add_child(first[2], "b", 1, score=0.6).idx]
    frontier = [k for k in kids if not tree.nodes[k].terminal]
    sel = get_method("dvts").select(tree, frontier, 3, SearchConfig(width=4), SelectContext())
    assert sel.counts == {kids[0]: 0, kids[1]: 2, kids[3]: 1}  # subtree 2 lost one to its leaf


# --------------------------------------------------------------------------- ets


def ets_select(tree: Tree, frontier: list[int], emb: FakeEmbedder | None, **cfg: object) -> Selection:
    return run_select("ets", tree, frontier, SearchConfig(width=len(frontier), **cfg), emb)  # type: ignore[arg-type]


@SETTINGS
@given(trees, st.sampled_from(["uniform", "tokens"]))
def test_ets_without_penalties_is_rebase(spec: tuple[int, int, int], cost: str) -> None:
    tree, frontier, emb = grow_tree(*spec)
    ets = ets_select(tree, frontier, emb, lambda_b=0.0, lambda_s=0.0, cost=cost)
    reb = run_select("rebase", tree, frontier, SearchConfig(width=spec[1]))
    assert ets.counts == reb.counts
    assert ets.kept == reb.kept


@SETTINGS
@given(trees, st.sampled_from([0.0, 1.0]))
def test_ets_larger_lambda_b_never_keeps_more_kv(spec: tuple[int, int, int], lambda_s: float) -> None:
    # The program's kept set (token costs = KV share) shrinks in KV as lambda_b grows. REBASE's
    # allocation afterwards may give some of those nodes 0 children, so Selection.kept is a
    # subset of it and carries no such guarantee (counterexamples exist).
    tree, frontier, emb = grow_tree(*spec)
    kv_prev = math.inf
    for lambda_b in (0.0, 0.3, 1.0, 3.0, 10.0, 100.0):
        sel = ets_select(tree, frontier, emb, lambda_b=lambda_b, lambda_s=lambda_s, cost="tokens")
        kv = tree.kv_tokens(sel.info["ilp_kept"])
        assert kv <= kv_prev
        assert set(sel.kept) <= set(sel.info["ilp_kept"])
        assert sum(sel.counts.values()) == len(frontier)
        kv_prev = kv


@SETTINGS
@given(trees, st.sampled_from([0.1, 0.5, 2.0]), st.sampled_from(["uniform", "tokens"]))
def test_ets_coverage_never_covers_fewer_clusters(
    spec: tuple[int, int, int], lambda_b: float, cost: str
) -> None:
    tree, frontier, emb = grow_tree(*spec)
    ids = dict(zip(frontier, cluster_texts([tree.nodes[i].text for i in frontier], emb, 0.05), strict=True))
    without = ets_select(tree, frontier, emb, lambda_b=lambda_b, lambda_s=0.0, cost=cost)
    with_cov = ets_select(tree, frontier, emb, lambda_b=lambda_b, lambda_s=1.5, cost=cost)
    covered = [len({ids[i] for i in s.info["ilp_kept"]}) for s in (without, with_cov)]
    assert covered[1] >= covered[0]


@SETTINGS
@given(trees)
def test_ets_is_deterministic(spec: tuple[int, int, int]) -> None:
    tree, frontier, emb = grow_tree(*spec)
    first = ets_select(tree, frontier, emb, lambda_b=1.0, lambda_s=1.5)
    second = ets_select(tree, frontier, emb, lambda_b=1.0, lambda_s=1.5)
    assert first.counts == second.counts and first.clusters == second.clusters
    assert sum(first.counts.values()) == len(frontier)
    assert set(first.clusters) == set(frontier) and first.info["n_clusters"] == len(
        set(first.clusters.values())
    )


def test_ets_info_and_skips() -> None:
    tree, frontier, emb = grow_tree(7, 12, 3)
    sel = ets_select(tree, frontier, emb, lambda_b=1.0, lambda_s=1.4)
    keys = {"ilp_vars", "ilp_constraints", "ilp_objective", "solver", "solve_ms", "cluster_ms", "n_clusters"}
    assert keys <= set(sel.info)
    no_cov = ets_select(tree, frontier, None, lambda_b=1.0, lambda_s=0.0)
    assert no_cov.clusters == {} and no_cov.info["n_clusters"] == 0  # nothing embedded
    one = ets_select(tree, frontier[:1], None, lambda_b=1.0, lambda_s=1.4)
    assert one.counts == {frontier[0]: 1} and one.info["solver"] == "trivial"
    with pytest.raises(ConfigError):
        ets_select(tree, frontier, None, lambda_b=1.0, lambda_s=1.4)  # differing texts need an embedder


def test_ets_identical_steps_skip_the_embedder() -> None:
    tree = Tree("p", 4)
    parents = [tree.add_child(0, "x", 3, score=0.5).idx for _ in range(3)]
    frontier = [
        tree.add_child(p, "same", 2, score=s).idx for p, s in zip(parents, (0.2, 0.9, 0.4), strict=True)
    ]
    emb = FakeEmbedder({})
    sel = ets_select(tree, frontier, emb, lambda_b=1.0, lambda_s=1.5)
    assert emb.calls == 0 and set(sel.clusters.values()) == {0}
    assert sum(sel.counts.values()) == 3 and sel.counts[frontier[1]] >= 1


def test_ets_prunes_a_costly_branch() -> None:
    # Four equally scored nodes (O = 1/4 each), three under parent a and one alone under b;
    # uniform cost 1/7. Keeping the lone node costs 2/7 > 1/4, each of a's costs 1/7 < 1/4.
    tree = Tree("p", 1)
    a, b = tree.add_child(0, "a", 1, score=0.5).idx, tree.add_child(0, "b", 1, score=0.5).idx
    frontier = [tree.add_child(a, f"s{k}", 1, score=0.9).idx for k in range(3)]
    frontier.append(tree.add_child(b, "t", 1, score=0.9).idx)
    sel = ets_select(tree, frontier, None, lambda_b=1.0, lambda_s=0.0)
    assert sel.info["ilp_kept"] == frontier[:3]
    assert [sel.counts[i] for i in frontier] == [2, 1, 1, 0]  # REBASE over the three kept
    assert sel.info["ilp_objective"] == pytest.approx(0.75 - 5 / 7)
    rebase = run_select("rebase", tree, frontier, SearchConfig(width=4))
    assert [rebase.counts[i] for i in frontier] == [1, 1, 1, 1]


def test_token_costs_sum_to_one() -> None:
    tree, frontier, _ = grow_tree(3, 10, 3)
    nodes, _ = ilp.alive_tree(tree, frontier)
    for mode in ("uniform", "tokens"):
        assert math.isclose(sum(ilp.node_costs(tree, nodes, mode)), 1.0)


# --------------------------------------------------------------------------- the program


def random_problem(seed: int) -> ilp.EtsProblem:
    """A small random program: random tree shape, costs, outcomes, clusters and lambdas."""
    rng = np.random.default_rng(seed)
    tree, frontier, _ = grow_tree(seed, int(rng.integers(1, 9)), int(rng.integers(1, 4)), n_protos=3)
    outcome = [float(rng.choice([0.0, 0.0, rng.random()])) for _ in frontier]
    total = sum(outcome) or 1.0
    clusters = None if rng.random() < 0.2 else [int(rng.integers(0, 3)) for _ in frontier]
    cost = "tokens" if rng.random() < 0.5 else "uniform"
    lambda_b = float(rng.choice([0.0, 0.5, 1.0, 3.0, 10.0]))
    lambda_s = float(rng.choice([0.0, 0.5, 1.5]))
    return ilp.problem_from_tree(
        tree, frontier, [o / total for o in outcome], cost, clusters, lambda_b, lambda_s
    )


def brute_force(problem: ilp.EtsProblem) -> float:
    best = -math.inf
    for bits in itertools.product((False, True), repeat=problem.n_frontier):
        if any(bits):
            best = max(best, ilp.objective_value(problem, bits))
    return best


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**6))
def test_reduced_program_optimum_equals_brute_force(seed: int) -> None:
    problem = random_problem(seed)
    best = brute_force(problem)
    for formulation in ("reduced", "full"):
        sol = ilp.solve(problem, formulation=formulation)
        assert sol.objective == pytest.approx(best, abs=1e-9)
        assert any(sol.selected)


@pytest.mark.parametrize("backend", ["pulp-highs", "pulp-cbc"])
def test_pulp_backends_agree(backend: str) -> None:
    for seed in range(4):
        problem = random_problem(seed + 100)
        expected = ilp.solve(problem).objective
        for formulation in ("reduced", "full"):
            sol = ilp.solve(problem, backend=backend, formulation=formulation)
            assert sol.objective == pytest.approx(expected, abs=1e-9)


def test_reduced_model_is_smaller() -> None:
    tree, frontier, emb = grow_tree(11, 40, 4)
    ids = cluster_texts([tree.nodes[i].text for i in frontier], emb, 0.05)
    problem = ilp.problem_from_tree(tree, frontier, [1 / 40] * 40, "uniform", list(ids), 1.0, 1.4)
    reduced, full = ilp.reduced_model(problem), ilp.full_model(problem)
    assert reduced.n_cols < full.n_cols and len(reduced.row_index) < len(full.row_index)


def test_dominated_siblings_are_left_out() -> None:
    # Three same-cluster siblings with O = 0.5, 0, 0: the two zero ones never help.
    problem = ilp.EtsProblem(
        parent=(3, 3, 3, 4, -1),
        cost=(0.2,) * 5,
        outcome=(0.5, 0.0, 0.0),
        clusters=(0, 0, 0),
        lambda_b=1.0,
        lambda_s=1.0,
    )
    assert ilp.dominated_siblings(problem) == {1, 2}
    assert ilp.solve(problem).selected == (True, False, False)


def test_negative_lambdas_rejected() -> None:
    with pytest.raises(ConfigError):
        ilp.EtsProblem(parent=(-1,), cost=(1.0,), outcome=(), clusters=None, lambda_b=-1.0, lambda_s=0.0)


# --------------------------------------------------------------------------- clusters


def _same_pairs(labels: list[int]) -> set[tuple[int, int]]:
    return {(i, j) for i in range(len(labels)) for j in range(len(labels)) if labels[i] == labels[j]}


def test_clusters_match_scipy_reference() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    emb = np.concatenate([c + rng.normal(scale=0.02, size=(6, 16)) for c in centers])
    ours = cluster_embeddings(emb, 0.05)
    ref = fcluster(linkage(emb, method="average", metric="cosine"), t=0.05, criterion="distance") - 1
    assert len(set(ours)) == 5
    assert _same_pairs(list(ours)) == _same_pairs(list(ref))


def _clustered_points(seed: int) -> tuple[np.ndarray, float]:
    """Random embeddings: blobs of near-duplicates, chains, exact duplicates; and a threshold."""
    rng = np.random.default_rng(seed)
    n, dim = int(rng.integers(2, 90)), int(rng.choice([3, 16, 384]))
    centers = rng.normal(size=(int(rng.integers(1, n + 1)), dim))
    spread = float(rng.choice([0.0, 0.01, 0.05, 0.2]))
    emb = centers[rng.integers(0, len(centers), size=n)] + rng.normal(scale=spread, size=(n, dim))
    if rng.random() < 0.3:  # a random walk: chains that average linkage cuts in places
        emb = np.cumsum(rng.normal(scale=0.05, size=(n, dim)), axis=0) + rng.normal(size=dim)
    emb[int(rng.integers(0, n))] = emb[0]
    return emb, float(rng.choice([1e-9, 0.01, 0.05, 0.1, 0.3, 0.7]))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6))
def test_clusters_match_scipy_on_random_sets(seed: int) -> None:
    # The components + close pairs route gives scipy's average-linkage cut, numbered by first sight.
    emb, threshold = _clustered_points(seed)
    ref = fcluster(linkage(emb, method="average", metric="cosine"), t=threshold, criterion="distance")
    first = {int(k): None for k in ref}
    expected = [list(first).index(int(k)) for k in ref]
    assert list(cluster_embeddings(emb, threshold)) == expected


def test_clusters_edge_cases() -> None:
    assert list(cluster_embeddings(np.ones((1, 3)), 0.05)) == [0]
    assert list(cluster_embeddings(np.zeros((3, 4)), 0.05)) == [0, 1, 2]  # zero rows: distance 1
    with pytest.raises(ValueError):
        cluster_embeddings(np.array([[1.0, np.nan], [1.0, 0.0]]), 0.05)
    assert list(cluster_texts(["a", "a", "a"], None, 0.05)) == [0, 0, 0]
    table = {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 0.001]), "c": np.array([0.0, 1.0])}
    ids = list(cluster_texts(["a", "b", "c"], FakeEmbedder(table), 0.05))
    assert ids[0] == ids[1] != ids[2] and sorted(set(ids)) == [0, 1]


def test_sentence_embedder_real_model() -> None:
    from etsq.search.embed import SentenceEmbedder, default_embedding_model

    class Counting(SentenceEmbedder):
        batches: ClassVar[list[int]] = []

        def _encode(self, texts: Sequence[str]) -> np.ndarray:
            self.batches.append(len(texts))
            return super()._encode(texts)

    emb = Counting(default_embedding_model())
    texts = [
        "The answer is 4.",
        "So the final answer is 4.",
        "Differentiate the logarithm with respect to x.",
    ]
    rows = emb.embed(texts + texts[:1])
    assert rows.shape[0] == 4 and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-4)
    assert np.allclose(rows[0], rows[3])
    assert rows[0] @ rows[1] > rows[0] @ rows[2]  # paraphrases are closer than unrelated steps
    assert emb.batches == [3]  # one batch, the repeated text encoded once
    emb.embed(texts)
    assert emb.batches == [3]  # every text is cached
    emb.clear_cache()
    assert np.allclose(emb.embed(texts[:2]), rows[:2], atol=1e-5) and emb.batches == [3, 2]  # encoded anew


def _gated_embedder(fail: bool = False) -> Any:
    """A SentenceEmbedder whose first encode waits for a release: what the others ask meanwhile queues."""
    from etsq.search.embed import SentenceEmbedder

    class Gated(SentenceEmbedder):
        started, release = threading.Event(), threading.Event()
        batches: ClassVar[list[list[str]]] = []

        def _encode(self, texts: Sequence[str]) -> np.ndarray:
            self.batches.append(list(texts))
            if len(self.batches) == 1:
                self.started.set()
                self.release.wait(10)
            elif fail:
                raise RuntimeError("encoder broke")
            return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    return Gated("never-loaded")  # _encode is replaced: the model is never loaded


def _embed_in_threads(emb: Any, asks: dict[str, list[str]]) -> dict[str, Any]:
    """The first ask encodes alone and holds the model; the others ask meanwhile; then release."""
    results: dict[str, Any] = {}

    def ask(name: str) -> None:
        try:
            results[name] = emb.embed(asks[name])
        except RuntimeError as exc:
            results[name] = exc

    first, *rest = asks
    threads = [threading.Thread(target=ask, args=(first,))]
    threads[0].start()
    assert emb.started.wait(10)
    threads += [threading.Thread(target=ask, args=(name,)) for name in rest]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while len(emb._asks) < len(rest) and time.monotonic() < deadline:
        time.sleep(0.01)
    emb.release.set()
    for t in threads:
        t.join(10)
    return results


def test_sentence_embedder_batches_the_texts_of_concurrent_problems() -> None:
    """Problems searched at once by one worker share its embedder: texts asked for during an encode
    are encoded together, once, in the next batch, and each caller gets its own rows."""
    emb = _gated_embedder()
    asks = {"a": ["x"], "b": ["bb", "x"], "c": ["ccc", "bb"], "d": ["dddd"]}
    results = _embed_in_threads(emb, asks)
    assert emb.batches[0] == ["x"] and len(emb.batches) == 2
    assert sorted(emb.batches[1]) == ["bb", "ccc", "dddd"]  # one batch; cached and repeated texts once
    for name, texts in asks.items():
        assert [row[0] for row in results[name]] == [float(len(t)) for t in texts]


def test_sentence_embedder_hands_a_failed_batch_to_every_waiting_caller() -> None:
    emb = _gated_embedder(fail=True)
    results = _embed_in_threads(emb, {"a": ["x"], "b": ["bb"], "c": ["ccc"]})
    assert isinstance(results["b"], RuntimeError) and results["c"] is results["b"]
    assert [row[0] for row in results["a"]] == [1.0]


_FAULT_PROBE = """
import resource, sys
import numpy as np
from etsq.procs import keep_freed_memory
from etsq.search.clusters import cluster_embeddings
kept = sys.argv[1] == "keep" and keep_freed_memory()
rng = np.random.default_rng(0)
def once():
    cluster_embeddings(rng.normal(size=(1024, 384)), 0.05)  # a fresh embedding array, as per depth
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_a_worker_keeps_freed_memory_so_each_select_reuses_its_pages() -> None:
    """W=1024's clustering faults its ~10 MB of arrays in again at every call with glibc's defaults,
    and not once the worker's malloc setting (`etsq worker` sets it) keeps freed memory."""
    import subprocess
    import sys

    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULT_PROBE, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], float(out[1])

    kept, with_setting = faults("keep")
    _, with_defaults = faults("default")
    assert kept == "True" and with_setting < 50 and with_defaults > 500, (with_setting, with_defaults)
