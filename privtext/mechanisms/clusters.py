"""Exact sampling for the words with an extended list, bounding the rest by clusters.

Used by `FullVocabularySampler` for the words x with an extended list (R ≤ x < W, see
envelope.py) that are not drawn from a sorted row (sortedrows.py). Target over [lo, hi):

    P[y | x] ∝ w(y) = π(y)·exp(−s·min(d(x, y), c))        (π normalised to max 1, 0 outside)

Two index artifacts, independent of ε, the clamp and the prior:

* a partition of the vocabulary into C clusters (default 1024; k-means in float64 from evenly
  spaced seeds, empty clusters dropped): any partition is valid, a good one is only faster;
* for each x < W and each cluster Q: λ_xQ, a certified lower bound on d(x, y) for every y in Q:
  the smallest float64 squared distance (augmented matrix product, as for the extended lists)
  over Q, minus four times its proven rounding error, square-rooted, lowered by a relative 1e-9.

The exact list N_x (the M nearest words, weights cached per process by envelope.py) has radius
r_x = max(ρ_x, κ_x): every y ∉ N_x is at least r_x away, and at least λ_xQ if y ∈ Q. So for y ∉ N_x,
w(y) ≤ π(y)·exp(−s·min(L_xQ, c)) with L_xQ = max(r_x, λ_xQ), and the proposal is the mixture

    g(y) = w(y)·[y ∈ N_x] + π(y)·exp(−s·min(L_xQ(y), c))

drawn as: a part among [exact list, cluster 1 … cluster C] with probability ∝ its mass (the
list's total weight; Π_Q·exp(−s·min(L_xQ, c)) with Π_Q = Σ_{y∈Q} π(y)), then a word of the part:
inverse CDF over the list's exact weights, or y ∈ Q by π (uniformly, an exact integer draw, when π
is flat over the whole vocabulary; else an inverse CDF over π inside the cluster, restarted per
cluster). A proposal from the list is always accepted; one from a cluster is rejected when y ∈ N_x
(its mass comes from the list alone), else accepted with probability
w(y)/(π(y)·exp(−s·min(L, c))) = exp(−s·(min(d, c) − min(L, c))) (π cancels), realised as "an
Exp(1) variate exceeds the exponent". Accepted mass is w(y) for every y, so the first accepted
proposal has exactly the target law (the argument of envelope.py). Unlike the κ-bins there, the
cluster bound holds for every y, so no reverse-neighbour part is needed.

Why: on GloVe-50d at ε = 3, λ_xQ is much tighter than the bound from table radii
(max(r_x, κ_y)), so these words need about half as many proposals. The per-word masses over the
C + 1 parts are deterministic, so each process keeps them for its later chunks (at most
W·(C + 1) float64, only rows used become resident); the Generator never sees that cache. Tries
are bounded by `max_tries` (the caller then draws the token by the exact scan, with fresh
randomness).
"""

from __future__ import annotations

import math

import numpy as np

from privtext.index import EmbeddingIndex
from privtext.mechanisms.envelope import (
    GUIDE_CELLS,
    EnvelopeSampler,
    _search_segments,
    guide_table,
    guided_columns,
    proposal_rounds,
)
from privtext.mechanisms.sampling import open_uniform

CLUSTERS_ARTIFACT = "vocabulary-clusters"
CLUSTER_BOUNDS_ARTIFACT = "cluster-lower-bounds"
DEFAULT_CLUSTERS = 1024
# Words beyond the extended lists, up to this rank, get cluster bounds too (with their table
# rows as exact lists), over fewer clusters: 1 KB of bounds per word.
DEFAULT_TABLE_CLUSTERS = 256
DEFAULT_TABLE_CLUSTER_WORDS = 32768
_KMEANS_ROUNDS = 8
_BUILD_BATCH = 64
_REL = 1e-9
_ROUND_TRIES = 3


