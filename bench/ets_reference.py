"""The reference implementation's ETS select, ported line for line, for side-by-side timing.

Source: SqueezeAILab/ETS, `rebase.py`, `Tree.select_softmax_costmodel` (commit ac937a7). Only the
node class and the embedding model are replaced: `RefNode` carries what the reference's `TreeNode`
reads (id, parent, full text, step tokens) and `embed` stands for `self.model.encode`. The program
(pulp, one row per (ancestor, leaf) pair, CBC in a subprocess), the clustering (scipy `linkage`
with `metric="cosine"`) and both REBASE passes (torch, float32) are the reference's. The KV-size
bookkeeping at the end of the reference's select (`get_kv_size`, a walk over every candidate's
ancestors) is left out: etsq does that accounting in its loop, not in select, so the reference is
timed without it (which only makes it faster).

The reference sets `OMP_NUM_THREADS=1` (and the MKL/OpenBLAS equivalents) at import; the bench sets
them before numpy is imported so that both selects run single-threaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from etsq.search.tree import Tree


class RefNode:
    """The fields of the reference's TreeNode that its select reads."""

    def __init__(self, idx: int, text: str, tokens: int, parent: RefNode | None) -> None:
        self.id = idx
        self.text_ = text
        self.num_step_tokens = tokens
        self.parent = parent

    def get_text(self) -> str:
        return self.text_


def ref_nodes(tree: Tree, frontier: list[int]) -> list[RefNode]:
    """RefNodes for the frontier, sharing ancestors (built once per search in the reference)."""
    made: dict[int, RefNode] = {}

    def node(idx: int) -> RefNode:
        if idx not in made:
            n = tree.nodes[idx]
            parent = None if n.parent is None else node(n.parent)
            made[idx] = RefNode(idx, tree.full_text(idx), n.tokens, parent)
        return made[idx]

    return [node(i) for i in frontier]


def _branch_leaf_mapping(leaf_list: list[RefNode]) -> dict[int, list[int]]:
    branch_leaf_mapping: dict[int, list[int]] = {}
    for leaf in leaf_list:
        current_node = leaf
        while current_node.parent is not None:
            parent = current_node.parent
            if parent.id not in branch_leaf_mapping:
                branch_leaf_mapping[parent.id] = []
            branch_leaf_mapping[parent.id].append(leaf.id)
            current_node = parent
    for branch_id in branch_leaf_mapping:
        branch_leaf_mapping[branch_id] = list(set(branch_leaf_mapping[branch_id]))
    return branch_leaf_mapping


