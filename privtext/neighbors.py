"""The exact K-nearest-neighbour table of a vocabulary, built fast on every core.

The table is defined exactly, so that any computation can be checked against it:

- the distance between words i and j is `pair_distances`: the float64 square root of the
  float64 sum, taken in dimension order, of the squared float64 differences of their float32
  vectors (the same value for (i, j) and (j, i));
- row i lists the K words with the smallest such distance, ordered by (distance, id), so ties
  are broken by the smaller id and word i itself (distance 0) comes first.

A brute-force float64 computation of every pair gives this table; so does `exact_neighbor_table`,
in three steps that never change what is selected, only how fast:

1. Upper bounds. An approximate search (FAISS: a flat index for small vocabularies, an inverted
   file for large ones) finds K distinct words per row; the largest of their exact distances,
   τ_i, bounds the true K-th distance from above, since any K distinct words include none nearer
   than the K-th nearest.
2. Candidates. Every pair is scanned once (distance is symmetric) with blocked float32 matrix
   products on augmented vectors, D̃ = [x, ‖x‖², 1] · [−2y, 1, ‖y‖²]. A pair is a candidate for
   row i when D̃ ≤ thr_i = τ_i² + margin, where the margin is a proven bound on the float32 error
   (`float32_margin`): no pair whose exact distance is within τ_i can be lost to rounding.
   Rows are processed in increasing order of threshold, so for a block pair (I, J) with I before
   J every threshold of I is at most every threshold of J: one comparison against J's thresholds
   finds the candidates of both sides, and the few survivors are then checked against I's.
3. Re-rank. The candidates' distances are recomputed exactly (`pair_distances`) and each row
   keeps its K smallest by (distance, id).

Both cores work on block pairs in parallel threads (NumPy releases the GIL in matrix products and
comparisons); the BLAS library is held to one thread meanwhile so that the two do not fight.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Block edge of the float32 scan: a 2048 × 2048 distance block (16 MiB) keeps the matrix product
# near its peak while the comparison pass still streams from cache (measured on this machine).
BLOCK = 2048
# Step 1: k-means groups of about this many words, each compared with its nearest groups
# totalling at least _PROBE_COLUMNS words (tighter bounds cost more here, save more in step 2).
_GROUP_SIZE = 256
_PROBE_COLUMNS = 4096
_U32 = 2.0**-24  # unit roundoff of float32
_PAIR_CHUNK = 2048  # pairs per exact-distance batch (an 800 KiB float64 difference matrix)


def pair_distances(vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact float64 distances ‖v[rows] − v[cols]‖, the table's definition of distance.

    The float32 vectors are widened to float64 (exactly), subtracted, squared and summed along
    the contiguous last axis: NumPy sums such a row the same way whatever the batch, so the
    value equals `np.linalg.norm(v64[i] - v64[j], axis=-1)` for any batch shape and is the same
    for (i, j) and (j, i).
    """
    rows = np.asarray(rows, dtype=np.intp).ravel()
    cols = np.asarray(cols, dtype=np.intp).ravel()
    m, dim = rows.shape[0], vectors.shape[1]
    out = np.empty(m, dtype=np.float64)
    # Small reused buffers: the work stays in the core's cache instead of streaming (and
    # page-faulting) fresh arrays of millions of rows through memory.
    size = min(_PAIR_CHUNK, m)
    a = np.empty((size, dim), dtype=np.float64)
    b = np.empty((size, dim), dtype=vectors.dtype)
    for start in range(0, m, size):
        stop = min(start + size, m)
        ca, cb = a[: stop - start], b[: stop - start]
        np.copyto(ca, np.take(vectors, rows[start:stop], axis=0))
        np.take(vectors, cols[start:stop], axis=0, out=cb)
        np.subtract(ca, cb, out=ca)
        np.multiply(ca, ca, out=ca)
        np.add.reduce(ca, axis=-1, out=out[start:stop])
    np.sqrt(out, out=out)
    return out