def cluster_count(index: EmbeddingIndex, clusters: int) -> int:
    """C actually asked for: at most n/16 (clusters of at least 16 words on average)."""
    return max(1, min(int(clusters), index.n // 16))


def build_clusters(index: EmbeddingIndex, clusters: int) -> np.ndarray:
    """[offsets (C' + 1), members (n)] int64: the ids of cluster q are members[offsets[q] :
    offsets[q + 1]], sorted by id (k-means in float64 from evenly spaced seeds; C' ≤ C after
    dropping empty clusters)."""
    v = np.asarray(index.vectors, dtype=np.float64)
    n = len(v)
    centres = v[np.linspace(0, n - 1, clusters).astype(np.int64)].copy()
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(_KMEANS_ROUNDS):
        for a in range(0, n, 8192):  # nearest centre: ‖c‖² − 2 v·c, in blocks
            block = np.einsum("ij,ij->i", centres, centres)[None, :] - 2.0 * (v[a : a + 8192] @ centres.T)
            assign[a : a + 8192] = block.argmin(axis=1)
        counts = np.bincount(assign, minlength=clusters)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, v)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    used, assign = np.unique(assign, return_inverse=True)
    members = np.lexsort((np.arange(n), assign)).astype(np.int64)
    offsets = np.zeros(len(used) + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=len(used)), out=offsets[1:])
    return np.concatenate([offsets, members])


def build_cluster_bounds(index: EmbeddingIndex, words: int, packed: np.ndarray, start: int = 0) -> np.ndarray:
    """λ (float32, (W − start, C')): for start ≤ x < W, a certified lower bound on d(x, y) for y in
    each cluster (computed in float64, then rounded down to float32: half the memory, still a
    lower bound)."""
    from privtext.mechanisms.fullvocab import augmented_vectors, squared_distances

    n = index.n
    count = _offsets_length(packed, n) - 1
    offsets, members = packed[: count + 1], packed[count + 1 :]
    aug = augmented_vectors(index)
    radius2 = float(np.max(aug[-1]))
    slack = 4.0 * (index.dim + 2) * 2.0**-53 * 1.001 * 4.0 * radius2
    out = np.empty((words - start, count), dtype=np.float32)
    for a in range(start, words, _BUILD_BATCH):
        batch = np.arange(a, min(a + _BUILD_BATCH, words))
        d2 = squared_distances(aug, batch, 0, n)[:, members]
        low = np.minimum.reduceat(d2, offsets[:-1], axis=1)
        bound = np.sqrt(np.maximum(low - slack, 0.0)) * (1.0 - _REL)
        narrow = bound.astype(np.float32)
        up = narrow.astype(np.float64) > bound  # rounded up: step down to the float32 below
        narrow[up] = np.nextafter(narrow[up], np.float32(-np.inf))
        out[batch - start] = narrow
    return out


def _offsets_length(packed: np.ndarray, n: int) -> int:
    """Length of the offsets part of a packed [offsets, members] array (members has n entries)."""
    return len(packed) - n


