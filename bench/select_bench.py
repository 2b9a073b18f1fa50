"""Benchmark of the select step: p50/p90 wall time per method and width on synthetic trees.

Trees are depth 6 with W frontier nodes, grown the way the search grows them: every depth
hands out W children with REBASE's allocation over random PRM scores, so the frontier's
ancestor sets (shared prefixes, single-child chains, bushy nodes) look like a real search's.
Steps carry random token counts (10-120) and random unit embeddings, with about a third of
the steps near-duplicates of a sibling (cosine distance < 0.01) so that clusters form. The
"ets-spread" row copies near-duplicates from anywhere in the same depth instead, so clusters
span unrelated branches: the hard case for the program.

ETS runs with the embeddings precomputed (`FakeEmbedder` looks them up): this measures the
program and the clustering. The real embedding cost is measured separately with the
sentence-transformers model on 256 short step texts. The ILP backends (highspy matrix API vs
pulp with HiGHS or CBC, reduced vs literal formulation) are compared on the same programs.

The "reference" rows time the reference's select as the spec describes it (`bench/spec_reference.py`:
pulp + CBC, scipy's clustering) beside etsq's, on the same frontiers, calls alternating.
The process keeps freed memory as `etsq worker` does (`etsq.procs.keep_freed_memory`);
--glibc-defaults leaves malloc as it is.

    python bench/select_bench.py [--widths 16 64 256 1024] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etsq.procs import keep_freed_memory
from etsq.search import ilp
from etsq.search.config import SearchConfig
from etsq.search.methods import METHODS, SelectContext
from etsq.search.methods.ets import frontier_clusters
from etsq.search.methods.rebase import frontier_scores, rebase_allocate
from etsq.search.tree import Tree

DEPTH = 6
DIM = 384


class FakeEmbedder:
    """Embedder returning precomputed vectors by text."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])


def _unit(rng: np.random.Generator, base: np.ndarray | None = None) -> np.ndarray:
    v = rng.normal(size=DIM) if base is None else base + rng.normal(scale=0.004, size=DIM)
    return v / np.linalg.norm(v)


def _children(
    tree: Tree, parent: int, n: int, rng: np.random.Generator, table: dict[str, np.ndarray], spread: bool
) -> None:
    """n scored children; about a third near-duplicate a sibling (or, spread, any earlier step)."""
    first: np.ndarray | None = None
    pool = list(table.values())
    for _ in range(n):
        source = pool[int(rng.integers(len(pool)))] if spread and pool else first
        vec = _unit(rng, source if source is not None and rng.random() < 0.35 else None)
        node = tree.add_child(parent, "", int(rng.integers(10, 121)), score=float(rng.random()))
        node.text = f"step {node.idx}"
        table[node.text] = vec
        first = vec if first is None else first


def synthetic_tree(width: int, seed: int, spread: bool = False) -> tuple[Tree, list[int], FakeEmbedder]:
    """A depth-6 tree whose last depth holds exactly `width` frontier nodes.

    spread=False: near-duplicates are siblings (same parent, the common case in a search);
    spread=True: they copy any earlier step of the tree, so clusters span unrelated branches
    (the hard case for the program: coverage couples distant subtrees).
    """
    rng = np.random.default_rng(seed)
    tree = Tree("prompt", 200)
    table: dict[str, np.ndarray] = {}
    _children(tree, 0, width, rng, table, spread)
    for depth in range(1, DEPTH):
        frontier = tree.frontier(depth)
        counts = rebase_allocate(frontier_scores(tree, frontier), width, 0.2)
        layer: dict[str, np.ndarray] = {}  # spread copies come from the same depth's steps
        for idx, n in zip(frontier, counts, strict=True):
            _children(tree, idx, n, rng, layer, spread)
        table.update(layer)
    return tree, tree.frontier(DEPTH), FakeEmbedder(table)


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up: imports, caches
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _stats(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(samples, 50)),
        "p90": float(np.percentile(samples, 90)),
        "n": len(samples),
    }