def select_softmax_costmodel(
    node_list: list[RefNode],
    node_weights: list[float],
    width: int,
    lambdac_param: float,
    lambdas_param: float,
    softmax_temperature: float,
    embed: Callable[[list[str]], Any],
) -> tuple[list[RefNode], list[int]]:
    """The reference's select: (nodes sorted by kept weight, children per node)."""
    import torch
    from pulp import PULP_CBC_CMD, LpMaximize, LpProblem, LpVariable, lpSum
    from scipy.cluster.hierarchy import fcluster, linkage

    branch_leaf_mapping = _branch_leaf_mapping(node_list)
    N = len(node_list)
    M = len(branch_leaf_mapping)
    x = [LpVariable(f"x_{i}", cat="Binary") for i in range(N)]
    y = [LpVariable(f"y_{j}", cat="Binary") for j in range(M)]
    lambdac = 1e-4 if lambdac_param == 0 else -lambdac_param
    leafnodemap = {node_list[i].id: i for i in range(N)}
    branchnodemap = {j: idx for idx, j in enumerate(branch_leaf_mapping)}
    problem = LpProblem("Tree_Selection_Problem", LpMaximize)
    Cost = [1 / (M + N) for i in range(M + N)]

    node_weight_pair_list = [
        (i, node, weight) for i, (node, weight) in enumerate(zip(node_list, node_weights, strict=True))
    ]
    sorted_node_weight_pair_list = sorted(node_weight_pair_list, key=lambda triplet: triplet[2], reverse=True)
    weights = torch.tensor([triplet[2] for triplet in sorted_node_weight_pair_list])
    T = softmax_temperature
    exp_weights = torch.exp(weights / T)
    sum_exp_weights = exp_weights.sum()
    outcome_score = []
    width_tmp = width
    for weight in exp_weights:
        if sum_exp_weights > 0:
            num = math.ceil(width_tmp * weight / sum_exp_weights)
            outcome_score.append(num)
            width_tmp -= num
            sum_exp_weights -= weight
        else:
            outcome_score.append(0)
    score_in_original_order = [0] * len(node_weights)
    for i, (orig_idx, _node, _weight) in enumerate(sorted_node_weight_pair_list):
        score_in_original_order[orig_idx] = outcome_score[i]
    O = [  # noqa: E741 - the reference's names; its sum per element (quadratic) is kept too
        score_in_original_order[i] / sum(score_in_original_order) for i in range(len(score_in_original_order))
    ]

    sentences = []
    for i in range(N):
        parent = node_list[i].parent
        prevlen = len(parent.get_text()) if parent is not None else 0
        sentences.append(node_list[i].get_text()[prevlen:])
    num_unique = len(set(sentences))

    lambdas = lambdas_param
    if lambdas > 0 and N > 1 and num_unique > 1:
        embeddings = np.array(embed(sentences))
        Z = linkage(embeddings, method="average", metric="cosine")
        clusters = fcluster(Z, 0.05, criterion="distance") - 1
        K = len(np.unique(clusters))
        coverage = [LpVariable(f"coverage_{i}", cat="Binary") for i in range(K)]
        for k in range(K):
            cluster_indices = [i for i, c in enumerate(clusters) if c == k]
            problem += lpSum(x[i] for i in cluster_indices) >= coverage[k], f"Coverage_Lower_{k}"
        lambdas /= K
        problem += (
            (
                lpSum(O[i] * x[i] for i in range(N))
                + lpSum(lambdac * Cost[j] * y[j] for j in range(M))
                + lpSum(lambdac * Cost[j + M] * x[j] for j in range(N))
                + lpSum(lambdas * coverage[k] for k in range(K))
            ),
            "Objective",
        )
    else:
        problem += (
            (
                lpSum(O[i] * x[i] for i in range(N))
                + lpSum(lambdac * Cost[j] * y[j] for j in range(M))
                + lpSum(lambdac * Cost[j + M] * x[j] for j in range(N))
            ),
            "Objective",
        )

    for j, leaf_nodes in branch_leaf_mapping.items():
        branch_node_idx = branchnodemap[j]
        leaf_nodes_mapped = [leafnodemap[i] for i in leaf_nodes]
        problem += y[branch_node_idx] <= lpSum(x[i] for i in leaf_nodes_mapped), f"Branch_{j}_activation"
        for i in leaf_nodes_mapped:
            problem += y[branch_node_idx] >= x[i], f"Branch_{j}_leaf_{i}_link"
    problem += lpSum(x[i] for i in range(N)) >= 1, "Keep_Node_Constraint"
    problem.solve(PULP_CBC_CMD(msg=0))

    kept_weights = []
    for idx, weight in enumerate(node_weights):
        kept_weights.append(weight / T if x[idx].value() == 1 else float("-inf"))
    pairs = sorted(zip(node_list, kept_weights, strict=True), key=lambda pair: pair[1])
    pairs.reverse()
    nodes = [pair[0] for pair in pairs]
    exp_kept = torch.exp(torch.tensor([pair[1] for pair in pairs]))
    sum_exp_weights = exp_kept.sum()
    select_num = []
    for weight in exp_kept:
        if sum_exp_weights > 0:
            num = math.ceil(width * weight / sum_exp_weights)
            select_num.append(num)
            width -= num
            sum_exp_weights -= weight
        else:
            select_num.append(0)
    return nodes, select_num


def reference_counts(nodes: list[RefNode], select_num: list[int]) -> dict[int, int]:
    """The reference's answer as etsq's `Selection.counts` (frontier node idx -> children)."""
    return {node.id: n for node, n in zip(nodes, select_num, strict=True)}
