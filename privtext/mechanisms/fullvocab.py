"""Exact sampling from a categorical distribution over a whole (contiguous) range of the vocabulary.

Used by `santext`, `density` (exact sampler) and `tem` when L_x is wider than the neighbour table.
For an input word x the candidates are the ids y in [lo, hi) and

    P[y | x] ∝ exp(log_prior(y) − scale · min(d(x, y), clamp))

(log_prior ≡ 0 and clamp = ∞ unless given). Two exact samplers draw it:

* `method="envelope"` (default): rejection sampling, a few float64 distances per token, no scan
  of the vocabulary. The most frequent words (ids < R) from their distance-sorted rows
  (`sortedrows.py`); the other words with an extended list with per-cluster lower bounds
  (`clusters.py`); the rest with the table's exact weights plus the envelope over the words
  beyond it (`envelope.py`). A word with at least SCAN_FROM_COUNT tokens in a chunk is drawn by
  the scan below. Tokens that exhaust `max_tries` proposals (rare by design: the cap is hundreds
  of times the mean) fall back to the scan, with fresh randomness.
* `method="scan"`: a float64 distance row per distinct word, then an inverse-CDF draw:

1. Tokens are grouped by word id: each distinct word's weight row w_x(y) is built once per chunk
   (rows of the most frequent words, the lowest ids, are also kept in a bounded per-process
   cache), then every token of that word consumes one open uniform U ∈ (0, 1).
2. Distances come from one float64 matrix product of augmented, centred vectors,
   [−2φ̃(x), ‖φ̃(x)‖², 1] · [φ̃(y); 1; ‖φ̃(y)‖²] = ‖φ̃(x) − φ̃(y)‖² (φ̃ = φ − centroid, which keeps
   the cancellation error near 1e-14 in d²; the self-distance is set to exactly 0).
3. Scores are shifted before exp so that weights lie in (0, 1] with the largest at least
   e^{−600} (the shift cancels in the normalisation): the row holds x itself at distance 0, so
   without a prior the maximum is exactly 0; a prior is shifted by its global maximum once; when
   x is outside the candidate range the row is shifted by its own maximum.
4. The output is the first y with cumulative weight C(y) > U · C(total): the inverse CDF of the
   categorical distribution, so P[output = y] = w_x(y) / Σ w_x exactly (up to float64 rounding,
   about 1e-16 of the total per word, the same order as Gumbel-max in float64). The cumulative
   sum is taken in two levels — cumulative sums restarted at every block of 256 words, stored in
   place of the weights once per row, and the running total of the block sums — so a draw is a
   binary search over the block totals, then one inside the block: the same inverse CDF with a
   different summation order, without a sequential sum over the row or a per-token block sum.

The scan is also what `probabilities()` returns (the exact distribution, for tests and audits).
Nothing here loops over tokens in Python and nothing is n × n: the scan's memory is one (64, n)
float64 work buffer plus the cache (at most `cache_bytes`, allocated only when used).
"""

from __future__ import annotations

import math

import numpy as np

from privtext.index import EmbeddingIndex
from privtext.mechanisms.clusters import (
    DEFAULT_CLUSTERS,
    DEFAULT_TABLE_CLUSTER_WORDS,
    DEFAULT_TABLE_CLUSTERS,
    ClusterEnvelope,
)
from privtext.mechanisms.envelope import (
    DEFAULT_EXTENDED_WORDS,
    DEFAULT_MAX_TRIES,
    EnvelopeSampler,
    first_above,
)
from privtext.mechanisms.sampling import open_uniform
from privtext.mechanisms.sortedrows import SortedRowSampler

