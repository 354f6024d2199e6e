"""Exact sampling for the most frequent words from distance-sorted rows (an index artifact).

Used by `FullVocabularySampler` for the R most frequent words (ids < R, default 512), which carry
most of a corpus's tokens. Target, over the ids [lo, hi):

    P[y | x] ∝ w(y) = π(y)·exp(−s·min(d(x, y), c))        (π normalised to max 1, 0 outside)

The artifact, built once per index and independent of ε and the clamp (and, in its prior-free
form, of the prior): for each x < R,
every id of the vocabulary sorted by its (float64, augmented-matrix) squared distance to x, and
the row cut into bins of consecutive positions (a cut every 64 positions and wherever the
distance crosses a multiple of 0.05). Each bin j carries ℓ_j, a certified lower bound on d(x, y)
for every y in it: the bin's first (smallest) squared value minus four times the matrix
product's proven rounding error, square-rooted, then lowered by a relative 1e-9 (the same bound
as the extended lists' ρ_x in envelope.py; the acceptance step's direct float64 distance differs
from the true distance by about 1e-15 relative).

With a prior (density), or a range covering less than half of the vocabulary, the rows are
built for that prior (cached with the index under the prior's bytes): inside each distance bin
the words are ordered by prior level (steps of 0.1 in log π, highest first) and the bin is cut at
every change of level, each part keeping its distance bin's ℓ_j; words outside the range
(log π = −inf) form parts of their own. A flat prior, or a range covering at least half of the
vocabulary with a flat prior inside (SanText+), uses the prior-free rows.

The proposal puts on each y in bin j the mass g(y) = π̂_j·exp(−s·min(ℓ_j, c)), with π̂_j the
bin's largest π (1 for the prior-free rows): pick bin j with probability ∝ |B_j|·π̂_j·exp(−s·
min(ℓ_j, c)) (a per-word categorical over the bins), then a position in it uniformly (an exact
integer draw). As y ∈ B_j ⇒ d(x, y) ≥ ℓ_j and π(y) ≤ π̂_j, g(y) ≥ w(y) for every word, so
accepting y with probability w(y)/g(y) = exp(−[(log π̂_j − log π(y)) + s·(min(d, c) − min(ℓ_j, c))])
(realised as "an Exp(1) variate exceeds the bracket", as in envelope.py) leaves accepted mass
g(y)·w(y)/g(y) = w(y) for every y: the first accepted proposal has exactly the target law. Words
outside [lo, hi) have log π = −inf and are never accepted; a bin holding only such words has
mass 0 and is never chosen.

Cost: the bins are narrow where the words are (a few thousandths of a distance unit at the
vocabulary's bulk), so about 98–99% of proposals are accepted on GloVe-50d at ε = 2–3 (density's
prior included), one float64 distance each. Per process and sampler, the only ε-dependent set-up
is the R × B categorical (one to a few million entries at R = 512, tens of milliseconds), so a
worker's first chunk no longer fills distance rows.

Tries per token are bounded by `max_tries` (the caller then draws the token by the exact scan,
with fresh randomness: still exact, see envelope.py). The Generator is consumed in an order
fixed by the ids and the draws themselves.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from privtext.index import EmbeddingIndex
from privtext.mechanisms.envelope import (
    guide_table,
    guided_columns,
    paired_artifact,
    proposal_rounds,
)
from privtext.mechanisms.sampling import open_uniform

SORTED_ORDER_ARTIFACT = "sorted-rows-order"
SORTED_BINS_ARTIFACT = "sorted-rows-bins"
# 512 rows of 92k int32 ids (188 MB) at the default 100k index: the words of rank < 512 carry
# about 60% of the tokens of English text.
DEFAULT_SORTED_WORDS = 512
_BIN_POSITIONS = 64
_BIN_WIDTH = 0.05
_PRIOR_STEP = 0.1
# A prior that is only a range (0 inside, −inf outside) covering at least this share of the
# vocabulary uses the prior-free rows: proposals outside the range are rejected.
_RANGE_SHARE = 0.5
_BUILD_BATCH = 32
_REL = 1e-9



def sorted_shape(index: EmbeddingIndex, words: int | None) -> int:
    """R actually used: none when the neighbour table already holds the whole vocabulary; by
    default at most n/32 (a small vocabulary's scan is cheap; the artifact stays in proportion)."""
    if index.neighbors >= index.n:
        return 0
    if words is None:
        return min(DEFAULT_SORTED_WORDS, index.n // 32)
    return max(0, min(int(words), index.n))


def build_sorted_rows(index: EmbeddingIndex, words: int, log_prior: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """For x < R: (order, bins). order[x] (int32, n) holds every id of the vocabulary, sorted by
    its squared distance to x (ties by id) and then, with a prior, by prior level inside each
    distance bin; bins[x] (float64, (3, B)) holds each bin's first position (padded with n:
    empty bins), its lower bound ℓ_j on d(x, y) and its largest log π (see the module
    docstring)."""
    from privtext.mechanisms.fullvocab import augmented_vectors, squared_distances

    n = index.n
    aug = augmented_vectors(index)
    radius2 = float(np.max(aug[-1]))
    slack = 4.0 * (index.dim + 2) * 2.0**-53 * 1.001 * 4.0 * radius2
    order = np.empty((words, n), dtype=np.int32)
    regular = np.arange(0, n, _BIN_POSITIONS)
    rows_bins: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for a in range(0, words, _BUILD_BATCH):
        batch = np.arange(a, min(a + _BUILD_BATCH, words))
        d2 = squared_distances(aug, batch, 0, n)
        rows = np.argsort(d2, axis=1, kind="stable")
        d2.sort(axis=1, kind="stable")
        for i, x in enumerate(batch):
            ds, ids = d2[i], rows[i]
            grid = np.arange(_BIN_WIDTH, math.sqrt(ds[-1]) + _BIN_WIDTH, _BIN_WIDTH)
            cuts = np.union1d(regular, np.searchsorted(ds, grid * grid, side="left"))
            cuts = cuts[cuts < n]
            lower = np.sqrt(np.maximum(ds[cuts] - slack, 0.0)) * (1.0 - _REL)
            if log_prior is None:
                top = np.zeros(len(cuts))
            else:
                # Inside each distance bin, words by prior level (steps of _PRIOR_STEP in log π,
                # highest first), cut at every change of level: π varies by less than
                # exp(_PRIOR_STEP) inside a bin, and words outside the range (log π = −inf) form
                # bins of mass 0. Every word of a distance bin keeps that bin's ℓ.
                dbin = np.zeros(n, dtype=np.int64)
                dbin[cuts[1:]] = 1
                np.cumsum(dbin, out=dbin)
                lp = log_prior[ids]
                with np.errstate(invalid="ignore"):
                    level = np.where(np.isfinite(lp), np.floor(lp / _PRIOR_STEP), -np.inf)
                perm = np.lexsort((-level, dbin))
                ids, level, dbin = ids[perm], level[perm], dbin[perm]
                change = (dbin[1:] != dbin[:-1]) | (level[1:] != level[:-1])
                sub = np.concatenate([[0], np.flatnonzero(change) + 1])
                lower = lower[dbin[sub]]
                top = np.maximum.reduceat(log_prior[ids], sub)
                cuts = sub
            order[x] = ids
            rows_bins.append((cuts, lower, top))
    width = max(len(c) for c, _, _ in rows_bins)
    bins = np.empty((words, 3, width), dtype=np.float64)
    for x, (cuts, lower, top) in enumerate(rows_bins):
        bins[x, 0, : len(cuts)], bins[x, 0, len(cuts) :] = cuts, n
        bins[x, 1, : len(cuts)], bins[x, 1, len(cuts) :] = lower, lower[-1]
        bins[x, 2, : len(cuts)], bins[x, 2, len(cuts) :] = top, -np.inf
    return order, bins


def _sorted_artifact(index: EmbeddingIndex, which: int, words: int, log_prior: np.ndarray | None
                     ) -> np.ndarray:
    """One of the two arrays of `build_sorted_rows`, cached with the index (one build for both:
    the second is kept in memory until its own file is written). With a prior, the files are
    keyed by the prior's bytes."""
    digest = "flat" if log_prior is None else hashlib.sha256(
        np.ascontiguousarray(log_prior, dtype=np.float64).tobytes()).hexdigest()[:24]
    name = SORTED_ORDER_ARTIFACT if which == 0 else SORTED_BINS_ARTIFACT
    params = {"version": 1, "words": words, "positions": _BIN_POSITIONS, "width": repr(_BIN_WIDTH),
              "prior_step": repr(_PRIOR_STEP), "prior": digest}
    return paired_artifact(index, which, ("sorted", str(index.path), words, digest), name, params,
                           lambda ix: build_sorted_rows(ix, words, log_prior))


class SortedRowSampler:
    """Rejection sampler for the words x < R from their distance-sorted rows (module docstring).
    `log_prior` is over the whole vocabulary: max 0 inside the candidate range, −inf outside."""

    def __init__(self, index: EmbeddingIndex, scale: float, *, log_prior: np.ndarray,
                 clamp: float, words: int | None, max_tries: int):
        self.index = index
        self.scale = float(scale)
        self.clamp = float(clamp)
        self.log_prior = log_prior
        self.flat_prior = bool((log_prior == 0.0).all())
        # The prior-free rows serve a flat prior, and a wide range with a flat prior inside it
        # (SanText+); any other prior gets rows built for it (bins of near-equal π).
        in_range = np.isfinite(log_prior)
        range_only = bool((log_prior[in_range] == 0.0).all()) and in_range.mean() >= _RANGE_SHARE
        self.artifact_prior: np.ndarray | None = None if range_only else log_prior
        self.words = sorted_shape(index, words)
        self.max_tries = int(max_tries)
        self.round_tries = 1
        self._ready = False
        self.proposals = 0  # diagnostics of this process
        self.tokens = 0

    def prepare(self) -> None:
        if self.words:
            _sorted_artifact(self.index, 0, self.words, self.artifact_prior)
            _sorted_artifact(self.index, 1, self.words, self.artifact_prior)

    def _setup(self) -> None:
        if self._ready:
            return
        n = self.index.n
        self.order = _sorted_artifact(self.index, 0, self.words, self.artifact_prior)
        bins = np.asarray(_sorted_artifact(self.index, 1, self.words, self.artifact_prior))
        self.starts = bins[:, 0].astype(np.int32)  # positions < n < 2³¹
        self.counts = np.diff(self.starts, axis=1, append=np.full((self.words, 1), n, dtype=np.int32))
        self.lower = np.minimum(bins[:, 1], self.clamp)  # min(ℓ_j, c), as the bound uses it
        # log π̂_j: kept only when the prior is not flat (the prior-free rows hold zeros there).
        self.top = None if self.flat_prior else np.ascontiguousarray(bins[:, 2])
        self.width = self.starts.shape[1]
        with np.errstate(divide="ignore"):
            logm = np.log(self.counts.astype(np.float64)) - self.scale * self.lower
        if self.top is not None:
            logm += self.top
        logm -= logm.max(axis=1, keepdims=True)
        np.exp(logm, out=logm)
        np.cumsum(logm, axis=1, out=logm)
        logm /= logm[:, -1:]
        self.cum = logm  # per word: cumulative bin masses, ending at 1
        self.guide = guide_table(logm, 4096)
        self.vectors = np.asarray(self.index.vectors)
        self._ready = True

    def sample(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, done) for ids < R: outputs[i] is valid where done[i]; the others exhausted
        max_tries and must be drawn by the exact scan (with fresh randomness)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.full(0, -1, dtype=np.int64), np.zeros(0, dtype=bool)
        self._setup()
        self.tokens += len(ids)
        # Later rounds (fewer tokens, lower acceptance) double their proposals at once.
        out, done, proposals = proposal_rounds(len(ids), self.round_tries, self.max_tries,
                                               lambda tok, k: self._round(ids[tok], k, rng),
                                               busy=len(ids))
        self.proposals += proposals
        return out, done

    def _round(self, x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k proposals for each token of word x; (accepted, the first accepted proposal)."""
        t = len(x)
        u = open_uniform(rng, t * k)
        expo = rng.standard_exponential(t * k)
        rows = np.repeat(x, k)
        j = guided_columns(self.cum, self.guide, rows, u)
        flat = rows * self.width + j
        pos = self.starts.reshape(-1)[flat] + rng.integers(0, self.counts.reshape(-1)[flat].astype(np.int64))
        y = np.asarray(self.order[rows, pos], dtype=np.int64)
        diff = self.vectors.take(y, axis=0).astype(np.float64)  # float64, as in envelope.py
        diff -= self.vectors.take(rows, axis=0)
        dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        excess = self.scale * (np.minimum(dist, self.clamp) - self.lower.reshape(-1)[flat])
        if self.top is not None:  # log π̂_j − log π(y): +inf outside the range (never accepted)
            excess += self.top.reshape(-1)[flat] - self.log_prior[y]
        accept = (expo > excess).reshape(t, k)
        got = accept.any(axis=1)
        first = accept.argmax(axis=1)
        return got, y.reshape(t, k)[np.arange(t), first]