def float32_margin(dim: int) -> float:
    """c such that |D̃ − ‖x − y‖²| ≤ c · (‖x‖² + ‖y‖²) for the float32 augmented product.

    With a = [x, q_x, 1], b = [−2y, 1, q_y], q = fl32(‖·‖²) (error ≤ u‖·‖² each), the exact
    product is within u(‖x‖² + ‖y‖²) of ‖x − y‖². Any float32 dot product of length L = dim + 2,
    in any summation order, with or without fused multiply-adds, errs by at most
    γ_L Σ|a_k b_k| with γ_L = L u / (1 − L u), and Σ|a_k b_k| = 2|x|·|y| + q_x + q_y ≤
    2(1 + u)(‖x‖² + ‖y‖²). So c = 2(1 + u)γ_L + (1 + 2⁻³⁰)u suffices; we use 4(L + 2)u, which
    is larger for every L (it covers the denominator of γ_L while L u < 1/4).
    """
    length = dim + 2
    if length * _U32 >= 0.25:
        raise ValueError("vectors too long for the float32 error bound")
    return 4.0 * (length + 2) * _U32


@contextlib.contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Hold NumPy's OpenBLAS to `count` threads inside the block, restoring it after.

    Threads of our own do the parallel work, and a multi-threaded BLAS call inside each would
    oversubscribe the cores. Found through the loaded library's exported setter (Linux maps);
    where none is found the block runs unchanged.
    """
    setters = _openblas_setters()
    previous = [get() for _set, get in setters]
    for set_threads, _get in setters:
        set_threads(count)
    try:
        yield
    finally:
        for (set_threads, _get), value in zip(setters, previous):
            set_threads(value)


def _openblas_setters() -> list[tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """(set, get) thread-count functions of every OpenBLAS that NumPy loaded."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    found = []
    for path in sorted(paths):
        if not path.startswith(numpy_dir) or "numpy" not in path:
            continue  # only NumPy's copy: FAISS's own BLAS follows its OpenMP setting
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            set_fn = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            get_fn = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if set_fn is not None and get_fn is not None:
                set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
                get_fn.argtypes, get_fn.restype = [], ctypes.c_int
                found.append((set_fn, get_fn))
                break
    return found


def default_threads() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TableStats:
    """How much work the candidate scan left for the exact re-rank (for the build record)."""

    candidates: int
    candidates_per_row: float


def exact_neighbor_table(
    vectors: np.ndarray, k: int, threads: int | None = None, progress: bool | None = None
) -> tuple[np.ndarray, np.ndarray, TableStats]:
    """(ids int32 (n, k), distances float64 (n, k), stats): the exact table defined above."""
    v32 = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = v32.shape
    k = min(k, n)
    threads = threads or default_threads()
    norms = np.einsum("ij,ij->i", v32, v32, dtype=np.float64)
    # Augmented rows: left_i · right_j = ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j = ‖x_i − x_j‖².
    q = norms.astype(np.float32)
    left = np.empty((n, dim + 2), dtype=np.float32)
    left[:, :dim], left[:, dim], left[:, dim + 1] = v32, q, 1.0
    right = np.empty((n, dim + 2), dtype=np.float32)
    right[:, :dim], right[:, dim], right[:, dim + 1] = -2.0 * v32, 1.0, q
    margin = float32_margin(dim) * (norms + norms.max()) + 1e-30

    with blas_threads(1):
        tau_sq = _upper_bounds(left, right, margin, k, threads)
        # τ² is inflated by 1e-10 to cover the float64 rounding of the exact distances
        # (relative error ~1e-15), then the float32 margin is added once more for the scan.
        thr64 = tau_sq * (1.0 + 1e-10) + margin
        thr = thr64.astype(np.float32)
        low = thr.astype(np.float64) < thr64
        thr[low] = np.nextafter(thr[low], np.float32(np.inf))

        order = np.argsort(thr, kind="stable")  # position p holds word order[p]
        scan = _CandidateScan(left[order], right[order], thr[order], order, v32, k)
        del left, right
        scan.run(threads, progress)
    ids, dist = scan.finish()
    if not np.array_equal(ids[:, 0], np.arange(n)):
        from privtext.errors import IndexCacheError

        raise IndexCacheError("neighbour table does not start with each word itself; vectors are degenerate")
    total = scan.total_candidates
    return ids, dist, TableStats(candidates=total, candidates_per_row=total / max(n, 1))