BLOCK = 256
_WORD_BATCH = 64
_TOKEN_SLICE = 8192
DEFAULT_CACHE_BYTES = 256 << 20
_PRIOR_RANGE_LIMIT = 600.0  # exp(−600) is still a normal float64
# A word with at least this many tokens in a chunk is drawn from a distance row (one row costs
# what a few thousand tokens of the rejection samplers cost, now that frequent words have sorted
# rows and listed words cluster bounds; at 200, rows for the topical words of 20 Newsgroups'
# 47k-token chunks cost santext 40% of its speed). The scan stays for a chunk that repeats one
# rare word thousands of times.
SCAN_FROM_COUNT = 4000
AUGMENTED_ARTIFACT = "augmented-centred-vectors"


def _build_augmented(index: EmbeddingIndex) -> np.ndarray:
    v = np.asarray(index.vectors, dtype=np.float64)
    v = v - v.mean(axis=0)
    out = np.empty((v.shape[1] + 2, v.shape[0]), dtype=np.float64)
    out[:-2] = v.T
    out[-2] = 1.0
    out[-1] = np.einsum("ij,ij->i", v, v)
    return out


def augmented_vectors(index: EmbeddingIndex) -> np.ndarray:
    """(m + 2, n) float64 [φ̃; 1; ‖φ̃‖²] columns, cached with the index and memory-mapped, so
    worker processes share one copy."""
    return index.derived_artifact(AUGMENTED_ARTIFACT, {"version": 1}, _build_augmented)


def squared_distances(aug: np.ndarray, words: np.ndarray, lo: int, hi: int,
                      out: np.ndarray | None = None, clamp_negative: bool = True,
                      factor: float = 1.0) -> np.ndarray:
    """factor · ‖φ(x) − φ(y)‖² in float64 for x in `words`, y in [lo, hi); exactly 0 for y = x."""
    cols = np.asarray(aug[:, words], dtype=np.float64)
    query = np.empty((len(words), aug.shape[0]), dtype=np.float64)
    query[:, :-2] = (-2.0 * factor) * cols[:-2].T
    query[:, -2] = factor * cols[-1]
    query[:, -1] = factor
    if out is None:
        out = np.empty((len(words), hi - lo), dtype=np.float64)
    np.matmul(query, aug[:, lo:hi], out=out)
    inside = np.flatnonzero((words >= lo) & (words < hi))
    out[inside, words[inside] - lo] = 0.0
    if clamp_negative:
        np.maximum(out, 0.0, out=out)
    return out


def rounding_can_go_negative(index: EmbeddingIndex) -> bool:
    """Whether float64 rounding (about 1e-16 · 4 max‖φ‖² in d²) could make the squared distance
    of two distinct words negative. Distinct words are at least Δ_min apart, so on real
    embeddings it cannot, and the clamping pass over every row can be skipped."""
    geo = index.geometry
    return geo.delta_min**2 <= 1e-9 * (2.0 * geo.max_norm) ** 2


