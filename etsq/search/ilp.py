"""ETS's integer program: which frontier nodes to keep, trading reward against KV cost and coverage.

The program (spec, "Select: the methods", ETS) over the *alive tree* (frontier nodes and all
their ancestors, root included, M ancestors and N frontier nodes):

    maximise  sum_i O_i x_i - lambda_b (sum_j C_j y_j + sum_i C_i x_i) + (lambda_s / K) sum_k c_k
    s.t.      y_j >= x_i  and  y_j <= sum_{i below j} x_i      for every ancestor j
              c_k <= sum_{i in cluster k} x_i                   for every cluster k
              sum_i x_i >= 1,   x, y, c binary.

For binary x the constraints force `y_j = max_{i below j} x_i` (j alive iff a kept node lies below
it), so the objective is `objective_value` below: reward of the kept nodes, minus lambda_b times
the cost of the union of their root paths, plus lambda_s / K per covered cluster (c_k is pushed
to `min(1, sum x)` because lambda_s >= 0).

Reduced formulation (what is solved; `full_model` builds the literal one above)
---------------------------------------------------------------------------------
Steps 1-6 keep the set of feasible x and the objective value of every x unchanged; step 0
removes only variables that some optimal solution sets to 0. So the optimal value is the
literal program's, and the x found is one of its optimal solutions:

0. Dominated siblings. Let i and l be frontier siblings (same parent) in the same cluster
   with O_i <= O_l, C_i >= C_l and O_i - lambda_b C_i <= 0. Any solution keeping i can drop it
   (if l is kept: same ancestors, same clusters, change -(O_i - lambda_b C_i) >= 0) or swap it
   for l (same ancestors and clusters, change (O_l - O_i) - lambda_b (C_l - C_i) >= 0), staying
   feasible and no worse. Per (parent, cluster) group, l is the best member (highest O, then
   lowest C), never itself removed, so all such i are left out of the model at once. In the
   search this is common: REBASE gives O = 0 to many nodes, and near-identical siblings share
   a cluster. Without coverage, a group is simply (parent).
1. Child links instead of leaf links. For each ancestor j with alive children c (each c a
   frontier node or another ancestor, variable v_c): `y_j >= v_c`. By induction from the
   bottom, `y_j >= max_c v_c = max_{i below j} x_i`: exactly the literal lower bound, with
   one row per alive edge instead of one per (ancestor, frontier node below it) pair.
2. No upper links. lambda_b >= 0 and C >= 0, so every y has a non-positive objective
   coefficient: from any feasible point, lowering each y_j to `max_c v_c` (bottom-up) stays
   feasible and never lowers the objective. So some optimum has `y_j = max_i x_i`, as the
   literal program forces with `y_j <= sum x_i`, and those rows are dropped.
3. Constant chain. Since `sum x >= 1`, the root is always alive, and so is every node on the
   path from the root down to the first node with two or more alive children (everything lies
   below it). Their cost is a constant (objective offset); they get no variable.
4. Single-child chains. An ancestor with exactly one alive child c has `y_j = v_c` at the
   optimum (2.); it is merged into c's variable by adding C_j to c's cost.
5. Singleton clusters. A cluster {i} has `c_k = x_i`; lambda_s / K is added to x_i's
   coefficient instead of a variable and a row.
6. Only x is integer. With x binary, `max_c v_c` is binary, so y is binary at the optimum
   without asking; c_k's optimum `min(1, sum x)` is binary too. y and c are continuous in
   [0, 1], which leaves the branch-and-bound to the frontier variables.

On bench trees the reduced model is several times smaller than the literal one (bench/select_bench.py
prints both sizes). `tests/test_methods.py` checks the reduced optimum against brute-force
enumeration and against the literal formulation.

Solver
------
The reduced model is handed to HiGHS in-process through `highspy`'s matrix API (one `passModel`
of row-wise CSR arrays, no files, no pulp objects), its LP relaxation first (`solve_highs`: an
integral LP optimum is the MIP's): `bench/select_bench.py` compares it with pulp's
HiGHS and CBC and with the literal formulation on the same programs (building pulp's expression
objects costs more than the solve; CBC adds an MPS file and a subprocess per call). If HiGHS stops
without a proven optimum, the same model is solved by CBC through pulp (the reference's solver).
The `full` formulation and the pulp backends exist for those comparisons and for the tests that
check the reduced optimum against the literal one; workers use `reduced` + `highs`. HiGHS options:
see `_HIGHS_OPTIONS`.

Ties
----
Optimal solutions need not be unique (lambda_b = 0 makes every O_i = 0 node free to keep or
drop). The solver's answer is completed to a *maximal* optimal set: frontier nodes are visited
in REBASE order (score descending) and added whenever adding them does not lower the objective.
With lambda_b = lambda_s = 0 that keeps every node, so ETS's allocation is exactly REBASE's.
Trivial programs skip the solver: N == 1 (the one node is kept) and lambda_b == 0 (keeping
everything is optimal: O >= 0 and coverage can only grow).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from etsq.errors import ConfigError, PermanentError
from etsq.search.tree import Tree

# Gains this close to 0 are ties (float noise in sums of costs), not losses.
_GAIN_TOL = 1e-12
_TIME_LIMIT_S = 30.0
# An LP value this close to 0 or 1 counts as integral: HiGHS's own MIP feasibility tolerance.
_INTEGRAL_TOL = 1e-6
# Measured on the bench's programs (W = 16 ... 1024): the feasibility-jump heuristic costs a
# fixed ~5 ms per call, HiGHS's presolve finds little the reductions here have not already
# removed (and costs 1.5-2x), symmetry detection costs ~20% and finds none worth having.
# Together they cut the p50 HiGHS time 2-8x. Gaps 0: the true optimum (see "Ties").
# One thread: these programs are solved at the root node, and HiGHS's worker threads only add
# synchronisation; on a busy host each run paid 5-15 ms waiting for them (bench/select_bench.py:
# a 2-column program took 7-17 ms with the default, 1 ms with one thread).
_HIGHS_OPTIONS: dict[str, bool | int | float | str] = {
    "threads": 1,
    "output_flag": False,
    "mip_rel_gap": 0.0,
    "mip_abs_gap": 0.0,
    "time_limit": _TIME_LIMIT_S,
    "presolve": "off",
    "mip_heuristic_run_feasibility_jump": False,
    "mip_detect_symmetry": False,
}


@dataclass(frozen=True)
class EtsProblem:
    """The program's data. Positions 0..N-1 are frontier nodes, N.. their ancestors.

    `parent[p]` is p's parent position (-1 for the root, exactly one), `cost[p]` its C,
    `outcome[i]` O_i, `clusters[i]` frontier node i's cluster id (None: no coverage term).
    """

    parent: tuple[int, ...]
    cost: tuple[float, ...]
    outcome: tuple[float, ...]
    clusters: tuple[int, ...] | None
    lambda_b: float
    lambda_s: float
    node_ids: tuple[int, ...] = ()  # tree node idx per position (diagnostics only)

    def __post_init__(self) -> None:
        if self.lambda_b < 0 or self.lambda_s < 0:
            raise ConfigError(f"lambda_b and lambda_s must be >= 0, got {self.lambda_b}, {self.lambda_s}")
        if len(self.parent) != len(self.cost) or len(self.outcome) > len(self.parent):
            raise ValueError("parent, cost and outcome lengths disagree")
        if self.clusters is not None and len(self.clusters) != len(self.outcome):
            raise ValueError("one cluster id per frontier node is needed")
        if min(self.cost, default=0.0) < 0 or min(self.outcome, default=0.0) < 0:
            raise ValueError("costs and outcomes must be non-negative")

    @property
    def n_frontier(self) -> int:
        return len(self.outcome)

    @cached_property  # read for every candidate of the tie completion: O(N) each time otherwise
    def n_clusters(self) -> int:
        return 0 if self.clusters is None else len(set(self.clusters))

    @cached_property
    def coverage_weight(self) -> float:
        """lambda_s / K, the value of one covered cluster (0 without a coverage term)."""
        return self.lambda_s / self.n_clusters if self.n_clusters else 0.0


@dataclass(frozen=True)
class IlpSolution:
    """Kept frontier positions, the literal program's objective for them, and solve figures."""

    selected: tuple[bool, ...]
    objective: float
    solver: str
    n_vars: int
    n_constraints: int
    solve_ms: float