class ClusterEnvelope:
    """Rejection sampler for the words with an extended list (module docstring); it shares the
    extended lists and their cached weights with `envelope`."""

    def __init__(self, envelope: EnvelopeSampler, *, first: int, clusters: int = DEFAULT_CLUSTERS,
                 last: int | None = None):
        """Serves the words in [first, W) with their extended lists as exact lists; with `last`,
        the words in [first, last) with their table rows as exact lists (N_x = T_x, r_x = κ_x,
        reach d_K(x)), for words beyond the extended lists."""
        self.envelope = envelope
        self.index = envelope.index
        self.first = int(first)
        self.listed = last is None
        self.words = envelope.ext_words if last is None else min(int(last), self.index.n)
        self.clusters = cluster_count(self.index, clusters) if clusters > 0 and self.words > self.first else 0
        # λ rows: from word 0 for the listed words (that artifact predates the table mode), from
        # `first` for the table mode.
        self.lam_start = 0 if self.listed else self.first
        self._ready = False
        self.proposals = 0  # diagnostics of this process
        self.tokens = 0

    def serves(self, words: np.ndarray) -> np.ndarray:
        return (words >= self.first) & (words < self.words) if self.clusters else np.zeros(len(words), bool)

    def _packed(self) -> np.ndarray:
        c = self.clusters
        return self.index.derived_artifact(CLUSTERS_ARTIFACT, {"version": 1, "clusters": c},
                                           lambda ix: build_clusters(ix, c))

    def _bounds(self) -> np.ndarray:
        words, c, start = self.words, self.clusters, self.lam_start
        packed = self._packed()
        params = {"version": 2, "clusters": c, "words": words}
        if start:
            params["start"] = start
        return self.index.derived_artifact(
            CLUSTER_BOUNDS_ARTIFACT, params, lambda ix: build_cluster_bounds(ix, words, np.asarray(packed), start))

    def prepare(self) -> None:
        if self.clusters:
            self._bounds()

    def _setup(self) -> None:
        if self._ready:
            return
        env = self.envelope
        env._setup()
        n = self.index.n
        packed = np.asarray(self._packed())
        count = _offsets_length(packed, n) - 1
        self.offsets, self.members = packed[: count + 1], packed[count + 1 :]
        self.size = np.diff(self.offsets)
        self.lam = self._bounds()
        lp = env.log_prior[self.members]  # π in cluster order
        top = np.maximum.reduceat(lp, self.offsets[:-1])
        finite_top = np.where(np.isfinite(top), top, 0.0)
        rel = np.exp(lp - np.repeat(finite_top, self.size))
        with np.errstate(divide="ignore"):
            self.log_mass = finite_top + np.log(np.add.reduceat(rel, self.offsets[:-1]))
        self.log_mass[~np.isfinite(top)] = -np.inf
        self.uniform = env.flat_prior
        if not self.uniform:
            # Cumulative π inside each cluster, restarted per cluster (no cancellation between).
            self.local_cum = np.empty(n)
            for a, m in zip(self.offsets[:-1], self.size, strict=True):
                np.cumsum(rel[a : a + m], out=self.local_cum[a : a + m])
            self._local_steps = max(1, math.ceil(math.log2(int(self.size.max()))) + 1)
        self.vectors = env.vectors
        self._cum = np.zeros((self.words, count + 1))  # lazily filled rows: per-word part masses
        # ... and their guide tables: about one cell per column (a power of two, at most 1024)
        self._cells = min(GUIDE_CELLS, 1 << max(0, (count - 1).bit_length()))
        self._guide = np.zeros((self.words, self._cells), dtype=np.int16)
        self._have = np.zeros(self.words, dtype=bool)
        if not self.listed:  # the table rows' cumulative weights (lazily filled rows)
            self._table_cum = np.zeros((self.words, self.index.neighbors))
        self._ready = True

    def _parts(self, words: np.ndarray) -> None:
        """Fill the cumulative part masses [list, cluster 0 … C'−1] of words not yet cached."""
        env = self.envelope
        missing = words[~self._have[words]]
        s, c = env.scale, env.clamp
        for a in range(0, len(missing), 256):
            batch = missing[a : a + 256]
            if self.listed:
                _, _, a_table = env._extended_weights(batch)
            else:
                rows = np.asarray(env.table[batch], dtype=np.int64)
                cum, a_table = env._list_weights(rows, np.asarray(env.table_dist[batch]))
                self._table_cum[batch] = cum
            radius = self._radius(batch)
            bound = np.maximum(np.asarray(self.lam[batch - self.lam_start], dtype=np.float64), radius[:, None])
            parts = np.empty((len(batch), self._cum.shape[1]))
            parts[:, 0] = a_table
            parts[:, 1:] = self.log_mass[None, :] - s * np.minimum(bound, c)
            parts -= parts.max(axis=1, keepdims=True)
            np.exp(parts, out=parts)
            np.cumsum(parts, axis=1, out=parts)
            parts /= parts[:, -1:]
            self._cum[batch] = parts
            self._guide[batch] = guide_table(parts, self._cells)
            self._have[batch] = True

    def _radius(self, x: np.ndarray) -> np.ndarray:
        """r_x: every word outside x's exact list is at least this far (envelope.py)."""
        env = self.envelope
        if self.listed:
            return np.maximum(np.asarray(env.ext_dist[x, env.ext_width]), env.kappa[x])
        return env.kappa[x]

    def _reach(self, x: np.ndarray) -> np.ndarray:
        """The largest distance in x's exact list: no farther word is in it."""
        env = self.envelope
        if self.listed:
            return np.asarray(env.ext_dist[x, env.ext_width + 1])
        return env.d_k[x]

    def sample(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, done): outputs[i] is valid where done[i]; the others exhausted max_tries
        and must be drawn by the exact scan (with fresh randomness)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.full(0, -1, dtype=np.int64), np.zeros(0, dtype=bool)
        self._setup()
        self.tokens += len(ids)
        self._parts(np.unique(ids))
        env = self.envelope
        # The exact lists (rows and weights indexed by word id): extended lists (sorted by id) or
        # table rows (sorted by distance).
        if self.listed:
            self._terms = {"rows": env.ext_ids, "cum": env._ext_cum, "list_row": np.arange(self.words),
                           "sorted": np.array(True)}
        else:
            self._terms = {"rows": env.table, "cum": self._table_cum, "list_row": np.arange(self.words),
                           "sorted": np.array(False)}
        out, done, proposals = proposal_rounds(len(ids), _ROUND_TRIES, env.max_tries,
                                               lambda tok, k: self._round(ids[tok], k, rng))
        self.proposals += proposals
        return out, done

    def _round(self, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k proposals for each token of word x; (accepted, the first accepted proposal)."""
        env = self.envelope
        s, c = env.scale, env.clamp
        t = len(x)
        u = open_uniform(rng, (2, t * k))
        u_part, u_pick = u[0], u[1]
        expo = rng.standard_exponential(t * k)
        rows = np.repeat(x, k)
        col = guided_columns(self._cum, self._guide, rows, u_part)
        exact = col == 0
        y = np.empty(t * k, dtype=np.int64)
        sel = np.flatnonzero(exact)
        if len(sel):
            y[sel] = EnvelopeSampler._exact_part(self._terms, rows[sel], u_pick[sel])
        sel = np.flatnonzero(~exact)
        q = col[sel] - 1
        start, size = self.offsets[q], self.size[q]
        if self.uniform:
            j = rng.integers(0, size)
        else:
            j = _search_segments(self.local_cum, start, size, u_pick[sel], self._local_steps)
        y[sel] = self.members[start + j]
        xs = rows[sel]
        diff = self.vectors.take(y[sel], axis=0).astype(np.float64)  # float64, as in envelope.py
        diff -= self.vectors.take(xs, axis=0)
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        radius = self._radius(xs)
        bound = np.maximum(np.asarray(self.lam[xs - self.lam_start, q], dtype=np.float64), radius)
        ok = expo[sel] > s * (np.minimum(dist, c) - np.minimum(bound, c))
        # A word of N_x proposed by a cluster is rejected; only words within the list's reach
        # can be in it.
        reach = self._reach(xs)
        near = np.flatnonzero(ok & (dist <= reach * (1.0 + _REL)))
        if len(near):
            ok[near] = ~EnvelopeSampler._in_list(self._terms, xs[near], y[sel][near])
        accept = exact.copy()
        accept[sel] = ok
        accept = accept.reshape(t, k)
        got = accept.any(axis=1)
        first = accept.argmax(axis=1)
        return got, y.reshape(t, k)[np.arange(t), first]