def search_rows(table: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each token, the first column j of table[rows[i]] (non-decreasing) with value > target,
    capped at the last column: a binary search vectorised over tokens."""
    width = table.shape[1]
    flat = table.reshape(-1)
    base = rows.astype(np.int64) * width
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), width - 1, dtype=np.int64)
    for _ in range(max(1, math.ceil(math.log2(width)) + 1)):
        mid = (lo + hi) >> 1
        right = flat[base + mid] <= targets
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right, hi, mid)
    return np.minimum(lo, width - 1)


class FullVocabularySampler:
    """Draws y ∈ [lo, hi) with P[y | x] ∝ exp(log_prior(y) − scale · min(d(x, y), clamp))."""

    def __init__(self, index: EmbeddingIndex, scale: float, *, lo: int = 0, hi: int | None = None,
                 log_prior: np.ndarray | None = None, clamp: float | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, method: str = "envelope",
                 max_tries: int = DEFAULT_MAX_TRIES, scan_from_count: int = SCAN_FROM_COUNT,
                 extended_words: int = DEFAULT_EXTENDED_WORDS, extended_width: int | None = None,
                 sorted_words: int | None = None, clusters: int = DEFAULT_CLUSTERS,
                 table_clusters: int = DEFAULT_TABLE_CLUSTERS,
                 table_cluster_words: int = DEFAULT_TABLE_CLUSTER_WORDS):
        self.index = index
        self.scale = float(scale)
        self.lo = int(lo)
        self.hi = int(index.n if hi is None else hi)
        if not 0 <= self.lo < self.hi <= index.n:
            raise ValueError("candidate range must be a non-empty part of the vocabulary")
        # The prior is shifted by its maximum once, here, instead of shifting every row by its
        # own maximum: when its range is moderate, every row's maximum then lies in
        # [−range, 0] (the word's own entry has distance 0), so exp neither overflows nor loses
        # anything above 1e-16 of the row's total.
        self.log_prior: np.ndarray | None = None
        self._prior_needs_row_shift = False
        if log_prior is not None:
            prior = np.asarray(log_prior[self.lo : self.hi], dtype=np.float64)
            self.log_prior = prior - prior.max()
            self._prior_needs_row_shift = bool(prior.max() - prior.min() > _PRIOR_RANGE_LIMIT)
        self.clamp = clamp
        self._clamp_negative = rounding_can_go_negative(index)
        self.width = self.hi - self.lo
        self.blocks = -(-self.width // BLOCK)
        self.padded = self.blocks * BLOCK
        row_bytes = 8 * (self.padded + self.blocks)
        self.cache_words = int(min(index.n, max(0, cache_bytes // row_bytes)))
        self._aug: np.ndarray | None = None
        self._buffer: np.ndarray | None = None
        self._buffer_cdf: np.ndarray | None = None
        self._cache_weights: np.ndarray | None = None
        self._cache_cdf: np.ndarray | None = None
        self._cached: np.ndarray | None = None
        if method not in ("envelope", "scan"):
            raise ValueError(f"unknown sampling method {method!r}")
        self.method = method
        self.scan_from_count = scan_from_count
        self.envelope = EnvelopeSampler(index, self.scale, lo=self.lo, hi=self.hi, log_prior=log_prior,
                                        clamp=clamp, max_tries=max_tries, extended_words=extended_words,
                                        extended_width=extended_width)
        env = self.envelope
        self.sorted = SortedRowSampler(index, self.scale, log_prior=env.log_prior, clamp=env.clamp,
                                       words=sorted_words if method == "envelope" else 0,
                                       max_tries=max_tries)
        # Words with an extended list beyond the sorted rows: tail bounded by clusters.
        self.clustered = ClusterEnvelope(env, first=self.sorted.words,
                                         clusters=clusters if method == "envelope" else 0)
        # The next words (up to rank table_cluster_words) with their table rows as exact lists.
        self.clustered_table = ClusterEnvelope(
            env, first=max(env.ext_words, self.sorted.words), last=table_cluster_words,
            clusters=table_clusters if method == "envelope" and not env.whole_table else 0)
        self.fallbacks = 0  # tokens that exhausted max_tries in this process (diagnostic count)

    def prepare(self) -> None:
        augmented_vectors(self.index)
        if self.method == "envelope":
            self.envelope.prepare()
            self.sorted.prepare()
            self.clustered.prepare()
            self.clustered_table.prepare()

    @property
    def aug(self) -> np.ndarray:
        if self._aug is None:
            self._aug = augmented_vectors(self.index)
        return self._aug

    # -- the distribution -----------------------------------------------------------------------

    def _fill_weights(self, words: np.ndarray, weights: np.ndarray) -> None:
        """Unnormalised weights of each word's row into weights[:len(words), :width]."""
        b = len(words)
        row = weights[:b, : self.width]
        # scale² goes into the matrix product, so sqrt yields scale·d directly (one pass fewer).
        squared_distances(self.aug, words, self.lo, self.hi, out=row,
                          clamp_negative=self._clamp_negative, factor=self.scale**2)
        np.sqrt(row, out=row)
        if self.clamp is not None:
            np.minimum(row, self.scale * self.clamp, out=row)
        np.negative(row, out=row)
        if self.log_prior is not None:
            row += self.log_prior
        if self._prior_needs_row_shift or not ((words >= self.lo) & (words < self.hi)).all():
            row -= row.max(axis=1, keepdims=True)
        # else every row holds its own word at distance exactly 0, so its maximum is at least
        # −(range of the prior) and at most 0: no per-row shift needed.
        np.exp(row, out=row)

    def _fill_cumulative(self, words: np.ndarray, weights: np.ndarray, cdf: np.ndarray) -> None:
        """Each word's row as cumulative sums restarted at every block of BLOCK words into
        weights[:len(words)], and the cumulative block totals into cdf[:len(words)]. Stored
        once per row, so a draw is two binary searches instead of a sum over a block per token;
        the block total is the in-block sum's last entry, so both levels agree exactly."""
        b = len(words)
        self._fill_weights(words, weights)
        weights[:b, self.width :] = 0.0  # padding: the buffer may hold an earlier row's sums
        blocks = weights[:b].reshape(b, self.blocks, BLOCK)
        np.cumsum(blocks, axis=2, out=blocks)
        np.cumsum(blocks[:, :, -1], axis=1, out=cdf[:b])

    def probabilities(self, word: int) -> np.ndarray:
        """The exact output distribution of `word` over [lo, hi) (normalised, float64)."""
        weights = np.zeros((1, self.padded))
        self._fill_weights(np.array([word], dtype=np.int64), weights)
        return weights[0, : self.width] / weights[0, : self.width].sum()

    # -- sampling -------------------------------------------------------------------------------

    def _draw(self, cumulative: np.ndarray, cdf: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Inverse CDF for tokens whose rows (in-block cumulative sums, see `_fill_cumulative`)
        are cumulative[rows]: candidate offsets."""
        out = np.empty(len(rows), dtype=np.int64)
        flat = cumulative.reshape(-1)
        for start in range(0, len(rows), _TOKEN_SLICE):
            r = rows[start : start + _TOKEN_SLICE]
            target = u[start : start + _TOKEN_SLICE] * cdf[r, -1]
            block = search_rows(cdf, r, target)
            before = np.where(block > 0, cdf[r, np.maximum(block - 1, 0)], 0.0)
            residual = target - before
            pos = first_above(flat, r * self.padded + block * BLOCK, BLOCK, residual)
            # Rounding between the block totals and the target can push pos one past the
            # block's last word (probability ~1e-16); keep it on a real word.
            valid = np.minimum(BLOCK, self.width - block * BLOCK)
            out[start : start + _TOKEN_SLICE] = block * BLOCK + np.minimum(pos, valid - 1)
        return out

    def _ensure_cached(self, words: np.ndarray) -> None:
        if self._cache_weights is None:
            # np.zeros maps untouched pages lazily: only rows actually filled become resident.
            self._cache_weights = np.zeros((self.cache_words, self.padded))
            self._cache_cdf = np.zeros((self.cache_words, self.blocks))
            self._cached = np.zeros(self.cache_words, dtype=bool)
        assert self._cache_cdf is not None and self._cached is not None
        missing = words[~self._cached[words]]
        for start in range(0, len(missing), _WORD_BATCH):
            batch = missing[start : start + _WORD_BATCH]
            weights, cdf = self._work_buffers()
            self._fill_cumulative(batch, weights, cdf)
            self._cache_weights[batch] = weights[: len(batch)]
            self._cache_cdf[batch] = cdf[: len(batch)]
            self._cached[batch] = True

    def _work_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        if self._buffer is None:
            self._buffer = np.zeros((_WORD_BATCH, self.padded))
            self._buffer_cdf = np.empty((_WORD_BATCH, self.blocks))
        assert self._buffer_cdf is not None
        return self._buffer, self._buffer_cdf

    def sample(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One draw per token; returns vocabulary ids in [lo, hi). The Generator is consumed in
        an order fixed by `ids` alone (never by the cache, the process or earlier chunks)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.method == "scan":
            return self.scan(ids, rng)
        # Tokens are drawn in word order (the ids' stable sort): the rejection samplers then read
        # each word's per-word rows (part masses, bounds, lists) for runs of tokens at a time,
        # from cache, instead of jumping between words at every proposal.
        order = np.argsort(ids, kind="stable")
        out = np.empty(len(ids), dtype=np.int64)
        out[order] = self._sample_sorted(ids[order], rng)
        return out

    def _sample_sorted(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # The most frequent words (ids < R) are drawn from their distance-sorted rows. Of the
        # others, words whose rows the cache holds, or that occur often enough in this chunk that
        # one row costs less than their tokens' envelope proposals, are drawn by the scan; words
        # with an extended list by the cluster-bounded envelope; the rest by the envelope. The
        # split depends on the chunk's ids only.
        words, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        by_rows = words < self.sorted.words
        heavy_word = ~by_rows & ((words < self.cache_words) | (counts >= self.scan_from_count))
        out = np.empty(len(ids), dtype=np.int64)
        rest_parts = []
        sorted_tok = np.flatnonzero(by_rows[inverse])
        if len(sorted_tok):
            drawn, done = self.sorted.sample(ids[sorted_tok], rng)
            out[sorted_tok] = drawn
            rest_parts.append(sorted_tok[~done])
        by_scan = np.flatnonzero(heavy_word[inverse])
        if len(by_scan):
            out[by_scan] = self.scan(ids[by_scan], rng)
        by_clusters = ~by_rows & ~heavy_word & self.clustered.serves(words)
        cluster_tok = np.flatnonzero(by_clusters[inverse])
        if len(cluster_tok):
            drawn, done = self.clustered.sample(ids[cluster_tok], rng)
            out[cluster_tok] = drawn
            rest_parts.append(cluster_tok[~done])
        by_table_clusters = ~by_rows & ~heavy_word & ~by_clusters & self.clustered_table.serves(words)
        table_tok = np.flatnonzero(by_table_clusters[inverse])
        if len(table_tok):
            drawn, done = self.clustered_table.sample(ids[table_tok], rng)
            out[table_tok] = drawn
            rest_parts.append(table_tok[~done])
        light = np.flatnonzero(~(by_rows | heavy_word | by_clusters | by_table_clusters)[inverse])
        if len(light):
            drawn, done = self.envelope.sample(ids[light], rng)
            out[light] = drawn
            rest_parts.append(light[~done])
        rest = np.concatenate(rest_parts) if rest_parts else np.empty(0, dtype=np.int64)
        if len(rest):  # exhausted max_tries: the exact scan, with fresh randomness
            self.fallbacks += len(rest)
            out[rest] = self.scan(ids[rest], rng)
        return out

    def scan(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The exact scan: one draw per token; consumes exactly one open uniform per token, in
        token order, whatever the cache holds."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(len(ids), dtype=np.int64)
        if len(ids) == 0:
            return out
        u = open_uniform(rng, len(ids))
        words, inverse = np.unique(ids, return_inverse=True)
        n_cached = int(np.searchsorted(words, self.cache_words))  # words is sorted: a prefix
        if n_cached:
            self._ensure_cached(words[:n_cached])
            assert self._cache_weights is not None and self._cache_cdf is not None
            tok = np.flatnonzero(inverse < n_cached)
            out[tok] = self._draw(self._cache_weights, self._cache_cdf, ids[tok], u[tok])
        if n_cached < len(words):
            order = np.argsort(inverse, kind="stable")
            bounds = np.searchsorted(inverse[order], np.arange(len(words) + 1))
            weights, cdf = self._work_buffers()
            for a in range(n_cached, len(words), _WORD_BATCH):
                b = min(a + _WORD_BATCH, len(words))
                self._fill_cumulative(words[a:b], weights, cdf)
                tok = order[bounds[a] : bounds[b]]
                out[tok] = self._draw(weights, cdf, inverse[tok] - a, u[tok])
        return out + self.lo