@dataclass
class MatrixModel:
    """A maximisation MIP in row-wise CSR form; all columns lie in [0, 1]."""

    obj: list[float]
    integer: list[bool]
    offset: float = 0.0
    row_start: list[int] = field(default_factory=lambda: [0])
    row_index: list[int] = field(default_factory=list)
    row_value: list[float] = field(default_factory=list)
    row_lower: list[float] = field(default_factory=list)
    row_upper: list[float] = field(default_factory=list)
    x_col: dict[int, int] = field(default_factory=dict)  # frontier position -> its column

    def add_col(self, obj: float, integer: bool) -> int:
        self.obj.append(obj)
        self.integer.append(integer)
        return len(self.obj) - 1

    def add_links(self, pairs: Sequence[tuple[int, int]]) -> None:
        """One row `v_a - v_b >= 0` per (a, b), appended in one go (add_row per edge costs ~1 us each)."""
        first = len(self.row_index)
        self.row_index.extend(col for pair in pairs for col in pair)
        self.row_value.extend([1.0, -1.0] * len(pairs))
        self.row_start.extend(range(first + 2, first + 2 * len(pairs) + 1, 2))
        self.row_lower.extend([0.0] * len(pairs))
        self.row_upper.extend([math.inf] * len(pairs))

    def add_row(self, cols: Sequence[int], vals: Sequence[float], lower: float, upper: float) -> None:
        self.row_index.extend(cols)
        self.row_value.extend(vals)
        self.row_start.append(len(self.row_index))
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    @property
    def n_cols(self) -> int:
        return len(self.obj)

    @property
    def n_rows(self) -> int:
        return len(self.row_lower)


