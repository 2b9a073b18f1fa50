"""Searches on the testbed (arith problems, the trained tiny policy and PRM), in-process and without a
database, graded the way `etsq aggregate` grades: what the method regression tests measure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etsq.datasets import Problem, load_dataset
from etsq.models.base import PRM, Policy
from etsq.models.registry import load_local_models
from etsq.results.aggregate import Ballot, equivalent, path_scores, path_values
from etsq.results.compare import paired_bootstrap
from etsq.search.config import SearchConfig
from etsq.search.loop import DepthCommit, Searcher
from etsq.search.methods import get_method
from etsq.search.methods.base import Embedder
from etsq.search.tree import Tree

TESTBED_PRM_FAMILY = "likelihood"


@dataclass(frozen=True)
class Outcome:
    """One problem searched by one method: whether its vote was right, and what it cost."""

    correct: bool
    covered: bool
    leaf_share: float  # of the tree's leaves, the share whose answer is right
    kv_after: int
    kv_before: int
    policy_calls: int


@dataclass
class Testbed:
    policy: Policy
    prm: PRM
    problems: tuple[Problem, ...]
    embedder: Embedder | None = None


def load_testbed(home: Path, n_problems: int) -> Testbed:
    policy, prm = load_local_models("testbed", "testbed-prm", home, TESTBED_PRM_FAMILY)
    return Testbed(policy, prm, tuple(load_dataset("arith", None).head(n_problems)))


def _leaf_scores(tree: Tree, idx: int) -> list[float | None]:
    return [tree.nodes[i].score for i in [*reversed(tree.ancestors(idx)), idx] if i != 0]


def grade(tree: Tree, gold: str, agg: str = "last", vote: str = "weighted") -> tuple[bool, bool]:
    """(the vote's answer is right, some leaf's answer is right), as `etsq aggregate` decides them."""
    ballot = Ballot()
    for idx in tree.leaves():
        ballot.add(tree.nodes[idx].answer, path_values(path_scores(_leaf_scores(tree, idx))))
    answer = ballot.choose(agg, vote)
    return answer is not None and equivalent(gold, answer), ballot.covers(gold)


def search(bed: Testbed, problem: Problem, method: str, width: int, **params: Any) -> tuple[Tree, int, int]:
    """One problem's search; (tree, summed kv_after, summed kv_before)."""
    cfg = SearchConfig(method=method, width=width, max_depth=12, max_step_tokens=16, **params)
    registered = get_method(method)
    embedder = bed.embedder if registered.needs_embedder else None
    searcher = Searcher(
        problem.question, problem.problem_id, bed.policy, bed.prm, cfg, registered.select, embedder
    )
    records: list[DepthCommit] = []
    tree = searcher.run(searcher.new_tree(), lambda _tree, rec: records.append(rec))
    return tree, sum(r.kv_after for r in records), sum(r.kv_before for r in records)


def leaf_share(tree: Tree, gold: str) -> float:
    leaves = tree.leaves()
    right = [i for i in leaves if tree.nodes[i].answer is not None and equivalent(gold, tree.nodes[i].answer)]
    return len(right) / len(leaves) if leaves else 0.0


def run_method(bed: Testbed, method: str, width: int, vote: str = "weighted", **params: Any) -> list[Outcome]:
    out = []
    for problem in bed.problems:
        tree, kv_after, kv_before = search(bed, problem, method, width, **params)
        correct, covered = grade(tree, problem.answer, vote=vote)
        share = leaf_share(tree, problem.answer)
        out.append(Outcome(correct, covered, share, kv_after, kv_before, len(tree.nodes) - 1))
    return out


def accuracy(outcomes: Sequence[Outcome]) -> float:
    return sum(o.correct for o in outcomes) / len(outcomes)


def correctness(outcomes: Sequence[Outcome]) -> list[float]:
    return [float(o.correct) for o in outcomes]


def mean_correctness(runs: Sequence[Sequence[Outcome]]) -> list[float]:
    """Per problem, the fraction of runs (e.g. seeds of one sample) that got it right."""
    return [sum(o.correct for o in column) / len(column) for column in zip(*runs, strict=True)]


def difference_interval(better: Sequence[float], worse: Sequence[float]) -> tuple[float, float, float]:
    """better - worse accuracy on the same problems, with its paired bootstrap 95% interval."""
    diffs = [b - w for b, w in zip(better, worse, strict=True)]
    low, high = paired_bootstrap(diffs)
    return sum(diffs) / len(diffs), low, high