def bench_methods(widths: Sequence[int], repeats: int, trees: int) -> dict[str, dict[int, dict[str, float]]]:
    """p50/p90 per method and width; "ets-spread" is ETS on trees with spread duplicates."""
    rows = [*METHODS, "ets-spread"]
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in rows}
    for w in widths:
        cfg = SearchConfig(width=w)
        samples: dict[str, list[float]] = {name: [] for name in rows}
        for seed in range(trees):
            for spread in (False, True):
                tree, frontier, emb = synthetic_tree(w, seed, spread)
                for name, method in METHODS.items():
                    if spread and name != "ets":
                        continue
                    call = partial(
                        method.select, tree, frontier, len(frontier), cfg, SelectContext(embedder=emb)
                    )
                    samples[name + ("-spread" if spread else "")] += _timed(call, repeats)
        for name in rows:
            out[name][w] = _stats(samples[name])
    return out


def _reference_call(
    tree: Tree, frontier: list[int], emb: FakeEmbedder, cfg: SearchConfig
) -> Callable[[], tuple[list[int], list[bool]]]:
    from bench import spec_reference

    def call() -> tuple[list[int], list[bool]]:
        vectors = emb.embed([tree.nodes[i].text for i in frontier])
        return spec_reference.select(
            tree, frontier, len(frontier), vectors, temperature=cfg.softmax_temp,
            threshold=cfg.cluster_threshold, lambda_b=cfg.lambda_b, lambda_s=cfg.effective_lambda_s,
        )  # fmt: skip

    return call


def _objective_gap(w: int, seed: int, ours: list[int], reference_kept: list[bool]) -> float:
    """The program's objective at etsq's kept set minus at the reference's (0: both optimal)."""
    problem = _problem(w, seed)
    etsq_kept = [i in set(ours) for i in range(problem.n_frontier)]
    return ilp.objective_value(problem, etsq_kept) - ilp.objective_value(problem, reference_kept)