# --------------------------------------------------------------------------- problem data


def alive_tree(tree: Tree, frontier: Sequence[int]) -> tuple[list[int], list[int]]:
    """Node idx per position (frontier first, then ancestors as met) and parent positions."""
    pos = {idx: p for p, idx in enumerate(frontier)}
    nodes = list(frontier)
    parents: list[int] = []
    k = 0
    while k < len(nodes):  # `nodes` grows while walked: each ancestor is appended once
        par = tree.nodes[nodes[k]].parent
        if par is not None and par not in pos:
            pos[par] = len(nodes)
            nodes.append(par)
        parents.append(-1 if par is None else pos[par])
        k += 1
    return nodes, parents


def node_costs(tree: Tree, nodes: Sequence[int], mode: str) -> list[float]:
    """C per alive node, summing to 1 over the M + N alive nodes in both modes.

    uniform: 1 / (M + N) (the reference). tokens: the node's tokens over the alive tree's total
    tokens (its KV share), so lambda_b keeps its meaning: the penalty for keeping everything.
    """
    if mode == "uniform":
        return [1.0 / len(nodes)] * len(nodes)
    if mode != "tokens":
        raise ConfigError(f"cost must be 'uniform' or 'tokens', got {mode!r}")
    tokens = [max(tree.nodes[i].tokens, 0) for i in nodes]
    total = sum(tokens)
    if total <= 0:
        return [1.0 / len(nodes)] * len(nodes)
    return [t / total for t in tokens]


def problem_from_tree(
    tree: Tree,
    frontier: Sequence[int],
    outcome: Sequence[float],
    cost_mode: str,
    clusters: Sequence[int] | None,
    lambda_b: float,
    lambda_s: float,
) -> EtsProblem:
    """The program for one select: alive tree of `frontier`, costs, O_i and clusters."""
    nodes, parents = alive_tree(tree, frontier)
    return EtsProblem(
        parent=tuple(parents),
        cost=tuple(node_costs(tree, nodes, cost_mode)),
        outcome=tuple(float(o) for o in outcome),
        clusters=None if clusters is None else tuple(int(c) for c in clusters),
        lambda_b=float(lambda_b),
        lambda_s=float(lambda_s),
        node_ids=tuple(nodes),
    )