def _upper_bounds(left: np.ndarray, right: np.ndarray, margin: np.ndarray, k: int,
                  threads: int) -> np.ndarray:
    """τ_i² ≥ the k-th smallest exact squared distance from word i (itself included).

    Words are grouped by a coarse k-means; each group's words are compared (float32 product)
    with the nearest groups holding at least `_PROBE_COLUMNS` words, and the k-th smallest D̃
    plus the float32 margin bounds the k-th exact distance from above (k words are at most that
    far). The grouping only decides how tight the bound is, never whether it holds.
    """
    n = left.shape[0]
    dim = left.shape[1] - 2
    groups = max(1, n // _GROUP_SIZE)
    if groups == 1 or n <= _PROBE_COLUMNS:
        labels = np.zeros(n, dtype=np.int64)
        centroids = np.zeros((1, dim))
        groups = 1
    else:
        labels, centroids = _kmeans(np.ascontiguousarray(left[:, :dim]), groups, threads)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=groups)
    starts = np.concatenate([[0], np.cumsum(counts)])
    sq = np.einsum("ij,ij->i", centroids, centroids)
    between = sq[:, None] + sq[None, :] - 2.0 * centroids @ centroids.T
    columns = max(_PROBE_COLUMNS, k)
    out = np.empty(n, dtype=np.float64)

    def bound(g: int) -> None:
        rows = order[starts[g]:starts[g + 1]]
        near = np.argsort(between[g], kind="stable")
        reach = int(np.searchsorted(np.cumsum(counts[near]), columns)) + 1
        cols = np.concatenate([order[starts[h]:starts[h + 1]] for h in near[:reach]])
        d = left[rows] @ right[cols].T
        kk = min(k, d.shape[1]) - 1
        out[rows] = np.partition(d, kk, axis=1)[:, kk].astype(np.float64) + margin[rows]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(bound, [g for g in range(groups) if counts[g]]))
    return out


def _kmeans(x: np.ndarray, groups: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and float64 centroids of a coarse FAISS k-means (fixed seed: builds repeat)."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        km = faiss.Kmeans(x.shape[1], groups, niter=8, seed=20261202, max_points_per_centroid=64,
                          verbose=False)
        km.train(x)
        _, labels = km.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(previous)
    return labels.ravel().astype(np.int64), km.centroids.astype(np.float64)


