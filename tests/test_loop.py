"""The search loop over a real (tiny, random) model: the invariants every method must keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from etsq.models.base import StepSample
from etsq.search.loop import terminal_reason
from etsq.search.tree import Tree
from tests.helpers import run_recorded, tiny_config, tiny_searcher


@pytest.mark.parametrize("method", ["rebase", "bon"])
def test_every_depth_hands_out_the_remaining_width(tiny_model: Path, method: str) -> None:
    tree, records = run_recorded(tiny_searcher(tiny_model, tiny_config(method, width=6)))
    assert [r.depth for r in records] == list(range(len(records)))
    for rec in records[:-1]:
        assert sum(rec.selection.counts.values()) == rec.remaining
        assert rec.remaining == 6 - sum(1 for n in tree.nodes if n.terminal and n.depth <= rec.depth)
    assert records[-1].final and sum(records[-1].selection.counts.values()) == 0
    assert 1 <= len(tree.leaves()) <= 6


@pytest.mark.parametrize("method", ["rebase", "bon"])
def test_tree_structure_and_scores(tiny_model: Path, method: str) -> None:
    tree, _ = run_recorded(tiny_searcher(tiny_model, tiny_config(method)))
    for node in tree.nodes[1:]:
        assert node.parent is not None and node.depth == tree.nodes[node.parent].depth + 1
        assert node.score is not None and 0.0 <= node.score <= 1.0
        assert node.cum_tokens == tree.nodes[node.parent].cum_tokens + node.tokens
        assert node.tokens <= 6
    for node in tree.nodes:
        if node.kept:
            assert len(node.children) == node.n_children
        if node.terminal:
            assert node.terminal_reason in {"answer", "eos", "max_tokens", "max_depth"}
            assert not node.children


def test_bon_never_branches_below_the_root(tiny_model: Path) -> None:
    tree, _ = run_recorded(tiny_searcher(tiny_model, tiny_config("bon", width=5)))
    assert len(tree.root.children) == 5
    assert all(len(n.children) <= 1 for n in tree.nodes[1:])


def test_kv_accounting_counts_shared_prefixes_once(tiny_model: Path) -> None:
    tree, records = run_recorded(tiny_searcher(tiny_model, tiny_config("rebase", width=6)))
    for rec in records:
        assert rec.kv_after <= rec.kv_before
        union = set()
        for idx in rec.frontier:
            union |= {idx, *tree.ancestors(idx)}
        assert rec.kv_before == sum(tree.nodes[i].tokens for i in union)
    assert records[0].kv_before == tree.root.tokens  # depth 0: the prompt alone


def test_same_seed_same_tree_other_seed_other_tree(tiny_model: Path) -> None:
    def texts(seed: int) -> list[tuple[str, str, float | None]]:
        tree, _ = run_recorded(tiny_searcher(tiny_model, tiny_config("rebase", seed=seed)))
        return [(n.path, n.text, n.score) for n in tree.nodes]

    first = texts(7)
    assert texts(7) == first
    assert texts(8) != first


def test_terminal_reasons_in_order_of_precedence() -> None:
    cfg = tiny_config(max_tokens=30, max_depth=3)
    tree = Tree("prompt", 10)
    node = tree.add_child(0, "so x = 4", 25)
    assert terminal_reason(node, StepSample("The answer is 4", 3, "stop"), cfg, 10) == "answer"
    assert terminal_reason(node, StepSample("x", 3, "eos"), cfg, 10) == "eos"
    longer = tree.add_child(node.idx, "and so", 5)  # 30 generated tokens: the prompt is not counted
    assert terminal_reason(node, StepSample("x", 25, "length"), cfg, 10) is None
    assert terminal_reason(longer, StepSample("x", 5, "length"), cfg, 10) == "max_tokens"
    shallow = tree.add_child(0, "x", 1)
    assert terminal_reason(shallow, StepSample("x", 1, "stop"), cfg, 10) is None
    deep = tree.add_child(tree.add_child(shallow.idx, "y", 1).idx, "z", 1)
    assert terminal_reason(deep, StepSample("z", 1, "stop"), cfg, 10) == "max_depth"


def test_only_the_newest_depths_keep_their_path_caches() -> None:
    """Path texts and step tuples of older depths are dropped (memory), and rebuilt when asked for."""
    from etsq.models.sim import SimPolicy, SimPRM
    from etsq.search.loop import Searcher
    from etsq.search.methods import get_method

    cfg = tiny_config("rebase", width=16, max_depth=8)
    searcher = Searcher("1+1?", "k", SimPolicy(answer_every=6), SimPRM(), cfg, get_method("rebase").select)
    tree, _ = run_recorded(searcher)
    last = max(n.depth for n in tree.nodes)
    assert last >= 4
    old = [n for n in tree.nodes if n.depth < last - 1 and n.parent is not None]
    assert old and all(n.path_text is None and n.path_steps is None for n in old)
    node = tree.nodes[-1]  # a released ancestor chain still rebuilds the full path on demand
    assert tree.full_text(node.idx).endswith(node.text) and tree.steps(node.idx)[-1] == node.text