# --------------------------------------------------------------------------- objective


def _mark_alive(problem: EtsProblem, pos: int, alive: set[int]) -> float:
    """Add pos's root path to `alive`; return the cost of the nodes newly added."""
    added = 0.0
    while pos >= 0 and pos not in alive:
        alive.add(pos)
        added += problem.cost[pos]
        pos = problem.parent[pos]
    return added


def objective_value(problem: EtsProblem, selected: Sequence[bool]) -> float:
    """The literal program's objective at x = selected (y, c at their forced values)."""
    alive: set[int] = set()
    cost = sum(_mark_alive(problem, i, alive) for i, s in enumerate(selected) if s)
    reward = sum(o for o, s in zip(problem.outcome, selected, strict=True) if s)
    covered = 0
    if problem.clusters is not None:
        covered = len({k for k, s in zip(problem.clusters, selected, strict=True) if s})
    return reward - problem.lambda_b * cost + problem.coverage_weight * covered


# --------------------------------------------------------------------------- formulations


def dominated_siblings(problem: EtsProblem) -> set[int]:
    """Frontier positions some optimal solution leaves out, by sibling dominance (step 0)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(problem.n_frontier):
        cluster = 0 if problem.clusters is None else problem.clusters[i]
        groups.setdefault((problem.parent[i], cluster), []).append(i)
    fixed: set[int] = set()
    O, C, lb = problem.outcome, problem.cost, problem.lambda_b  # noqa: E741 - the paper's O_i and C_i
    for members in groups.values():
        if len(members) < 2:
            continue
        lead = max(members, key=lambda i: (O[i], -C[i], -i))
        for i in members:
            if i != lead and O[i] <= O[lead] and C[i] >= C[lead] and O[i] - lb * C[i] <= 0:
                fixed.add(i)
    return fixed


def _active(problem: EtsProblem, fixed: set[int]) -> list[bool]:
    """Positions with a not-fixed frontier node at or below them."""
    active = [False] * len(problem.parent)
    for i in range(problem.n_frontier):
        p = i if i not in fixed else -1
        while p >= 0 and not active[p]:
            active[p] = True
            p = problem.parent[p]
    return active


def _children(problem: EtsProblem, active: list[bool]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in problem.parent]
    for p, par in enumerate(problem.parent):
        if par >= 0 and active[p]:
            kids[par].append(p)
    return kids


def _constant_chain(problem: EtsProblem, kids: list[list[int]]) -> list[int]:
    """Root and the single-child nodes below it: alive in every feasible solution."""
    roots = [p for p, par in enumerate(problem.parent) if par < 0]
    if len(roots) != 1:
        raise ValueError(f"the alive tree needs exactly one root, got {len(roots)}")
    chain = [roots[0]]
    while len(kids[chain[-1]]) == 1:
        chain.append(kids[chain[-1]][0])
    return chain


def _representatives(kids: list[list[int]], constant: set[int]) -> list[int]:
    """Per position, the position whose variable it shares (itself unless a 1-child chain)."""
    rep = list(range(len(kids)))
    done = [False] * len(rep)
    for start in range(len(rep)):
        path = []
        p = start
        while not done[p] and p not in constant and len(kids[p]) == 1:
            path.append(p)
            p = kids[p][0]
        for q in path:  # every node of the chain maps to the chain's bottom
            rep[q], done[q] = rep[p], True
        done[start] = True
    return rep


def _add_coverage(
    problem: EtsProblem, model: MatrixModel, x_col: dict[int, int], merge_singletons: bool
) -> None:
    """c_k <= sum of x in k; singleton clusters fold into their x's coefficient."""
    if problem.clusters is None or problem.lambda_s == 0:
        return
    members: dict[int, list[int]] = {}
    for i, col in x_col.items():
        members.setdefault(problem.clusters[i], []).append(col)
    weight = problem.coverage_weight
    for k in sorted(members):
        cols = members[k]
        if merge_singletons and len(cols) == 1:
            model.obj[cols[0]] += weight
            continue
        c_col = model.add_col(weight, not merge_singletons)
        model.add_row([c_col, *cols], [1.0, *([-1.0] * len(cols))], -math.inf, 0.0)


