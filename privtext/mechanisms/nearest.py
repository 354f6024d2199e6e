"""Nearest vocabulary words to noisy points: certified exact search, or HNSW (approximate).

Exact search (`search="exact"`, the default) returns the k nearest words in float64 distances of
the stored vectors, certified word by word, through three steps:

1. Table pruning. For z = φ(x) + noise with ‖noise‖ = r, any word w outside x's K-row of the
   table has ‖φ(w) − φ(x)‖ ≥ κ_x (the K-th table distance, lowered by the float32 slack of the
   table's selection; see `envelope.tail_radius`), hence ‖z − φ(w)‖ ≥ κ_x − r. When the k-th
   best candidate inside the row is closer than that, the row's top-k is the exact top-k.
2. The other tokens: FAISS flat search in float32 for the k + `EXTRA` smallest float32 distances,
   which are then recomputed in float64 and re-ranked. FAISS's float32 value D̃(w) of the squared
   distance from the float32 query q̃ to φ(w) is within E = (m + 4)·2⁻²⁴·(‖q̃‖ + max‖φ‖)² of the
   true value, whether it uses ‖q̃‖² + ‖φ‖² − 2q̃·φ (BLAS) or the direct sum, in any summation
   order. Every word FAISS did not return has D̃ ≥ τ (the largest returned value), so its true
   distance to z is at least sqrt(τ − E) − ‖z − q̃‖. If the k-th float64 distance among the
   returned words is below that bound, no other word can enter the top k: certified.
3. Uncertified queries (near-ties at float32 precision) repeat step 2 with `WIDE` candidates, and
   whatever is still uncertified is searched by a float64 scan of the whole vocabulary.

Ties in float64 go to the smaller id. `search="hnsw"` asks an HNSW graph (faiss.IndexHNSWFlat,
built once per index and cached with it) for the k nearest, then re-ranks them in float64: fast,
approximate. Since the search only post-processes the noisy point, the privacy guarantee is the
same; only the output distribution differs, by the measured recall@1 (`measure_recall`).
"""

from __future__ import annotations

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
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 16
HNSW_ARTIFACT = "hnsw-graph"
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
            hnsw_index(self.index)
            self._recall = measure_recall(self.index, self.noise, self.ef_search)

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
        return _hnsw_search(index, noisy, k, ef)
    if search != "exact":
        raise ValueError(f"unknown search {search!r}")
    vectors = index.vectors
    radius = np.linalg.norm(noisy - np.asarray(vectors[anchors], dtype=np.float64), axis=1)
    kappa = _kappa(index)
    whole = index.n <= index.neighbors  # the table holds the whole vocabulary: always exact
    # Pruning can only succeed when r < κ_x; the others go straight to the full search.
    hopeful = np.arange(t) if whole else np.flatnonzero(radius < kappa[anchors])
    fallback = [np.setdiff1d(np.arange(t), hopeful, assume_unique=True)]
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
            fallback.append(sl[~safe])
    todo = np.concatenate(fallback)
    if len(todo):
        ids, dist = _certified_search(index, noisy[todo], k)
        out_ids[todo] = ids
        out_dist[todo] = dist
    return out_ids, out_dist


_KAPPA: dict[str, np.ndarray] = {}


def _kappa(index: EmbeddingIndex) -> np.ndarray:
    key = str(index.path)
    if key not in _KAPPA:
        _KAPPA[key] = tail_radius(index)
    return _KAPPA[key]


def _rerank(index: EmbeddingIndex, noisy: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest among candidate ids (t, c) by float64 distance; ties to the smaller id."""
    d = np.linalg.norm(np.asarray(index.vectors[cand], dtype=np.float64) - noisy[:, None, :], axis=2)
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
    result: dict[str, Any] = {"queries_per_sample": count, "efSearch": int(ef), "M": HNSW_M,
                              "efConstruction": HNSW_EF_CONSTRUCTION,
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
