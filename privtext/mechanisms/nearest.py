"""Nearest vocabulary words to noisy points: certified exact search, or HNSW (approximate).

Exact search (`search="exact"`, the default) returns the k nearest words in float64 distances of
the stored vectors, certified word by word. Where the compiled kernel runs (x86-64 Linux with
AMX-BF16, `amx_search.available()`), `_amx_search` does it in one step: the threshold search of
2. below with its collection in bf16 on AMX tiles (proof in `amx_search`), started from the
anchor's first `TABLE_PROBE` table words, the collected words ranked here in float64; points
over `CANDIDATE_CAP` take the certificate of 3. Elsewhere (or with ``PRIVTEXT_AMX=off``):

1. Table pruning. For z = φ(x) + noise with ‖noise‖ = r, any word w outside x's K-row of the
   table has ‖φ(w) − φ(x)‖ ≥ κ_x (the K-th table distance, lowered by the float32 slack of the
   table's selection; see `envelope.tail_radius`), hence ‖z − φ(w)‖ ≥ κ_x − r. When the k-th
   best candidate inside the row is closer than that, the row's top-k is the exact top-k.
2. The other points: the threshold search (`_threshold_search`, proof in its docstring). U, the
   k-th float64 distance among a few real words (the row, or its first `TABLE_PROBE` words), bounds
   the k-th nearest distance; a float32 matrix product over the vocabulary in tiles, with a proven
   bound E on its rounding error, collects every word that could be within U of z, and the
   collected words are ranked in float64. It replaced FAISS's top-(k + 1) search as the main
   path because that search spends most of its time in its top-k selection (measured:
   docs/performance.md, "The Laplace family").
3. Points with more than `CANDIDATE_CAP` candidates (very small ε) take the former certificate:
   FAISS flat search in float32 for the k + `EXTRA` smallest float32 distances, recomputed in
   float64 and re-ranked. FAISS's float32 value D̃(w) of the squared distance from the float32
   query q̃ to φ(w) is within E = (m + 4)·2⁻²⁴·(‖q̃‖ + max‖φ‖)² of the true value, whether it uses
   ‖q̃‖² + ‖φ‖² − 2q̃·φ (BLAS) or the direct sum, in any summation order. Every word FAISS did not
   return has D̃ ≥ τ (the largest returned value), so its true distance to z is at least
   sqrt(τ − E) − ‖z − q̃‖. If the k-th float64 distance among the returned words is below that
   bound, no other word can enter the top k: certified. Uncertified points (near-ties at float32
   precision) repeat this with `WIDE` candidates, and whatever is still uncertified is searched
   by a float64 scan of the whole vocabulary.

Ties in float64 go to the smaller id. `search="hnsw"` searches an HNSW graph
(faiss.IndexHNSWFlat, built once per index and cached with it) for the k nearest, then re-ranks
them in float64: fast, approximate. With the compiled kernel (`_graph_search`) each point enters
the graph's bottom layer at its nearest word among the `HNSW_ENTRY_WORDS` most frequent ones
(found by the AMX scan), otherwise FAISS's own search descends from the graph's entry point.
Either way the search is a function of the noisy point alone (never of the input word), so the
privacy guarantee is the same; only the output distribution differs, by the measured recall@1
(`measure_recall`, which names the graph search used).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import EmbeddingIndex
from privtext.mechanisms.base import MechanismParams, param
from privtext.mechanisms.envelope import tail_radius

SEARCH_CHOICES = ("exact", "hnsw")
_BATCH = 1024
# faiss-cpu 1.15's flat search answers ~3.5x more queries per second in calls of >= 4096 queries
# than in smaller ones (measured on GloVe-50d, 100k words, one thread), so mid-sized fallback
# batches are padded up to that size.
_FAISS_FAST_BATCH = 4096
_FAISS_PAD_FROM = 1100
EXTRA = 1  # candidates beyond k in the first float32 search (the certificate needs one)
WIDE = 64  # candidates in the second search, for the few near-ties of the first
# The exact search: "auto" ("amx" where the CPU and the compiled kernel allow it, else
# "threshold"), "amx" (the threshold search's collection in bf16 on AMX tiles, see
# `amx_search`), "threshold" (a per-query collection radius from the table, in numpy float32
# tiles, see `_threshold_search`) or "faiss" (the former FAISS flat top-k certificate, still the
# fallback for points with too many candidates). All four give the same answer; bench/search.py
# selects them to measure the difference.
EXACT_METHOD = "auto"
TABLE_PROBE = 16
CANDIDATE_CAP = 512
# k ≥ 2: FAISS's certificate when the median noise radius exceeds this many K-th table distances
# (median 4.2 on GloVe 100k; the noise radius is ~5 at ε = 10, ~10 at ε = 5).
_FAISS_FROM_RADIUS = 1.5
# Tiles of the threshold search: numpy's float32 matmul costs ~0.85 ns per (query, word) at
# m = 50, most of it a fixed cost per output; these shapes keep a tile in L2 (measured best).
_TILE_QUERIES = 256
_TILE_WORDS = 2048
_PAIRS = 65_536  # candidate pairs measured at once (bounds the float64 gather's memory)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 16
HNSW_ARTIFACT = "hnsw-graph"
HNSW_LEVEL0_ARTIFACT = "hnsw-level0"
# The graph search with the compiled kernel enters the bottom layer at the point's nearest word
# among the first HNSW_ENTRY_WORDS (the most frequent) words, found by the AMX scan, instead of
# descending the upper layers (measured: docs/performance.md, "The Laplace family").
HNSW_ENTRY_WORDS = 4096
# "auto": "entry" (the kernel's entry word and level-0 search) where the kernel runs, else
# "faiss" (FAISS's own HNSW search, entered at the graph's fixed entry point).
HNSW_METHOD = "auto"
_U32 = 2.0**-24


@dataclass(frozen=True)
class SearchParams(MechanismParams):
    """The nearest-word search option shared by laplace, mahalanobis and vickrey."""

    search: str = param("exact", "nearest-word search: exact (certified float64) or hnsw (an "
                                 "approximate HNSW graph, cached with the index; the guarantee is "
                                 "unchanged, the report gives its measured recall@1)",
                        choices=SEARCH_CHOICES)
    hnsw_ef: int | None = param(None, f"HNSW search breadth efSearch (default {HNSW_EF_SEARCH}; "
                                      "larger: higher recall, slower; search=hnsw only)",
                                min=1, max=4096)

    def validate(self, geometry: Any) -> None:
        super().validate(geometry)
        if self.search != "hnsw" and self.hnsw_ef is not None:
            raise ParameterError("--param hnsw_ef applies only with --param search=hnsw")

    @property
    def ef_search(self) -> int:
        return self.hnsw_ef if self.hnsw_ef is not None else HNSW_EF_SEARCH


def search_condition(params: MechanismParams) -> str:
    """The privacy map's line about the search (the guarantee itself does not depend on it)."""
    if getattr(params, "search", "exact") == "hnsw":
        return ("nearest-word search by an approximate HNSW graph (post-processing; it does not "
                "change the bound; the report gives its measured recall@1)")
    return "nearest-word search is exact (post-processing; it does not change the bound)"