def _add_keep_one(model: MatrixModel, x_col: dict[int, int]) -> None:
    """sum_i x_i >= 1."""
    cols = sorted(x_col.values())
    model.add_row(cols, [1.0] * len(cols), 1.0, math.inf)


def _add_costs(
    problem: EtsProblem, model: MatrixModel, rep: list[int], col_of: dict[int, int], constant: set[int]
) -> None:
    """lambda_b * C into the objective: constants to the offset, merged chains to their column."""
    for p, c in enumerate(problem.cost):
        if p in constant:
            model.offset -= problem.lambda_b * c
        elif rep[p] in col_of:
            model.obj[col_of[rep[p]]] -= problem.lambda_b * c


def _add_child_links(
    model: MatrixModel, kids: list[list[int]], rep: list[int], col_of: dict[int, int], n: int
) -> None:
    """y_j >= v_c for each alive child c of each ancestor variable j."""
    model.add_links([(col, col_of[rep[child]]) for p, col in col_of.items() if p >= n for child in kids[p]])


def reduced_model(problem: EtsProblem) -> MatrixModel:
    """The reduced formulation (module docstring, steps 0-6); `x_col` maps frontier positions."""
    fixed = dominated_siblings(problem)
    active = _active(problem, fixed)
    kids = _children(problem, active)
    constant = set(_constant_chain(problem, kids))
    rep = _representatives(kids, constant)
    n = problem.n_frontier
    model = MatrixModel(obj=[], integer=[])
    col_of: dict[int, int] = {}
    for p in range(len(problem.parent)):
        if active[p] and (p < n or (p not in constant and rep[p] == p)):
            col_of[p] = model.add_col(problem.outcome[p] if p < n else 0.0, p < n)
    model.x_col = {p: col for p, col in col_of.items() if p < n}
    _add_costs(problem, model, rep, col_of, constant)
    _add_child_links(model, kids, rep, col_of, n)
    _add_coverage(problem, model, model.x_col, merge_singletons=True)
    _add_keep_one(model, model.x_col)
    return model


def full_model(problem: EtsProblem) -> MatrixModel:
    """The literal program of the spec (and the reference): every leaf linked to every ancestor."""
    model = MatrixModel(obj=[], integer=[])
    n = problem.n_frontier
    for i in range(n):
        model.x_col[i] = model.add_col(problem.outcome[i] - problem.lambda_b * problem.cost[i], True)
    below: dict[int, list[int]] = {}
    for i in range(n):
        p = problem.parent[i]
        while p >= 0:
            below.setdefault(p, []).append(i)
            p = problem.parent[p]
    for j in sorted(below):
        col = model.add_col(-problem.lambda_b * problem.cost[j], True)
        for i in below[j]:
            model.add_row([col, i], [1.0, -1.0], 0.0, math.inf)
        model.add_row([col, *below[j]], [1.0, *([-1.0] * len(below[j]))], -math.inf, 0.0)
    _add_coverage(problem, model, model.x_col, merge_singletons=False)
    _add_keep_one(model, model.x_col)
    return model


# --------------------------------------------------------------------------- backends


def _pass_model(h: Any, model: MatrixModel) -> None:
    """Hand `model` to HiGHS as arrays (one call; building a HighsLp field by field cost ~1 ms)."""
    import highspy

    h.passModel(
        model.n_cols,
        model.n_rows,
        len(model.row_index),
        int(highspy.MatrixFormat.kRowwise),
        int(highspy.ObjSense.kMaximize),
        model.offset,
        np.asarray(model.obj, dtype=np.float64),
        np.zeros(model.n_cols),
        np.ones(model.n_cols),
        np.asarray(model.row_lower, dtype=np.float64),
        np.asarray(model.row_upper, dtype=np.float64),
        np.asarray(model.row_start[:-1], dtype=np.int32),
        np.asarray(model.row_index, dtype=np.int32),
        np.asarray(model.row_value, dtype=np.float64),
        np.asarray(model.integer, dtype=np.int32),  # HighsVarType: 0 continuous, 1 integer
    )


