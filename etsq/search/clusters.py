"""Semantic clusters of frontier steps: average-linkage agglomerative clustering, cosine distance.

ETS's coverage term counts how many of these clusters the kept set touches. The clusters are the
reference's: `linkage(method="average", metric="cosine")` cut with `fcluster(t=threshold,
criterion="distance")` (reference threshold 0.05). They are found without the whole dendrogram:

1. Components. An average-linkage merge at height <= t joins two clusters whose mean pairwise
   distance is <= t, so some pair across them is at distance <= t; and a merge's height depends
   only on pairs inside the two clusters. So every cluster of the cut lies inside one connected
   component of the graph "distance <= t", and each component, clustered alone, gives the same
   clusters as the whole dendrogram cut at t. At the reference threshold almost every component
   is one or two steps (bench/select_bench.py: at W = 1024, 100-160 of ~700 components are larger).
2. Close pairs. The pairs at distance <= t + `_margin(dim)` are read off a float32 Gram matrix
   (BLAS `ssyrk`: one triangle, half the flops of float64); the margin bounds float32's rounding
   of a dot product of unit vectors, so no pair at float64 distance <= t is missed. Components are
   taken over these pairs; a component joined by a pair just above t is still clustered exactly.
3. Exact cut per component. One step: its own cluster. Two: one cluster iff their float64 cosine
   distance is <= t. More: scipy's `linkage` + `fcluster` on the components' float64 distances.

Cosine distance is `1 - u.v` on row-normalised embeddings (scipy's `1 - u.v / (|u||v|)` up to
rounding, ~1e-16), clipped to [0, 2] so that (near-)identical steps never get a negative distance;
a zero row stays zero (distance 1 to every step). Cluster ids are numbered in order of first
appearance (the first step is in cluster 0): fcluster's own numbering follows the leaf order of the
whole dendrogram, which would need every one of the N^2 / 2 distances in float64 (at W = 1024 that
Gram matrix and the linkage were ~75% of ETS's select time).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from etsq.errors import ConfigError

if TYPE_CHECKING:  # methods.ets imports this module: a runtime import would be circular
    from etsq.search.methods.base import Embedder

_F32_EPS = float(np.finfo(np.float32).eps)


@lru_cache(maxsize=1)
def _blas_libs() -> tuple[Any, ...]:
    """threadpoolctl's handles on the BLAS libraries loaded (numpy's and scipy's are two)."""
    import scipy.linalg.blas  # noqa: F401 - loads scipy's OpenBLAS before the libraries are listed

    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional (it comes with sentence-transformers): run unlimited
        return ()
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextmanager
def _single_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread for a small product.

    An N x d Gram matrix (N <= ~1k) takes a few ms on one core; handing it to OpenBLAS's thread
    pool costs 20+ ms per call on a busy host (measured on a loaded 2-core machine: 0.15 ms
    single-threaded vs 23 ms with two threads at N = 64), and select runs beside other work.
    The libraries' own setters are called (a few microseconds): `ThreadpoolController.limit`
    inspects every loaded library on each call (~0.1-3 ms).
    """
    libs = _blas_libs()
    before = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before, strict=True):
            lib.set_num_threads(n)


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float64); a zero row stays zero."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings must be finite")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit: np.ndarray = emb / np.where(norms > 0.0, norms, 1.0)
    return unit


def _margin(dim: int) -> float:
    """A bound on |float32 u.v - u.v| for unit vectors of `dim` components.

    Rounding the unit vectors to float32 moves the product by <= 2 eps32; accumulating `dim`
    products in float32 by <= dim * eps32 * sum|u_k v_k| <= dim * eps32 (Cauchy-Schwarz). Doubled.
    """
    return 2.0 * (dim + 2) * _F32_EPS


def close_pairs(unit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j), i > j, of every pair whose float64 cosine distance may be <= threshold."""
    from scipy.linalg.blas import ssyrk  # scipy is imported on first use: the CLI never needs it

    u32 = np.asarray(unit, dtype=np.float32)
    with _single_blas_thread():
        # Lower triangle of u32 @ u32.T (Fortran order); the upper part stays 0 and is dropped below.
        gram = ssyrk(1.0, u32.T, trans=1, lower=1)
    # gram is Fortran-ordered: its transpose is C-ordered, whose flat positions are row * n + column;
    # flatnonzero of them is ~15x faster than a 2-D nonzero (0.27 against 4.1 ms at N = 1024).
    j, i = np.divmod(np.flatnonzero(1.0 - threshold - _margin(unit.shape[1]) <= gram.T), len(unit))
    below = i > j
    return i[below], j[below]


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label per row of the graph with edges (i, j): each component's smallest row.

    Label propagation with pointer jumping; the graphs here are a few hundred short edges, where
    this takes microseconds and scipy.sparse's connected_components ~0.3 ms of checks.
    """
    labels = np.arange(n)
    while True:
        low = np.minimum(labels[i], labels[j])
        new = labels.copy()
        np.minimum.at(new, i, low)
        np.minimum.at(new, j, low)
        new = new[new]  # jump: a row takes its label's label
        if np.array_equal(new, labels):
            return labels
        labels = new


def _split_pairs(unit: np.ndarray, pairs: np.ndarray, threshold: float, labels: np.ndarray) -> None:
    """Two-step components: the second step leaves its first's cluster if they are too far apart."""
    a, b = pairs[:, 0], pairs[:, 1]
    dist = np.clip(1.0 - np.einsum("ij,ij->i", unit[a], unit[b]), 0.0, 2.0)
    far = dist > threshold
    labels[b[far]] = b[far] + len(unit)  # fresh: component labels are < len(unit), larger ones >= 2x