class _CandidateScan:
    """Step 2 and 3 over positions in threshold order (see the module docstring)."""

    def __init__(self, left: np.ndarray, right: np.ndarray, thr: np.ndarray, order: np.ndarray,
                 vectors: np.ndarray, k: int):
        self.left, self.right, self.thr, self.order, self.k = left, right, thr, order, k
        self.vectors = vectors[order]  # float32 in position order: a block's own rows are adjacent
        n = left.shape[0]
        self.n = n
        self.blocks = [(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]
        # Per block: pending (owner position, neighbour position) pairs, and the best k so far.
        self.pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in self.blocks]
        self.pending_size = [0] * len(self.blocks)
        # The best k so far, rows indexed by word id (the final table, filled in place).
        self.best_ids = np.full((n, k), -1, dtype=np.int32)
        self.best_dist = np.full((n, k), np.inf, dtype=np.float64)
        self.total_candidates = 0
        self._local = threading.local()

    def _pair(self, bi: int, bj: int) -> tuple[int, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
        (i0, i1), (j0, j1) = self.blocks[bi], self.blocks[bj]
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:  # one distance block and one mask per thread, reused
            buffers = self._local.buffers = (np.empty(BLOCK * BLOCK, np.float32), np.empty(BLOCK * BLOCK, bool))
        height, width = i1 - i0, j1 - j0
        d = buffers[0][: height * width].reshape(height, width)
        mask = buffers[1][: height * width].reshape(height, width)
        np.matmul(self.left[i0:i1], self.right[j0:j1].T, out=d)  # D̃: squared distances, float32
        np.less_equal(d, self.thr[None, j0:j1], out=mask)
        flat = np.flatnonzero(mask)
        r = (flat // width).astype(np.int32) + i0
        c = (flat % width).astype(np.int32) + j0
        if bi == bj:  # the diagonal block holds both orders of each pair: one direction suffices
            return bj, c, r, bi, r[:0], c[:0]
        # thresholds of block bi are all ≤ those of bj, so its candidates are among these
        keep = d.ravel()[flat] <= self.thr[r]
        return bj, c, r, bi, r[keep], c[keep]

    def run(self, threads: int, progress: bool | None) -> None:
        from tqdm import tqdm

        pairs = [(bi, bj) for bj in range(len(self.blocks)) for bi in range(bj + 1)]
        disable = None if progress is None else not progress
        with ThreadPoolExecutor(max_workers=threads) as pool, tqdm(
            total=len(pairs), desc="neighbour table", unit=" blocks", disable=disable, file=sys.stderr
        ) as bar:
            window: list[Future] = []
            for pair in pairs:
                window.append(pool.submit(self._pair, *pair))
                if len(window) >= 2 * threads:
                    self._collect(window.pop(0).result())
                    bar.update(1)
            for fut in window:
                self._collect(fut.result())
                bar.update(1)
        for b in range(len(self.blocks)):
            self._flush(b)

    def _collect(self, result: tuple[int, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]) -> None:
        for block, owners, neighbours in (result[:3], result[3:]):
            if owners.size:
                self.pending[block].append((owners, neighbours))
                self.pending_size[block] += owners.size
                self.total_candidates += owners.size
                lo, hi = self.blocks[block]
                if self.pending_size[block] > self.k * (hi - lo):
                    self._flush(block)  # bounds memory: pending pairs never exceed ~2 n k

    def _flush(self, block: int) -> None:
        """Merge the block's pending candidates into its best k (exact distance, then id)."""
        if not self.pending[block]:
            return
        owners = np.concatenate([o for o, _ in self.pending[block]])
        positions = np.concatenate([c for _, c in self.pending[block]])
        self.pending[block], self.pending_size[block] = [], 0
        lo, hi = self.blocks[block]
        dist = pair_distances(self.vectors, owners, positions)
        nbrs = self.order[positions].astype(np.int32)
        words = self.order[lo:hi]
        best_ids, best_dist = self.best_ids[words], self.best_dist[words]
        held = best_ids >= 0
        local = np.concatenate([np.nonzero(held)[0], owners - lo]).astype(np.uint16)
        nbrs = np.concatenate([best_ids[held], nbrs])
        dist = np.concatenate([best_dist[held], dist])
        # Sort by (owner, distance, id): a quicksort on distance, then a stable radix sort on
        # the 16-bit owner; exact distance ties inside a row (rare) take the full lexsort.
        sort = np.argsort(dist)
        sort = sort[np.argsort(local[sort], kind="stable")]
        local, nbrs, dist = local[sort], nbrs[sort], dist[sort]
        if np.any((local[1:] == local[:-1]) & (dist[1:] == dist[:-1])):
            sort = np.lexsort((nbrs, dist, local))
            local, nbrs, dist = local[sort], nbrs[sort], dist[sort]
        starts = np.searchsorted(local, np.arange(hi - lo))
        counts = np.diff(np.append(starts, local.size))
        rank = np.arange(local.size) - np.repeat(starts, counts)
        sel = rank < self.k
        best_ids[local[sel], rank[sel]] = nbrs[sel]
        best_dist[local[sel], rank[sel]] = dist[sel]
        self.best_ids[words], self.best_dist[words] = best_ids, best_dist

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if (self.best_ids < 0).any():
            # Impossible by construction (each row's K bounding words pass its threshold); a
            # failure here is a bug, and a wrong table must never be written.
            raise RuntimeError("neighbour table scan found fewer than K candidates for a word")
        return self.best_ids, self.best_dist