def _run_highs(h: Any) -> None:
    """Run the model `h` holds."""
    import highspy

    if h.run() == highspy.HighsStatus.kError:
        # HiGHS's thread pool is global and refuses a run asking for another thread count than
        # the pool was made with (e.g. after pulp's HiGHS ran in this process): remake it once.
        highspy.Highs.resetGlobalScheduler(True)
        h.run()


def _integral(values: Sequence[float], integer: Sequence[bool]) -> bool:
    return all(abs(v - round(v)) <= _INTEGRAL_TOL for v, flag in zip(values, integer, strict=True) if flag)


def solve_highs(model: MatrixModel) -> list[float]:
    """Column values from HiGHS in-process; PermanentError unless it proves an optimum.

    The LP relaxation is solved first: when its optimum is integral on the integer columns it is
    an optimum of the MIP too (the relaxation's value bounds the MIP's, and the point is feasible
    for both), which is the common case on search trees and costs about half of the MIP's setup
    (3.4 against 6.5 ms at W = 1024, bench/select_bench.py's trees). Otherwise the MIP runs."""
    import highspy

    h = highspy.Highs()
    for name, value in _HIGHS_OPTIONS.items():
        h.setOptionValue(name, value)
    _pass_model(h, model)
    for relaxation in (True, False):
        h.setOptionValue("solve_relaxation", relaxation)
        _run_highs(h)
        status = h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            raise PermanentError(f"HiGHS stopped with {h.modelStatusToString(status)}")
        values = list(h.getSolution().col_value)
        if not relaxation or _integral(values, model.integer):
            break
    return values


def _pulp_problem(model: MatrixModel) -> tuple[Any, list[Any]]:
    import pulp

    prob = pulp.LpProblem("ets_select", pulp.LpMaximize)
    cols = [
        pulp.LpVariable(f"v{j}", 0, 1, pulp.LpBinary if flag else pulp.LpContinuous)
        for j, flag in enumerate(model.integer)
    ]
    prob += pulp.LpAffineExpression(zip(cols, model.obj, strict=True), constant=model.offset)
    for r in range(model.n_rows):
        a, b = model.row_start[r], model.row_start[r + 1]
        expr = pulp.LpAffineExpression(
            zip((cols[j] for j in model.row_index[a:b]), model.row_value[a:b], strict=True)
        )
        if model.row_lower[r] > -math.inf:
            prob += pulp.LpConstraint(expr, pulp.LpConstraintGE, f"r{r}l", model.row_lower[r])
        if model.row_upper[r] < math.inf:
            prob += pulp.LpConstraint(expr, pulp.LpConstraintLE, f"r{r}u", model.row_upper[r])
    return prob, cols


def solve_pulp(model: MatrixModel, solver: str = "cbc") -> list[float]:
    """Column values through pulp: solver "cbc" (PULP_CBC_CMD, a subprocess) or "highs" (API)."""
    import pulp

    prob, cols = _pulp_problem(model)
    if solver == "cbc":
        backend = pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, gapAbs=0.0, timeLimit=_TIME_LIMIT_S)
    else:
        backend = pulp.HiGHS(msg=False, gapRel=0.0, gapAbs=0.0, timeLimit=_TIME_LIMIT_S)
    status = prob.solve(backend)
    if pulp.LpStatus[status] != "Optimal":
        raise PermanentError(f"pulp/{solver} stopped with {pulp.LpStatus[status]}")
    return [float(v.value() or 0.0) for v in cols]


BACKENDS = ("highs", "pulp-highs", "pulp-cbc")
FORMULATIONS = ("reduced", "full")