def bench_reference(widths: Sequence[int], repeats: int, trees: int) -> dict[int, dict[str, Any]]:
    """etsq's ETS select against the reference's (`bench/spec_reference.py`), on the same frontiers
    and embeddings, calls alternating: p50s, their ratio, the frontiers whose counts differ, and the
    largest objective gap between the two kept sets (a tie between optimal sets gaps 0)."""
    out: dict[int, dict[str, Any]] = {}
    for w in widths:
        cfg = SearchConfig(width=w)
        ours: list[float] = []
        theirs: list[float] = []
        differ, gaps = 0, []
        for seed in range(trees):
            tree, frontier, emb = synthetic_tree(w, seed)
            ctx = SelectContext(embedder=emb)
            etsq_call = partial(METHODS["ets"].select, tree, frontier, len(frontier), cfg, ctx)
            ref_call = _reference_call(tree, frontier, emb, cfg)
            selection = etsq_call()
            ref_counts, ref_kept = ref_call()
            differ += [selection.counts[i] for i in frontier] != ref_counts
            positions = {idx: p for p, idx in enumerate(frontier)}
            gaps.append(_objective_gap(w, seed, [positions[i] for i in selection.info["ilp_kept"]], ref_kept))
            for _ in range(max(2, repeats // (4 if w >= 1024 else 1))):
                ours += _timed(etsq_call, 1)
                theirs += _timed(ref_call, 1)
        etsq_p50, ref_p50 = _stats(ours)["p50"], _stats(theirs)["p50"]
        out[w] = {"etsq": _stats(ours), "reference": _stats(theirs), "speedup": ref_p50 / etsq_p50,
                  "frontiers": trees, "counts_differ": differ,
                  "objective_gap_max": max(gaps, key=abs)}  # fmt: skip
    return out


def _problem(width: int, seed: int, spread: bool = False) -> ilp.EtsProblem:
    tree, frontier, emb = synthetic_tree(width, seed, spread)
    cfg = SearchConfig(width=width)
    scores = frontier_scores(tree, frontier)
    counts = rebase_allocate(scores, len(frontier), cfg.softmax_temp)
    ids, _ = frontier_clusters(tree, frontier, cfg, SelectContext(embedder=emb))
    outcome = [n / sum(counts) for n in counts]
    return ilp.problem_from_tree(tree, frontier, outcome, cfg.cost, ids, cfg.lambda_b, cfg.effective_lambda_s)


VARIANTS = (
    ("reduced", "highs"),
    ("reduced", "pulp-highs"),
    ("full", "pulp-highs"),
    ("reduced", "pulp-cbc"),
    ("full", "pulp-cbc"),
)


def bench_backends(widths: Sequence[int], repeats: int) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for w in widths:
        problem = _problem(w, seed=0)
        for formulation, backend in VARIANTS:
            reps = max(2, repeats // (4 if "cbc" in backend or formulation == "full" else 1))
            run = partial(ilp.solve, problem, backend=backend, formulation=formulation)
            sol = run()
            stats: dict[str, Any] = _stats(_timed(run, reps))
            stats.update(objective=sol.objective, vars=sol.n_vars, constraints=sol.n_constraints)
            out.setdefault(f"{formulation}/{backend}", {})[w] = stats
    return out


def _step_texts(n: int) -> list[str]:
    """n short, distinct, step-like texts."""
    rng = np.random.default_rng(0)
    words = ("let", "the", "sum", "of", "x", "squared", "equals", "two", "so", "divide", "both", "by")
    return [f"## Step {i}: " + " ".join(rng.choice(words, size=int(rng.integers(8, 30)))) for i in range(n)]


def _once_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def bench_embedding(n_texts: int = 256) -> dict[str, float]:
    """Model load, first (uncached) embedding of n_texts steps, and the cached repeat."""
    from etsq.search.embed import SentenceEmbedder

    texts = _step_texts(n_texts)
    emb = SentenceEmbedder()
    load_ms = _once_ms(lambda: emb.embed(["warm-up text"]))
    embed_ms = _once_ms(lambda: emb.embed(texts))
    cached_ms = _once_ms(lambda: emb.embed(texts))
    return {"texts": n_texts, "load_ms": load_ms, "embed_ms": embed_ms, "cached_ms": cached_ms}


def _print_table(title: str, table: dict[str, dict[int, dict[str, Any]]], widths: Sequence[int]) -> None:
    print(f"\n{title} (ms, p50 / p90)")
    print(f"{'':24}" + "".join(f"{'W=' + str(w):>18}" for w in widths))
    for name, row in table.items():
        cells = "".join(
            f"{row[w]['p50']:>9.2f} /{row[w]['p90']:>7.2f}" if w in row else f"{'-':>18}" for w in widths
        )
        print(f"{name:24}{cells}")


def _print_reference(table: dict[int, dict[str, Any]]) -> None:
    print("\nETS select, etsq against the reference (ms, p50)")
    for w, row in table.items():
        print(
            f"W={w:<6} etsq {row['etsq']['p50']:9.2f}  reference {row['reference']['p50']:9.2f}  "
            f"speedup {row['speedup']:6.1f}x  counts differ on {row['counts_differ']}/{row['frontiers']} "
            f"(objective gap {row['objective_gap_max']:+.1e})"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per tree")
    parser.add_argument("--trees", type=int, default=3, help="synthetic trees per width")
    parser.add_argument(
        "--glibc-defaults", action="store_true", help="leave malloc as it is (a worker keeps freed memory)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference select")
    parser.add_argument("--no-backends", action="store_true", help="skip the ILP backend comparison")
    parser.add_argument("--no-embedding", action="store_true", help="skip the sentence-transformers timing")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    kept = not args.glibc_defaults and keep_freed_memory()  # what `etsq worker` does at start
    result: dict[str, Any] = {"load": list(os.getloadavg()), "worker_malloc": kept}
    result["methods"] = bench_methods(args.widths, args.repeats, args.trees)
    _print_table("select time per method", result["methods"], args.widths)
    if not args.no_reference:
        result["reference"] = bench_reference(args.widths, args.repeats, args.trees)
        _print_reference(result["reference"])
    if not args.no_backends:
        result["backends"] = bench_backends(args.widths, args.repeats)
        _print_table("ETS program: formulation/backend", result["backends"], args.widths)
    if not args.no_embedding:
        result["embedding"] = bench_embedding()
        print(
            "\nembedding (all-MiniLM-L6-v2, CPU):",
            json.dumps({k: round(v, 1) for k, v in result["embedding"].items()}),
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