class NearestSearch:
    """Mixin for mechanisms that output the nearest word(s) to a noisy point: the `search`
    parameter, the HNSW graph and its measured recall. Needs `index`, `params` and
    `noise(rng, count)` on the mechanism."""

    index: EmbeddingIndex
    params: MechanismParams
    _recall: dict[str, Any] | None = None

    def noise(self, rng: np.random.Generator, count: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def search(self) -> str:
        return str(getattr(self.params, "search", "exact"))

    @property
    def ef_search(self) -> int:
        return int(getattr(self.params, "ef_search", HNSW_EF_SEARCH))

    def prepare_search(self) -> None:
        """Build (or open) the HNSW graph and measure its recall@1 at this mechanism's noise;
        called once in the parent by prepare(), before workers start."""
        if self.search == "hnsw" and self._recall is None:
            if hnsw_method() == "entry":
                hnsw_level0(self.index)  # builds the graph first if it is not cached yet
            else:
                hnsw_index(self.index)
            self._recall = self._cached_recall()

    def _cached_recall(self) -> dict[str, Any]:
        """measure_recall's result, kept with the index as a derived file: it is a function of
        public data only (the vectors, the graph, a fixed seed, the mechanism's noise at this ε),
        so a later run with the same mechanism, ε, parameters and graph search reads it instead
        of searching 4,000 points before its workers can start."""
        def build(_index: EmbeddingIndex) -> np.ndarray:
            found = measure_recall(self.index, self.noise, self.ef_search)
            return np.frombuffer(json.dumps(found, sort_keys=True).encode(), dtype=np.uint8).copy()

        params = {"mechanism": type(self).__name__, "epsilon": repr(float(getattr(self, "epsilon", 0.0))),
                  "params": {k: repr(v) for k, v in sorted(vars(self.params).items())},
                  "ef": self.ef_search, "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
                  "method": hnsw_method(), "version": 1}
        blob = self.index.derived_artifact("hnsw-recall", params, build, uncached_if_read_only=True)
        return dict(json.loads(bytes(np.asarray(blob))))

    def search_info(self) -> dict[str, Any]:
        if self.search != "hnsw":
            return {"search": "exact (certified float64)"}
        self.prepare_search()
        return {"search": "hnsw (approximate)", "hnsw_recall": self._recall}


def nearest_words(index: EmbeddingIndex, noisy: np.ndarray, anchors: np.ndarray, k: int = 1,
                  search: str = "exact", ef: int = HNSW_EF_SEARCH) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest vocabulary ids to each row of `noisy` (float64) and their float64
    distances, nearest first. `anchors[i]` is the word the i-th noisy point was generated from
    (used only to prune the exact search: the answer never depends on it). Exact unless
    search="hnsw" (then `ef` is the graph search breadth)."""
    t = noisy.shape[0]
    out_ids = np.empty((t, k), dtype=np.int64)
    out_dist = np.empty((t, k), dtype=np.float64)
    if t == 0:
        return out_ids, out_dist
    if search == "hnsw":
        if hnsw_method() == "entry":
            return _graph_search(index, noisy, k, ef)
        # Points of the same word land in the same region of the graph: searched together they
        # find its nodes in cache (+13% queries/s measured at ε = 10). Each point's search is
        # independent of the others, so the order changes no answer.
        order = np.argsort(anchors, kind="stable")
        ids, dist = _hnsw_search(index, noisy[order], k, ef)
        out_ids[order] = ids
        out_dist[order] = dist
        return out_ids, out_dist
    if search != "exact":
        raise ValueError(f"unknown search {search!r}")
    whole = index.n <= index.neighbors  # the table holds the whole vocabulary: always exact
    if not whole and exact_method() == "amx":
        return _amx_search(index, noisy, anchors, k)
    vectors = index.vectors
    radius = np.linalg.norm(noisy - np.asarray(vectors[anchors], dtype=np.float64), axis=1)
    kappa = _kappa(index)
    # Pruning can only succeed when r < κ_x; the others go straight to the full search.
    hopeful = np.arange(t) if whole else np.flatnonzero(radius < kappa[anchors])
    todo = [np.setdiff1d(np.arange(t), hopeful, assume_unique=True)]
    # k words per point with their float64 distances, the start of `_threshold_search`.
    start_ids = np.full((t, k), -1, dtype=np.int64)
    start_dist = np.empty((t, k))
    for start in range(0, len(hopeful), _BATCH):
        sl = hopeful[start : start + _BATCH]
        rows = np.asarray(index.neighbor_ids[anchors[sl]], dtype=np.int64)
        ids, dist = _rerank(index, noisy[sl], rows, k)
        out_ids[sl] = ids
        out_dist[sl] = dist
        if not whole:
            bound = kappa[anchors[sl]] - radius[sl]
            # A tiny margin keeps float64 rounding from certifying a near-tie.
            safe = dist[:, -1] < bound - 1e-9 * (1.0 + np.abs(bound))
            todo.append(sl[~safe])
            start_ids[sl], start_dist[sl] = ids, dist
    rest = np.concatenate(todo)
    if not len(rest):
        return out_ids, out_dist
    method = exact_method()
    if method == "faiss" or (method == "threshold" and _threshold_is_slower(index, radius[rest], k)):
        ids, dist = _certified_search(index, noisy[rest], k)
    else:
        unknown = rest[start_ids[rest, 0] < 0]
        start_ids[unknown], start_dist[unknown] = _probe(index, noisy[unknown], anchors[unknown], k)
        ids, dist, over = _threshold_search(index, noisy[rest], start_ids[rest], start_dist[rest], k)
        if over.any():
            ids[over], dist[over] = _certified_search(index, noisy[rest[over]], k)
    out_ids[rest] = ids
    out_dist[rest] = dist
    return out_ids, out_dist


def exact_method() -> str:
    """The exact method in use: `EXACT_METHOD`, with "auto" resolved ("amx" when the kernel
    loads and this CPU runs AMX-BF16, else "threshold")."""
    if EXACT_METHOD != "auto":
        return EXACT_METHOD
    from privtext.mechanisms import amx_search

    return "amx" if amx_search.available() else "threshold"


def _amx_search(index: EmbeddingIndex, noisy: np.ndarray, anchors: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """The threshold search with its collection done by the bf16 AMX kernel (proof in
    `amx_search`). U starts from the first `TABLE_PROBE` words of the anchor's table row, in
    the kernel (the anchor only sets where U starts: any real words give the same answer);
    no table certificate first: at useful ε few points have one, and the 64-word re-rank it
    needs costs more than the kernel. The collected words are ranked here by `_distances`,
    ties to the smaller id; points over `CANDIDATE_CAP` take the FAISS certificate."""
    from privtext.mechanisms import amx_search

    t = len(noisy)
    width = max(k, min(TABLE_PROBE, index.neighbors))
    probe = np.asarray(index.neighbor_ids[anchors, :width], dtype=np.int32)
    cand_q, cand_w, over = amx_search.collect(index, noisy, probe, k, CANDIDATE_CAP)
    ids = np.zeros((t, k), dtype=np.int64)
    dist = np.zeros((t, k))
    if len(cand_q):
        d = np.concatenate([_distances(index, noisy[cand_q[lo : lo + _PAIRS]], cand_w[lo : lo + _PAIRS])
                            for lo in range(0, len(cand_q), _PAIRS)])
        order = np.lexsort((cand_w, d, cand_q))  # by point, then distance, then id
        q, w, d = cand_q[order], cand_w[order], d[order]
        first = np.searchsorted(q, np.arange(t))
        size = np.searchsorted(q, np.arange(t), side="right") - first
        # The kernel records every word within the final U, which at least k distinct words
        # are; a point short of k candidates can only be one that went over its cap.
        short = size < k
        if (short & ~over).any():
            raise AssertionError("the AMX kernel returned fewer than k candidates for a point")
        pick = np.minimum(first[:, None] + np.arange(k), len(q) - 1)
        ids, dist = w[pick], d[pick]
    if over.any():
        ids[over], dist[over] = _certified_search(index, noisy[over], k)
    return ids, dist


def _threshold_is_slower(index: EmbeddingIndex, radius: np.ndarray, k: int) -> bool:
    """Both methods are exact (the same answer); this only picks the faster. With k ≥ 2 and
    noise well beyond the table's reach, the threshold search starts from a loose bound and
    collects many candidates: measured on GloVe 100k (bench/search.py, vickrey, queries per
    CPU-second), threshold / FAISS 4.4k / 7.0k at ε = 3 (noise radius ~17), 6.8k / 7.6k at ε = 5
    (~10), 7.5k / 7.4k at ε = 10 (~5). For k = 1 the threshold search is level or faster."""
    if k < 2 or not len(radius):
        return False
    return float(np.median(radius)) > _FAISS_FROM_RADIUS * index.geometry.kth_neighbor_distance_median


def _probe(index: EmbeddingIndex, noisy: np.ndarray, anchors: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest among the first `TABLE_PROBE` words of each anchor's table row (ids and
    float64 distances, nearest first): real words, so their k-th distance is an upper bound on
    the k-th nearest distance. At useful ε most noisy points land nearest to one of them (80%
    at ε = 10 on GloVe 100k), which starts `_threshold_search` with a tight radius."""
    width = max(k, min(TABLE_PROBE, index.neighbors))
    ids = np.empty((len(noisy), k), dtype=np.int64)
    dist = np.empty((len(noisy), k))
    for start in range(0, len(noisy), _BATCH):
        sl = slice(start, start + _BATCH)
        rows = np.asarray(index.neighbor_ids[anchors[sl], :width], dtype=np.int64)
        ids[sl], dist[sl] = _rerank(index, noisy[sl], rows, k)
    return ids, dist


_PACKED: dict[str, np.ndarray] = {}


def _packed(index: EmbeddingIndex) -> np.ndarray:
    """(m + 1, n) float32, column w = (−2φ(w), fl32(‖φ(w)‖²)): one matrix product with the
    rows (q̃, 1) gives ‖φ(w)‖² − 2q̃·φ(w), the squared distance less ‖q̃‖², which is constant
    per query and so not needed to compare words against a per-query threshold."""
    key = str(index.path)
    if key not in _PACKED:
        v = np.asarray(index.vectors, dtype=np.float64)
        packed = np.empty((index.dim + 1, index.n), dtype=np.float32)
        packed[: index.dim] = -2.0 * v.T  # exact: doubling a float32
        packed[index.dim] = np.einsum("ij,ij->i", v, v)
        _PACKED[key] = packed
    return _PACKED[key]


def _threshold_search(index: EmbeddingIndex, noisy: np.ndarray, start_ids: np.ndarray,
                      start_dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact k nearest words of each noisy point z, given k distinct words and their float64
    distances (`start_ids`, `start_dist`). Returns ids, distances and a mask of points left to
    the caller (more than `CANDIDATE_CAP` candidates: a point far from every word).

    Why it is exact. U, the k-th smallest float64 distance among k distinct real words, bounds
    the k-th nearest distance from above; it only ever shrinks below, as better words turn up.
    Let q̃ = fl32(z), s ≥ ‖z − q̃‖ and M = max‖φ‖. The tile product computes
    c(w) ≈ ‖φ(w)‖² − 2q̃·φ(w), a sum of m + 1 float32 products. Whatever the summation order
    (BLAS blocking, FMA or not), its error is at most γ_{m+1}·Σ|terms| ≤ γ_{m+1}·(‖q̃‖ + M)²
    with γ_j = j·2⁻²⁴/(1 − j·2⁻²⁴) (Higham, Accuracy and Stability of Numerical Algorithms,
    Thm 3.1, valid for any order), and the stored fl32(‖φ(w)‖²) adds at most 2⁻²⁴·M²;
    E = (m + 5)·2⁻²⁴·(‖q̃‖ + M)² covers both. A word with d(z, w) ≤ U has
    ‖q̃ − φ(w)‖ ≤ U + s, so c(w) ≤ (U + s)² − ‖q̃‖² + E = T (raised by a relative 1e-9 for the
    float64 evaluation of T and of the distances). Every word with c(w) < T (T for the U of the
    moment, never below the final U's) is collected, so every word at float64 distance ≤ the
    final U is: all k nearest words and anything tied with the k-th. The collected words are
    ranked by float64 distance, ties to the smaller id: the same answer as a float64 scan of the
    whole vocabulary. A row's float32 minimum decides whether a tile row holds any candidate, and
    that row's best word, measured in float64, tightens U for the tiles after it (the vocabulary
    is in frequency order, so the first tiles hold the central, frequent words)."""
    t = len(noisy)
    dim, n = index.dim, index.n
    packed = _packed(index)
    q32 = np.ascontiguousarray(noisy, dtype=np.float32)
    q64 = q32.astype(np.float64)
    shift = 2.0 * np.linalg.norm(noisy - q64, axis=1)  # ‖z − q̃‖, doubled against its rounding
    qn2 = np.einsum("ij,ij->i", q64, q64)
    error = (dim + 5) * _U32 * (np.sqrt(qn2) + index.geometry.max_norm) ** 2

    def threshold(u: np.ndarray, sl: slice | np.ndarray) -> np.ndarray:
        far = (u + shift[sl]) ** 2
        return far - qn2[sl] + error[sl] + 1e-9 * (1.0 + far + qn2[sl])

    lhs = np.empty((t, dim + 1), dtype=np.float32)
    lhs[:, :dim] = q32
    lhs[:, dim] = 1.0
    best_ids = start_ids.copy()
    best_dist = start_dist.copy()
    counts = np.zeros(t, dtype=np.int64)
    over = np.zeros(t, dtype=bool)
    tile = np.empty((min(_TILE_QUERIES, t), _TILE_WORDS), dtype=np.float32)
    for qs in range(0, t, _TILE_QUERIES):
        rows = lhs[qs : qs + _TILE_QUERIES]
        span = np.arange(len(rows))
        limit = threshold(best_dist[qs : qs + _TILE_QUERIES, -1], slice(qs, qs + _TILE_QUERIES))
        for ws in range(0, n, _TILE_WORDS):
            block = packed[:, ws : ws + _TILE_WORDS]
            out = tile[: len(rows), : block.shape[1]]
            np.matmul(rows, block, out=out)
            arg = np.argmin(out, axis=1)
            hit = np.flatnonzero(out[span, arg] < limit)
            if not len(hit):
                continue
            g = hit + qs
            # The row's best word first: its float64 distance often tightens U at once, which
            # keeps the pairs below few when U started loose (a point far from its anchor).
            _merge(index, noisy, best_ids, best_dist, g, g, arg[hit] + ws)
            limit[hit] = threshold(best_dist[g, -1], g)
            r, c = np.nonzero(out[hit] < limit[hit, None])
            counts[g] += np.bincount(r, minlength=len(hit))
            for lo in range(0, len(r), _PAIRS):
                _merge(index, noisy, best_ids, best_dist, g, hit[r[lo : lo + _PAIRS]] + qs,
                       c[lo : lo + _PAIRS] + ws)
            limit[hit] = threshold(best_dist[g, -1], g)
            full = hit[counts[g] > CANDIDATE_CAP]
            if len(full):  # stop collecting for these; the caller searches them another way
                limit[full] = -np.inf
                over[full + qs] = True
    return best_ids, best_dist, over


def _merge(index: EmbeddingIndex, noisy: np.ndarray, best_ids: np.ndarray, best_dist: np.ndarray,
           group: np.ndarray, cand_q: np.ndarray, cand_w: np.ndarray) -> None:
    """Fold candidate words (cand_q[i]'s candidate cand_w[i]) into the k best words of the points
    `group`, in place: float64 distance, ties to the smaller id, each word once."""
    k = best_ids.shape[1]
    dist = _distances(index, noisy[cand_q], cand_w)
    q = np.concatenate([np.repeat(group, k), cand_q])
    w = np.concatenate([best_ids[group].ravel(), cand_w])
    d = np.concatenate([best_dist[group].ravel(), dist])
    order = np.lexsort((w, d, q))
    q, w, d = q[order], w[order], d[order]
    # The same word has the same distance, so its copies are adjacent: keep the first.
    fresh = np.ones(len(q), dtype=bool)
    fresh[1:] = (q[1:] != q[:-1]) | (w[1:] != w[:-1])
    q, w, d = q[fresh], w[fresh], d[fresh]
    first = np.searchsorted(q, group)
    pick = first[:, None] + np.arange(k)
    best_ids[group] = w[pick]
    best_dist[group] = d[pick]


def _distances(index: EmbeddingIndex, points: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 ‖points[i] − φ(ids[i])‖, the one formula every exact distance here uses."""
    diff = np.asarray(index.vectors[ids], dtype=np.float64)
    diff -= points
    return np.linalg.norm(diff, axis=-1)


_KAPPA: dict[str, np.ndarray] = {}


def _kappa(index: EmbeddingIndex) -> np.ndarray:
    key = str(index.path)
    if key not in _KAPPA:
        _KAPPA[key] = tail_radius(index)
    return _KAPPA[key]


def _rerank(index: EmbeddingIndex, noisy: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest among candidate ids (t, c) by float64 distance; ties to the smaller id."""
    d = _distances(index, noisy[:, None, :], cand)
    order = np.lexsort((cand, d), axis=1)[:, :k]  # by distance, then by id
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(d, order, axis=1)


def _faiss_search(index: EmbeddingIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    t = len(queries)
    if _FAISS_PAD_FROM <= t < _FAISS_FAST_BATCH:
        queries = np.concatenate([queries, np.repeat(queries[:1], _FAISS_FAST_BATCH - t, axis=0)])
    d32, found = index.faiss_index.search(queries, k)
    return d32[:t].astype(np.float64), found[:t].astype(np.int64)


def _certified_search(index: EmbeddingIndex, noisy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    t = len(noisy)
    out_ids = np.empty((t, k), dtype=np.int64)
    out_dist = np.empty((t, k), dtype=np.float64)
    queries = np.ascontiguousarray(noisy, dtype=np.float32)
    # ‖z − q̃‖ (float32 rounding of the query), doubled against float64 rounding of its own.
    shift = 2.0 * np.linalg.norm(noisy - queries.astype(np.float64), axis=1)
    slack = (index.dim + 4) * _U32 * (np.linalg.norm(queries.astype(np.float64), axis=1)
                                      + index.geometry.max_norm) ** 2
    todo = np.arange(t)
    for width in (k + EXTRA, WIDE):
        width = min(width, index.n)
        if not len(todo):
            break
        d32, found = _faiss_search(index, queries[todo], width)
        ids, dist = _rerank(index, noisy[todo], found, k)
        out_ids[todo] = ids
        out_dist[todo] = dist
        if width >= index.n:
            return out_ids, out_dist
        bound = np.sqrt(np.maximum(d32[:, -1] - slack[todo], 0.0)) - shift[todo]
        certified = dist[:, -1] < bound * (1.0 - 1e-12)
        todo = todo[~certified]
    for i in todo:  # rare: a float64 scan of the whole vocabulary, one query at a time
        ids, dist = _scan(index, noisy[i], k)
        out_ids[i] = ids
        out_dist[i] = dist
    return out_ids, out_dist


def _scan(index: EmbeddingIndex, point: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    best_d = np.empty(0)
    best_i = np.empty(0, dtype=np.int64)
    for start in range(0, index.n, 16384):
        block = np.asarray(index.vectors[start : start + 16384], dtype=np.float64)
        d = np.linalg.norm(block - point, axis=1)
        keep = np.argpartition(d, k - 1)[:k] if len(d) > k else np.arange(len(d))
        best_d = np.concatenate([best_d, d[keep]])
        best_i = np.concatenate([best_i, keep + start])
        order = np.lexsort((best_i, best_d))[:k]
        best_d, best_i = best_d[order], best_i[order]
    return best_i, best_d


# -- HNSW ---------------------------------------------------------------------------------------

_HNSW: dict[str, Any] = {}


def _build_hnsw(index: EmbeddingIndex) -> np.ndarray:
    import faiss

    graph = faiss.IndexHNSWFlat(index.dim, HNSW_M)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    graph.add(np.ascontiguousarray(index.vectors, dtype=np.float32))
    return faiss.serialize_index(graph)


def hnsw_method() -> str:
    """The graph search in use: `HNSW_METHOD` with "auto" resolved."""
    if HNSW_METHOD != "auto":
        return HNSW_METHOD
    from privtext.mechanisms import amx_search

    return "entry" if amx_search.available() else "faiss"


def _build_level0(index: EmbeddingIndex) -> np.ndarray:
    """The bottom layer of the cached HNSW graph as an (n, 2M) int32 table (−1 ends a short
    list): public data derived from the public vectors."""
    import faiss

    graph = hnsw_index(index).hnsw
    width = graph.nb_neighbors(0)
    neighbors = faiss.vector_to_array(graph.neighbors)
    offsets = faiss.vector_to_array(graph.offsets).astype(np.int64)
    # cum_nb_neighbors(0) = 0: each node's level-0 list opens its range.
    return np.ascontiguousarray(neighbors[offsets[:-1, None] + np.arange(width)], dtype=np.int32)


_LEVEL0: dict[str, np.ndarray] = {}


def hnsw_level0(index: EmbeddingIndex) -> np.ndarray:
    """The level-0 table, cached under derived/ with the graph and memory-mapped (workers share
    it through the page cache); prepare_search() builds it in the parent."""
    key = str(index.path)
    if key not in _LEVEL0:
        # Cheap to derive from the graph: a read-only cache that has the graph but not this
        # table gets it built in memory instead of an error.
        _LEVEL0[key] = index.derived_artifact(
            HNSW_LEVEL0_ARTIFACT, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "version": 1},
            _build_level0, uncached_if_read_only=True)
    return _LEVEL0[key]


_VECTORS32: dict[str, np.ndarray] = {}


def _graph_search(index: EmbeddingIndex, noisy: np.ndarray, k: int,
                  ef: int) -> tuple[np.ndarray, np.ndarray]:
    """`search="hnsw"` with the compiled kernel: each point's nearest word among the first
    `HNSW_ENTRY_WORDS` words (exact, by the AMX scan) is its entry into the graph's bottom
    layer, searched best-first keeping `ef` words (`amx_search.graph_search`); the k found are
    re-ranked in float64. Everything is computed from the noisy point alone (never from the
    input word: that would not be post-processing). Points are searched sorted by entry word
    (nearby points walk the same part of the graph while it is in cache); each point's search
    is independent of the others, so the order changes no answer."""
    from privtext.mechanisms import amx_search

    key = str(index.path)
    if key not in _VECTORS32:
        _VECTORS32[key] = np.ascontiguousarray(index.vectors, dtype=np.float32)
    entry = amx_search.nearest_of_first(index, noisy, HNSW_ENTRY_WORDS)
    order = np.argsort(entry, kind="stable")
    found = np.empty((len(noisy), k), dtype=np.int64)
    found[order] = amx_search.graph_search(hnsw_level0(index), _VECTORS32[key], noisy[order],
                                           entry[order], ef, k)
    return _rerank(index, noisy, found, k)


def hnsw_index(index: EmbeddingIndex) -> Any:
    """The HNSW graph of the index's vectors: built once (deterministically, from the public
    vectors) and cached under derived/, then loaded once per process."""
    import faiss

    key = str(index.path)
    if key not in _HNSW:
        blob = index.derived_artifact(HNSW_ARTIFACT, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
                                                      "version": 1}, _build_hnsw)
        _HNSW[key] = faiss.deserialize_index(np.ascontiguousarray(blob))
    return _HNSW[key]


def _hnsw_search(index: EmbeddingIndex, noisy: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    # The graph is entered at its fixed entry point, never at the input word: an approximate
    # answer that depended on x beyond the noisy point would not be post-processing.
    params = faiss.SearchParametersHNSW()
    params.efSearch = int(ef)
    _, found = hnsw_index(index).search(np.ascontiguousarray(noisy, dtype=np.float32), k, params=params)
    found = found.astype(np.int64)
    found[found < 0] = 0  # never for a graph over ≥ k words; keeps ids valid regardless
    return _rerank(index, noisy, found, k)


def measure_recall(index: EmbeddingIndex, noise: Any, ef: int = HNSW_EF_SEARCH, sample: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """recall@1 of HNSW against exact search on noisy queries, measured on public data only:
    vocabulary words drawn with a fixed seed, uniformly and by a Zipf law over the frequency
    order (rank r with probability ∝ 1/(r + 1), close to running text), each moved by
    `noise(rng, count)`, the mechanism's own noise at its ε. recall@1 is the share of queries
    whose HNSW nearest word is the exact nearest word; a 95% Wilson interval comes with it."""
    rng = np.random.default_rng(seed)
    count = min(sample, index.n)
    ranks = 1.0 / np.arange(1, index.n + 1, dtype=np.float64)
    method = hnsw_method()
    result: dict[str, Any] = {"queries_per_sample": count, "efSearch": int(ef), "M": HNSW_M,
                              "efConstruction": HNSW_EF_CONSTRUCTION,
                              "graph_search": (f"bottom layer entered at the point's nearest of the "
                                               f"first {HNSW_ENTRY_WORDS} words (compiled kernel)"
                                               if method == "entry" else
                                               "FAISS HNSW search from the graph's entry point"),
                              "queries_from": "vocabulary words with the mechanism's noise (public "
                                              "seed, no corpus data)"}
    for label, words in (("uniform", rng.integers(0, index.n, size=count)),
                         ("zipf", rng.choice(index.n, size=count, p=ranks / ranks.sum()))):
        noisy = np.asarray(index.vectors[words], dtype=np.float64) + noise(rng, len(words))
        exact, _ = nearest_words(index, noisy, words, k=1, search="exact")
        approx, _ = nearest_words(index, noisy, words, k=1, search="hnsw", ef=ef)
        recall = float((exact[:, 0] == approx[:, 0]).mean())
        z = 1.959964
        denom = 1 + z * z / count
        centre = (recall + z * z / (2 * count)) / denom
        half = z * math.sqrt(recall * (1 - recall) / count + z * z / (4 * count * count)) / denom
        result[f"recall_at_1_{label}"] = recall
        result[f"interval_95_{label}"] = [max(0.0, centre - half), min(1.0, centre + half)]
    return result