def run_backend(model: MatrixModel, backend: str) -> list[float]:
    """Column values of an optimum of `model` from one of BACKENDS."""
    if backend == "highs":
        return solve_highs(model)
    if backend in ("pulp-highs", "pulp-cbc"):
        return solve_pulp(model, backend.removeprefix("pulp-"))
    raise ConfigError(f"unknown ILP backend {backend!r}; choose from {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- solve


def _gain(problem: EtsProblem, i: int, alive: set[int], covered: set[int]) -> float:
    """Objective change of adding frontier node i to the kept set."""
    new_cost = problem.cost[i]
    p = problem.parent[i]
    while p >= 0 and p not in alive:
        new_cost += problem.cost[p]
        p = problem.parent[p]
    gain = problem.outcome[i] - problem.lambda_b * new_cost
    if problem.clusters is not None and problem.clusters[i] not in covered:
        gain += problem.coverage_weight
    return gain


def complete_ties(problem: EtsProblem, selected: Sequence[bool], order: Sequence[int]) -> list[bool]:
    """Add, in `order`, every frontier node whose addition does not lower the objective."""
    sel = list(selected)
    alive: set[int] = set()
    for i, s in enumerate(sel):
        if s:
            _mark_alive(problem, i, alive)
    covered = {problem.clusters[i] for i, s in enumerate(sel) if s} if problem.clusters is not None else set()
    changed = True
    while changed:  # an addition makes ancestors alive, which can turn a later loss into a tie
        changed = False
        for i in order:
            if not sel[i] and _gain(problem, i, alive, covered) >= -_GAIN_TOL:
                sel[i] = changed = True
                _mark_alive(problem, i, alive)
                if problem.clusters is not None:
                    covered.add(problem.clusters[i])
    return sel


def _trivial(problem: EtsProblem) -> list[bool] | None:
    """The optimum without a solver: one node, or lambda_b == 0 (keep all); else None."""
    if problem.n_frontier == 1 or problem.lambda_b == 0:
        return [True] * problem.n_frontier
    return None


def _solve_model(problem: EtsProblem, formulation: str, backend: str) -> tuple[list[bool], str, MatrixModel]:
    model = reduced_model(problem) if formulation == "reduced" else full_model(problem)
    try:
        values = run_backend(model, backend)
        used = backend
    except (PermanentError, RuntimeError, OSError):
        # HiGHS stopped without a proven optimum (or its library failed): the reference's solver
        # decides instead.  Anything else is a bug in the fast path and is not hidden by the fallback.
        if backend == "pulp-cbc":
            raise
        values, used = solve_pulp(model, "cbc"), f"pulp-cbc (fallback from {backend})"
    selected = [False] * problem.n_frontier
    for i, col in model.x_col.items():
        selected[i] = values[col] > 0.5
    return selected, used, model


def _solved(problem: EtsProblem, backend: str, formulation: str) -> tuple[list[bool], str, int, int]:
    """Selected positions, solver used, model columns and rows (0, 0 when trivial)."""
    trivial = _trivial(problem)
    if trivial is not None:
        return trivial, "trivial", 0, 0
    selected, used, model = _solve_model(problem, formulation, backend)
    return selected, used, model.n_cols, model.n_rows


def solve(
    problem: EtsProblem,
    order: Sequence[int] | None = None,
    backend: str = "highs",
    formulation: str = "reduced",
) -> IlpSolution:
    """Solve the program; ties are completed in `order` (default: position order)."""
    t0 = time.perf_counter()
    if problem.n_frontier == 0:
        raise ValueError("the ETS program needs at least one frontier node")
    if backend not in BACKENDS or formulation not in FORMULATIONS:
        raise ConfigError(f"unknown ILP backend/formulation {backend!r}/{formulation!r}")
    selected, used, n_vars, n_rows = _solved(problem, backend, formulation)
    selected = complete_ties(problem, selected, range(problem.n_frontier) if order is None else order)
    return IlpSolution(
        selected=tuple(selected),
        objective=objective_value(problem, selected),
        solver=used,
        n_vars=n_vars,
        n_constraints=n_rows,
        solve_ms=(time.perf_counter() - t0) * 1000,
    )
