"""The search loop shared by every method: expand, score, select, one depth at a time.

Each depth ends in one `DepthCommit` handed to a callback, which persists it atomically; a
search can be resumed from any committed depth because children are sampled with seeds derived
from (run seed, problem key, node path), never from global RNG state.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from etsq.answers import extract_answer
from etsq.models.base import PRM, ExpandRequest, Policy, SamplingParams, ScoreRequest, StepSample
from etsq.search.config import SearchConfig
from etsq.search.methods import SelectContext, SelectFn, Selection
from etsq.search.methods.base import Embedder
from etsq.search.tree import Node, Tree


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any parts, identical across processes and Python versions."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class DepthCommit:
    """Everything one depth produced: the select step's decision and the children it made."""

    depth: int
    frontier: list[int]
    remaining: int
    selection: Selection
    kv_before: int
    kv_after: int
    select_ms: float
    new_nodes: list[int] = field(default_factory=list)
    expand_ms: float | None = None
    score_ms: float | None = None
    server: dict[str, Any] = field(default_factory=dict)  # policy server's KV figures (metrics.KVMonitor)
    prm_server: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return not self.new_nodes


CommitFn = Callable[[Tree, DepthCommit], None]


def terminal_reason(node: Node, sample: StepSample, cfg: SearchConfig, prompt_tokens: int) -> str | None:
    """Why a new node ends its trajectory, or None if the search may continue it.

    max_tokens bounds the generated solution, as in the reference; the prompt is not counted.
    """
    if extract_answer(sample.text) is not None:
        return "answer"
    if sample.finish_reason == "eos":
        return "eos"
    if node.cum_tokens - prompt_tokens >= cfg.max_tokens:
        return "max_tokens"
    if node.depth >= cfg.max_depth:
        return "max_depth"
    return None


def select_step(
    select_fn: SelectFn,
    tree: Tree,
    frontier: list[int],
    remaining: int,
    depth: int,
    cfg: SearchConfig,
    ctx: SelectContext,
) -> Selection:
    """One depth's selection: the root gets every child, a spent width or an empty frontier none,
    and any other depth is the method's to decide."""
    if remaining <= 0 or not frontier:
        return Selection(counts={i: 0 for i in frontier})
    if depth == 0:
        return Selection(counts={frontier[0]: remaining})
    return select_fn(tree, frontier, remaining, cfg, ctx)


def _server_stats(model: object) -> dict[str, Any]:
    # Optional in the protocols: a third-party model without it simply has no server figures.
    stats = getattr(model, "server_stats", None)
    return dict(stats() or {}) if callable(stats) else {}


class Searcher:
    """Runs one problem's search with a policy, a PRM and a select method."""

    def __init__(
        self,
        question: str,
        key: str,
        policy: Policy,
        prm: PRM,
        cfg: SearchConfig,
        select_fn: SelectFn,
        embedder: Embedder | None = None,
    ) -> None:
        self.question, self.key = question, key
        self.policy, self.prm, self.cfg = policy, prm, cfg
        self.select_fn, self.embedder = select_fn, embedder
        self.params = SamplingParams(cfg.temperature, cfg.max_step_tokens, cfg.step_delimiter)

    def new_tree(self) -> Tree:
        prompt = self.policy.format_prompt(self.question)
        return Tree(prompt, self.policy.count_tokens(prompt))

    def run(self, tree: Tree, commit: CommitFn, start_depth: int = 0) -> Tree:
        """Search from `start_depth` (0 for a new tree) until a depth commits as final."""
        # Server figures are per depth: drop what earlier requests left (an attempt that failed mid-depth).
        _server_stats(self.policy), _server_stats(self.prm)
        depth = start_depth
        while True:
            record = self.step(tree, depth)
            commit(tree, record)
            if record.final:
                return tree
            depth += 1

    def step(self, tree: Tree, depth: int) -> DepthCommit:
        """Select over the depth's frontier, then expand and score the kept nodes."""
        frontier = [0] if depth == 0 else tree.frontier(depth)
        remaining = self.cfg.width - len(tree.leaves())
        t0 = time.perf_counter()
        selection = self._select(tree, frontier, remaining, depth)
        select_ms = (time.perf_counter() - t0) * 1000
        self._mark(tree, selection)
        record = DepthCommit(
            depth=depth,
            frontier=frontier,
            remaining=remaining,
            selection=selection,
            kv_before=tree.kv_tokens(frontier),
            kv_after=tree.kv_tokens(selection.kept),
            select_ms=select_ms,
        )
        if selection.kept:
            self._expand(tree, selection, record)
        if depth > 0:  # the frontier's parents: their children have expanded, or never will
            tree.release_paths(depth - 1)
        record.server, record.prm_server = _server_stats(self.policy), _server_stats(self.prm)
        return record

    def _select(self, tree: Tree, frontier: list[int], remaining: int, depth: int) -> Selection:
        rng = np.random.default_rng(stable_seed(self.cfg.seed, self.key, "select", depth))
        ctx = SelectContext(embedder=self.embedder, rng=rng)
        return select_step(self.select_fn, tree, frontier, remaining, depth, self.cfg, ctx)

    @staticmethod
    def _mark(tree: Tree, selection: Selection) -> None:
        for idx, n in selection.counts.items():
            node = tree.nodes[idx]
            node.kept, node.n_children = n > 0, n
            node.cluster = selection.clusters.get(idx)

    def _expand(self, tree: Tree, selection: Selection, record: DepthCommit) -> None:
        parents = [(i, n) for i, n in selection.counts.items() if n > 0]
        requests = [
            ExpandRequest(tree.full_text(i), n, stable_seed(self.cfg.seed, self.key, tree.nodes[i].path))
            for i, n in parents
        ]
        t0 = time.perf_counter()
        samples = self.policy.expand(requests, self.params)
        t1 = time.perf_counter()
        new = [
            self._add(tree, parent, s)
            for (parent, _), group in zip(parents, samples, strict=True)
            for s in group
        ]
        self._score(tree, new)
        record.new_nodes = new
        record.expand_ms = (t1 - t0) * 1000
        record.score_ms = (time.perf_counter() - t1) * 1000

    def _add(self, tree: Tree, parent: int, sample: StepSample) -> int:
        # NUL cannot be stored in Postgres text; replacing it here keeps tree and database identical.
        text = sample.text.replace("\x00", "\ufffd")
        node = tree.add_child(parent, text, sample.tokens, finish_reason=sample.finish_reason)
        reason = terminal_reason(node, sample, self.cfg, tree.root.tokens)
        if reason is not None:
            node.terminal, node.terminal_reason = True, reason
            node.answer = extract_answer("".join(tree.steps(node.idx)))
        return node.idx

    def _score(self, tree: Tree, new: list[int]) -> None:
        requests = [ScoreRequest(self.question, tree.step_texts(i)) for i in new]  # the cached tuple
        for idx, score in zip(new, self.prm.score(requests), strict=True):
            tree.nodes[idx].score = float(score)