@lru_cache(maxsize=64)
def _pairs_of(size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(size, k=1)
    return rows, cols


def _within_pairs(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, q), p < q, of every pair inside each consecutive block of `sizes` rows."""
    offsets = np.r_[0, np.cumsum(sizes)[:-1]]
    parts = [_pairs_of(int(size)) for size in sizes]
    p = np.concatenate([rows + off for (rows, _), off in zip(parts, offsets, strict=True)])
    q = np.concatenate([cols + off for (_, cols), off in zip(parts, offsets, strict=True)])
    return p, q


def _split_components(
    unit: np.ndarray, members: np.ndarray, sizes: np.ndarray, threshold: float
) -> np.ndarray:
    """Labels of the reference's average-linkage cut over components of 3+ steps.

    `members` lists the components' rows one component after another (`sizes` rows each). One
    linkage call covers them all: pairs in different components get a distance above the threshold
    (their true one is above it too), so no merge at height <= threshold crosses components and
    the cut is each component's own; one call instead of one per component (~0.5 ms each in scipy).
    """
    from scipy.cluster.hierarchy import linkage

    m = len(members)
    p, q = _within_pairs(sizes)
    condensed = np.full(m * (m - 1) // 2, threshold + 1.0)
    dist = 1.0 - np.einsum("ij,ij->i", unit[members[p]], unit[members[q]])
    condensed[m * p - p * (p + 1) // 2 + q - p - 1] = np.clip(dist, 0.0, 2.0)
    return _cut(linkage(condensed, method="average"), threshold)


def _cut(merges: np.ndarray, threshold: float) -> np.ndarray:
    """Flat cluster label per leaf: `fcluster(merges, threshold, criterion="distance")` up to numbering.

    A merge joins its two clusters when the highest merge in its subtree is <= threshold (fcluster's
    rule, which also holds across float inversions of the merge heights). Written out because
    fcluster's input checks cost more than the cut (~1 ms on a busy host, for a 100-row tree).
    """
    m = len(merges) + 1
    root = list(range(2 * m - 1))
    highest = [0.0] * (2 * m - 1)
    for k, (a, b, height, _) in enumerate(merges.tolist()):
        a, b = int(a), int(b)
        highest[m + k] = max(height, highest[a], highest[b])
        if highest[m + k] <= threshold:
            root[a] = root[b] = m + k
    for node in range(2 * m - 2, -1, -1):  # parents come after children: walk down from the top
        root[node] = root[root[node]]
    return np.asarray(root[:m])


def first_seen_ids(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    ids: np.ndarray = rank[inverse.reshape(-1)]
    return ids


def cluster_embeddings(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """0-based cluster id per row (numbered in order of first appearance); one row gives [0]."""
    n = len(embeddings)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    unit = unit_rows(embeddings)
    labels = _components(n, *close_pairs(unit, threshold)).astype(np.int64)
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    sizes = np.diff(np.r_[starts, n])
    pairs = np.stack([order[starts[sizes == 2]], order[starts[sizes == 2] + 1]], axis=1)
    _split_pairs(unit, pairs, threshold, labels)
    big = sizes > 2
    if big.any():
        members = np.concatenate(
            [order[start : start + size] for start, size in zip(starts[big], sizes[big], strict=True)]
        )
        labels[members] = 2 * len(unit) + _split_components(unit, members, sizes[big], threshold)
    return first_seen_ids(labels)


def cluster_texts(texts: Sequence[str], embedder: Embedder | None, threshold: float) -> np.ndarray:
    """Cluster ids of `texts`; identical texts never need the embedder."""
    if len(set(texts)) <= 1:
        return np.zeros(len(texts), dtype=np.int64)
    if embedder is None:
        raise ConfigError("semantic clustering needs a sentence embedder (ETS with lambda_s > 0)")
    embeddings = np.asarray(embedder.embed(list(texts)))
    if embeddings.shape[0] != len(texts):
        raise ConfigError(f"embedder returned {embeddings.shape[0]} rows for {len(texts)} texts")
    return cluster_embeddings(embeddings, threshold)
