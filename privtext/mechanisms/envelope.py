"""Exact sampling of P[y | x] ∝ π(y)·exp(−s·min(d(x, y), c)) without scanning the vocabulary.

Used by `FullVocabularySampler` (santext, density exact, tem beyond the table). An exact list N_x
gives the exact weights of the words nearest to x; every other word is drawn by rejection from an
envelope that dominates its weight, so no normaliser over V is ever needed.

The exact list and its radius r_x (a certified lower bound on d(x, y) for every y ∉ N_x):

* Plain words: N_x = T_x, x's table row (the K nearest words), and r_x = κ_x, where κ_y is
  d_K(y), the K-th table distance of y, lowered by a safety margin (see `tail_radius`).
* The W most frequent words (x < W, default 8192): N_x = the M nearest words (default 2048), an
  index artifact (`build_extended`), always containing T_x; r_x = max(ρ_x, κ_x) where ρ_x is the
  M-th squared distance of the float64 selection minus its proven rounding error (every unlisted
  word has a squared value at least the M-th), then a relative 1e-9. As T_x ⊆ N_x, an unlisted
  word is outside T_x too, so κ_x is also a valid bound. A wider list leaves only far words to
  the envelope, whose bound is then much tighter (GloVe-50d, ε = 3: about 7 proposals per token
  instead of 19).

Why every word outside N_x is covered by a bound that needs no scan:

* y ∉ N_x ⇒ d(x, y) ≥ r_x (above).
* If also x ∉ T_y, then d(x, y) ≥ κ_y: y's row holds its K nearest words.
* So for y outside N_x and outside R_x = {y : x ∈ T_y} (x's reverse neighbours),
  d(x, y) ≥ L(x, y) = max(r_x, κ_y), and as the weight is non-increasing in the distance,
  w(y) ≤ b(y) = π(y)·exp(−s·min(L(x, y), c)).
* For y ∈ E_x = R_x \\ T_x ⊇ R_x \\ N_x only the first bound holds: w(y) ≤ e_x = exp(−s·min(r_x, c))
  (π is normalised to max 1).

The proposal is the mixture with unnormalised mass

    g(y) = w(y)                          for y ∈ N_x   (exact weights)
    g(y) = b(y) + [y ∈ E_x]·e_x          otherwise     (b over all words, plus E_x uniformly)

and a proposal y is accepted with probability w(y)/g(y): always from the exact part, never when
another part proposes a word of N_x (its mass comes from the exact part alone), else the ratio,
realised as "accept when an Exp(1) variate exceeds log g(y) − log w(y)" (probability
exp(−(log g − log w)) = w/g). Accepted mass is g(y)·w(y)/g(y) = w(y) for every y, so the first
accepted proposal has exactly the target distribution — whatever the unknown tail mass is, and
without computing it. Each bound-part proposal costs one float64 distance d(x, y) (from the
stored float32 vectors); membership in N_x or E_x is only checked when d is within the list's or
y's table reach (no member is farther), with the same relative 1e-9 margin.

b(y) is sampled without a scan because it depends on x only through r_x. Once per sampler, the
words of the range are sorted by κ_y and cut into bins (32 quantile bins, split further so that
no bin is wider than 0.2 in κ); a bin B with smallest value κ_B gets the envelope
b(y) = π(y)·exp(−s·min(max(r_x, κ_B), c)) ≥ π(y)·exp(−s·min(L(x, y), c)) for each of its words:
still a valid bound, looser by at most exp(s·0.2) inside a bin. A bin's mass for x is then
Π_B·exp(−s·min(max(r_x, κ_B), c)) with Π_B = Σ_{y∈B} π(y) precomputed. The bins with κ_B ≤ r_x
all carry the same factor exp(−s·min(r_x, c)), so they form one part, "low", of mass
exp(−s·min(r_x, c))·Σ_{B low} Π_B, drawn as one inverse CDF by π over a prefix of the κ order (an
exact integer draw without a prior; with one, a cumulative sum from the first word, searched from
a guide table and settled by exact comparisons, so the guide cannot change the answer). Merging
needs Π over the prefix as one float64 sum, so it is used only when log π spans at most 600 nats;
otherwise every bin is its own part (the same bound, the same code). A word's proposal is thus a
categorical over [exact list, low, bin 1 … bin B, E_x] (built once per distinct word of a
chunk), then a word of the part: by inverse CDF over the exact weights, by π over the low prefix
or inside the bin (uniformly, by an exact integer draw, without a prior), uniformly over E_x
(a reverse-neighbour list cached with the index). The density prior is part of the proposal and
costs no envelope slack. The extended lists' cumulative weights depend only on (x, s, c, π), so
each process keeps them for its later chunks (bounded by W·M float64); the Generator never sees
that cache.

Tries: each round draws `k` proposals per pending token and keeps the first accepted one (the
proposals are i.i.d., so the first acceptance in order is the rejection sampler's output); k
starts at `round_tries` and doubles (up to 64) once few tokens are pending, a choice made before
the round's proposals are drawn, so it cannot bias them. After `max_tries` proposals a token falls
back to the exact scan (`fullvocab`), drawing afresh: the first-acceptance value is independent
of when it happens, so the mixture is still exact, and the running time per token is bounded.
Tokens of words with an extended list are drawn first, then the others. The Generator is consumed
in an order fixed by the chunk's ids and the draws themselves (never by worker count, cache or
history).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from privtext.index import EmbeddingIndex
from privtext.mechanisms.sampling import open_uniform

REVERSE_ARTIFACT = "reverse-neighbours"
EXTENDED_IDS_ARTIFACT = "extended-neighbours-ids"
EXTENDED_DIST_ARTIFACT = "extended-neighbours-dist"
# The most frequent words get an exact list of their M nearest words (an index artifact): the
# envelope then only bounds words beyond a radius near the M-th distance, which is much tighter
# than the table's K-th distance (measured on GloVe-50d at ε = 3: about 7 proposals per token
# instead of 19 for ranks up to 8192).
DEFAULT_EXTENDED_WORDS = 8192
DEFAULT_EXTENDED_WIDTH = 2048
_BUILD_BATCH = 64
DEFAULT_MAX_TRIES = 4096
DEFAULT_ROUND_TRIES = 4
# Proposals per token in later rounds grow to this: few pending tokens make a round's fixed cost
# (a few dozen numpy calls) dominate, and they are the words with the lowest acceptance.
_MAX_ROUND_TRIES = 64
_SLICE_PROPOSALS = 16384
_BUSY_ROUND = 4096  # while more tokens than this are pending, rounds keep round_tries each
# Merging the bins below κ_x into one part needs Π over them as one float64 cumulative sum,
# exact only while π's range leaves every word far above underflow.
_MERGE_PRIOR_RANGE = 600.0
_GUIDE = 1 << 17
_QUANTILE_BINS = 32
_BIN_WIDTH = 0.2
# Relative margin between distances computed by different float64 formulas (about 1e-14 apart).
_REL = 1e-9


def build_reverse_neighbours(index: EmbeddingIndex) -> np.ndarray:
    """E_x = {y : x ∈ T_y, y ∉ T_x} for every x, packed as [offsets (n + 1), members] int64."""
    n = index.n
    table = np.asarray(index.neighbor_ids, dtype=np.int64)
    k = table.shape[1]
    owner = np.repeat(np.arange(n, dtype=np.int64), k)
    member = table.reshape(-1)
    forward = owner * n + member  # key of "member ∈ T_owner"
    # reverse pair (x = member, y = owner): y ∈ R_x; drop it when y ∈ T_x (key x·n + y present).
    reverse = member * n + owner
    keep = ~np.isin(reverse, forward) & (member != owner)
    xs, ys = member[keep], owner[keep]
    order = np.lexsort((ys, xs))
    xs, ys = xs[order], ys[order]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(xs, minlength=n), out=offsets[1:])
    return np.concatenate([offsets, ys])


def tail_radius(index: EmbeddingIndex) -> np.ndarray:
    """κ_y: a certified lower bound on d(y, z) for every z outside y's table row.

    The table's K-th distance d_K(y) is exact in float64, but the row was selected by float32
    distances, so a word just beyond the row could be nearer than d_K(y) by float32 rounding:
    at most (m + 4)·2⁻²⁴·(‖φ(y)‖ + ‖φ(z)‖)² in the squared distance (the bound for either the
    direct or the ‖a‖² + ‖b‖² − 2a·b form in any summation order). κ_y subtracts twice that
    (with the largest vector norm), and a relative 1e-9 for float64 rounding."""
    geo = index.geometry
    d_k = np.asarray(index.neighbor_dist[:, -1], dtype=np.float64)
    slack = 2.0 * (geo.dim + 4) * 2.0**-24 * (2.0 * geo.max_norm) ** 2
    return np.sqrt(np.maximum(d_k * d_k - slack, 0.0)) * (1.0 - _REL)


def extended_shape(index: EmbeddingIndex, words: int, width: int | None) -> tuple[int, int]:
    """(W, M) actually used: no extended lists unless M lies strictly between K and n. The
    default M is at most n/16, so that a small vocabulary (whose scan is cheap anyway) does not
    get an artifact out of proportion to its index."""
    if width is None:
        width = min(DEFAULT_EXTENDED_WIDTH, index.n // 16)
    words, width = min(int(words), index.n), int(width)
    if words <= 0 or not index.neighbors < width < index.n:
        return 0, 0
    return words, width


_PENDING: dict[tuple[object, ...], np.ndarray] = {}


def build_extended(index: EmbeddingIndex, words: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For x < W: the ids of its M nearest words sorted by id (int32, (W, M)), and (W, M + 2)
    float64 [their distances by the direct float64 formula, ρ_x, the largest of those distances].

    ρ_x is a certified lower bound on d(x, y) for every y outside the list. The list is selected
    by float64 squared distances of centred augmented vectors (one matrix product per batch, as
    the scan computes them), whose error is at most (m + 2)·2⁻⁵³·(1 + 1e-3)·4R² with R the
    largest centred norm; ρ_x subtracts four times that from the M-th smallest squared value, then
    a relative 1e-9 (every unlisted word has a squared value at least the M-th). The list always
    contains x's table row T_x, so every unlisted word is also at least κ_x away."""
    from privtext.mechanisms.fullvocab import augmented_vectors, squared_distances

    n = index.n
    aug = augmented_vectors(index)
    vectors = np.asarray(index.vectors)
    table = np.asarray(index.neighbor_ids, dtype=np.int64)
    radius2 = float(np.max(aug[-1]))
    slack = 4.0 * (index.dim + 2) * 2.0**-53 * 1.001 * 4.0 * radius2
    ids = np.empty((words, width), dtype=np.int32)
    dist = np.empty((words, width + 2), dtype=np.float64)
    for a in range(0, words, _BUILD_BATCH):
        batch = np.arange(a, min(a + _BUILD_BATCH, words))
        d2 = squared_distances(aug, batch, 0, n)
        part = np.argpartition(d2, width - 1, axis=1)[:, :width]
        picked = np.take_along_axis(d2, part, axis=1)
        floor = picked.max(axis=1)  # the M-th smallest: every unlisted word is at least this
        for i, x in enumerate(batch):
            missing = np.setdiff1d(table[x], part[i])
            if len(missing):  # near-ties at the table's edge: put T_x back in, lower ρ_x to match
                row = part[i]
                drop = np.setdiff1d(row, table[x])[np.argsort(-d2[i, np.setdiff1d(row, table[x])])][: len(missing)]
                keep = row[~np.isin(row, drop)]
                part[i] = np.concatenate([keep, missing])
                floor[i] = min(floor[i], float(d2[i, drop].min()))
        part.sort(axis=1)
        diff = np.subtract(vectors[part], vectors[batch][:, None, :], dtype=np.float64)
        direct = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        ids[batch] = part
        dist[batch, :width] = direct
        dist[batch, width] = np.sqrt(np.maximum(floor - slack, 0.0)) * (1.0 - _REL)
        dist[batch, width + 1] = direct.max(axis=1)
    return ids, dist


def paired_artifact(index: EmbeddingIndex, which: int, key: tuple[object, ...], name: str,
                    params: dict[str, object],
                    build_pair: Callable[[EmbeddingIndex], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Array `which` (0 or 1) of a pair that one build makes, cached with the index as its own
    derived file: building the first keeps the second in memory (under `key`) until its file is
    written, so the pair is computed once."""
    def build(ix: EmbeddingIndex) -> np.ndarray:
        if which == 1 and key in _PENDING:
            return _PENDING.pop(key)
        pair = build_pair(ix)
        if which == 0:
            _PENDING[key] = pair[1]
        return pair[which]

    return index.derived_artifact(name, params, build)


def _extended_artifact(index: EmbeddingIndex, which: int, words: int, width: int) -> np.ndarray:
    """One of the two arrays of `build_extended`, cached with the index."""
    name = EXTENDED_IDS_ARTIFACT if which == 0 else EXTENDED_DIST_ARTIFACT
    return paired_artifact(index, which, ("extended", str(index.path), words, width), name,
                           {"version": 1, "words": words, "width": width},
                           lambda ix: build_extended(ix, words, width))


class EnvelopeSampler:
    """Rejection sampler for P[y | x] ∝ exp(log_prior(y) − scale·min(d(x, y), clamp)) over
    the ids [lo, hi); see the module docstring for why it is exact."""

    def __init__(self, index: EmbeddingIndex, scale: float, *, lo: int, hi: int,
                 log_prior: np.ndarray | None, clamp: float | None,
                 max_tries: int = DEFAULT_MAX_TRIES, round_tries: int = DEFAULT_ROUND_TRIES,
                 extended_words: int = DEFAULT_EXTENDED_WORDS, extended_width: int | None = None):
        self.index = index
        self.scale = float(scale)
        self.lo, self.hi = int(lo), int(hi)
        self.clamp = math.inf if clamp is None else float(clamp)
        self.max_tries = int(max_tries)
        self.round_tries = max(1, int(round_tries))
        n = index.n
        # log π over the whole vocabulary, max 0 inside the range, −inf outside it.
        lp = np.full(n, -np.inf)
        if log_prior is None:
            lp[self.lo : self.hi] = 0.0
        else:
            inside = np.asarray(log_prior[self.lo : self.hi], dtype=np.float64)
            lp[self.lo : self.hi] = inside - inside.max()
        self.log_prior = lp
        self.whole_table = index.neighbors >= n
        # Whether log π is 0 on the whole vocabulary (plain santext, tem): no prior to gather.
        self.flat_prior = bool((lp == 0.0).all())
        self._ext_cum: np.ndarray | None = None
        self._ext_total: np.ndarray | None = None
        self._ext_have: np.ndarray | None = None
        self.ext_words, self.ext_width = (0, 0) if self.whole_table else extended_shape(
            index, extended_words, extended_width)
        self._ready = False
        self.proposals = 0  # proposals drawn and tokens sampled in this process (diagnostics)
        self.tokens = 0

    # -- per-sampler structures (built lazily in each process) -----------------------------------

    def _setup(self) -> None:
        if self._ready:
            return
        index = self.index
        self.table = np.asarray(index.neighbor_ids)
        self.table_dist = np.asarray(index.neighbor_dist)
        self.d_k = np.asarray(index.neighbor_dist[:, -1], dtype=np.float64)
        self.kappa = tail_radius(index)
        self.vectors = np.asarray(index.vectors)
        if not self.whole_table:
            packed = index.derived_artifact(REVERSE_ARTIFACT, {"version": 1}, build_reverse_neighbours)
            self.rev_offsets = np.asarray(packed[: index.n + 1])
            self.rev_members = packed[index.n + 1 :]
            if self.ext_words:
                self.ext_ids = _extended_artifact(index, 0, self.ext_words, self.ext_width)
                self.ext_dist = _extended_artifact(index, 1, self.ext_words, self.ext_width)
            self._bins()
        self._ready = True

    def _bins(self) -> None:
        """Range words sorted by κ and cut into bins; a bin's envelope uses its smallest κ."""
        ids = np.arange(self.lo, self.hi)
        kap = self.kappa[ids]
        order = np.argsort(kap, kind="stable")
        self.perm = ids[order]
        ks = kap[order]
        size = len(ids)
        # Quantile cuts keep bins small where words are dense; a grid of width _BIN_WIDTH bounds
        # the envelope's slack inside a bin (at most exp(s·width)) where they are sparse.
        cuts = np.concatenate([np.linspace(0, size, _QUANTILE_BINS + 1)[:-1].astype(np.int64),
                               np.searchsorted(ks, np.arange(ks[0], ks[-1], _BIN_WIDTH))])
        starts = np.unique(np.clip(cuts, 0, size - 1))
        starts = starts[np.concatenate([[True], ks[starts[1:]] > ks[starts[:-1]]])] if len(starts) > 1 else starts
        self.bin_start = starts
        self.bin_size = np.diff(np.append(starts, size))
        self.bin_kappa = ks[starts]  # the smallest κ of each bin: L ≥ max(κ_x, bin_kappa)
        self.bin_of = np.zeros(self.index.n, dtype=np.int64)
        self.bin_of[self.perm] = np.repeat(np.arange(len(starts)), self.bin_size)
        lp = self.log_prior[self.perm]
        top = np.maximum.reduceat(lp, starts)
        rel = np.exp(lp - np.repeat(top, self.bin_size))
        self.bin_log_prior = top + np.log(np.add.reduceat(rel, starts))
        self.uniform_bins = bool((lp == 0.0).all())
        if not self.uniform_bins:
            # Cumulative π inside each bin (restarted per bin, so no cancellation between bins).
            self.local_cum = np.empty(size)
            for a, m in zip(starts, self.bin_size, strict=True):
                np.cumsum(rel[a : a + m], out=self.local_cum[a : a + m])
            self._local_steps = max(1, math.ceil(math.log2(int(self.bin_size.max()))) + 1)
        self.bin_end = self.bin_start + self.bin_size
        finite = lp[np.isfinite(lp)]
        self.merge_low = bool(len(finite)) and float(finite.max() - finite.min()) <= _MERGE_PRIOR_RANGE
        # log Σ π over bins 0..B (the merged low part's prior mass), and π cumulated over the
        # κ order from the first word: a prefix is sampled by one inverse CDF, with no cancellation.
        self.low_log_prior = np.logaddexp.accumulate(self.bin_log_prior)
        if self.merge_low and not self.uniform_bins:
            self.prefix_cum = np.cumsum(np.exp(lp))
            # guide[g]: how many entries are ≤ g/G of the total, a starting point for the
            # inverse CDF that is then corrected by exact comparisons (a few steps at most).
            grid = np.arange(_GUIDE) * (self.prefix_cum[-1] / _GUIDE)
            self.guide = np.searchsorted(self.prefix_cum, grid, side="right")

    def prepare(self) -> None:
        if not self.whole_table:
            self.index.derived_artifact(REVERSE_ARTIFACT, {"version": 1}, build_reverse_neighbours)
        if self.ext_words:
            _extended_artifact(self.index, 0, self.ext_words, self.ext_width)
            _extended_artifact(self.index, 1, self.ext_words, self.ext_width)

    # -- per distinct word ---------------------------------------------------------------------------

    def _word_terms(self, words: np.ndarray, extended: bool = False) -> dict[str, np.ndarray]:
        """Per word: the cumulative masses of the proposal parts [exact list, low, bin 0 … bin
        B−1, E] (normalised to end at 1) and the exact part's cumulative weights. The exact list
        N_x is the table row T_x (radius κ_x), or with `extended` the M nearest words (radius
        max(ρ_x, κ_x), valid as N_x ⊇ T_x)."""
        s, c = self.scale, self.clamp
        if extended:
            ext_tail = np.asarray(self.ext_dist[words, self.ext_width :])
            radius, reach = np.maximum(ext_tail[:, 0], self.kappa[words]), ext_tail[:, 1]
            rows, cum, a_table = self._extended_weights(words)
            list_row = words
        else:
            rows = np.asarray(self.table[words], dtype=np.int64)
            radius, reach = self.kappa[words], self.d_k[words]
            cum, a_table = self._list_weights(rows, np.asarray(self.table_dist[words]))
            list_row = np.arange(len(words))
        # rows[list_row[w]] and cum[list_row[w]] are the exact list of the word in row w.
        terms: dict[str, np.ndarray] = {"rows": rows, "cum": cum, "list_row": list_row}
        if self.whole_table:
            terms["parts"] = np.ones((len(words), 1))
            return terms
        kx = radius
        nbins = len(self.bin_start)
        # Columns: [table, low, bin 0 … bin B−1, E]. "low" merges the bins with κ_B ≤ κ_x, whose
        # bound π(y)·exp(−s·min(κ_x, c)) is the same multiple of π(y) for all of them, so one
        # draw over their words by π replaces a search among them; those bins get mass 0.
        n_low = np.searchsorted(self.bin_kappa, kx, side="right") if self.merge_low else np.zeros(len(words), dtype=np.int64)
        parts = np.empty((len(words), nbins + 3))
        parts[:, 0] = a_table
        cut = -s * np.minimum(kx, c)
        with np.errstate(divide="ignore"):
            parts[:, 1] = np.where(n_low > 0, self.low_log_prior[np.maximum(n_low - 1, 0)] + cut, -np.inf)
        parts[:, 2:-1] = self.bin_log_prior[None, :] - s * np.minimum(
            np.maximum(kx[:, None], self.bin_kappa[None, :]), c)
        parts[:, 2:-1][np.arange(nbins)[None, :] < n_low[:, None]] = -np.inf
        rev_start = self.rev_offsets[words]
        rev_size = self.rev_offsets[words + 1] - rev_start
        with np.errstate(divide="ignore"):
            parts[:, -1] = np.log(rev_size.astype(np.float64)) + cut
        parts -= parts.max(axis=1, keepdims=True)
        np.exp(parts, out=parts)
        np.cumsum(parts, axis=1, out=parts)
        parts /= parts[:, -1:]
        low_end = np.where(n_low > 0, self.bin_end[np.maximum(n_low - 1, 0)], 0)
        terms.update(parts=parts, rev_start=rev_start, rev_size=rev_size, kappa=kx, d_k=reach,
                     low_end=low_end, sorted=np.array(extended))
        return terms

    def _list_weights(self, rows: np.ndarray, list_dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative weights of exact lists (shifted by each row's maximum) and their log totals."""
        s, c = self.scale, self.clamp
        lw = -s * np.minimum(list_dist, c)
        if not self.flat_prior:
            lw += self.log_prior[rows]
        top = lw.max(axis=1)
        finite = np.isfinite(top)
        shift = np.where(finite, top, 0.0)
        lw -= shift[:, None]
        np.exp(lw, out=lw)
        cum = np.cumsum(lw, axis=1, out=lw)
        with np.errstate(divide="ignore"):
            a_table = np.where(finite, shift + np.log(cum[:, -1]), -np.inf)
        return cum, a_table

    def _extended_weights(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, cumulative weights, log totals) of the extended lists, indexed by word id. The
        weights are deterministic, so they are kept for the process's later chunks (at most
        W·M float64, only rows actually used become resident); the Generator never sees the
        cache."""
        if self._ext_cum is None:
            self._ext_cum = np.zeros((self.ext_words, self.ext_width))
            self._ext_total = np.zeros(self.ext_words)
            self._ext_have = np.zeros(self.ext_words, dtype=bool)
        assert self._ext_total is not None and self._ext_have is not None
        missing = words[~self._ext_have[words]]
        for a in range(0, len(missing), 256):  # batches keep the temporaries in cache
            batch = missing[a : a + 256]
            rows = np.asarray(self.ext_ids[batch], dtype=np.int64)
            cum, total = self._list_weights(rows, np.asarray(self.ext_dist[batch, : self.ext_width]))
            self._ext_cum[batch] = cum
            self._ext_total[batch] = total
            self._ext_have[batch] = True
        return self.ext_ids, self._ext_cum, self._ext_total[words]

    # -- sampling ------------------------------------------------------------------------------------

    def sample(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, done): outputs[i] is valid where done[i]; the others exhausted max_tries
        and must be drawn by the exact scan (with fresh randomness)."""
        self._setup()
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), -1, dtype=np.int64)
        done = np.zeros(len(ids), dtype=bool)
        if len(ids) == 0:
            return out, done
        self.tokens += len(ids)
        # Words with an extended list first, then the others: an order fixed by the ids.
        ext = ids < self.ext_words
        for group, extended in ((np.flatnonzero(ext), True), (np.flatnonzero(~ext), False)):
            if len(group):
                out[group], done[group] = self._sample_group(ids[group], extended, rng)
        return out, done

    def _sample_group(self, ids: np.ndarray, extended: bool, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        words, inverse = np.unique(ids, return_inverse=True)
        terms = self._word_terms(words, extended)
        out, done, proposals = proposal_rounds(
            len(ids), self.round_tries, self.max_tries,
            lambda tok, k: self._round(ids[tok], inverse[tok], k, terms, rng))
        self.proposals += proposals
        return out, done

    def _round(self, x: np.ndarray, w: np.ndarray, k: int, terms: dict[str, np.ndarray],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k proposals for each token (x: word ids, w: rows of the per-word terms); returns
        (accepted, output) with the first accepted proposal of each token."""
        t = len(x)
        s, c = self.scale, self.clamp
        u = open_uniform(rng, (2, t, k))
        u_part, u_pick = u[0], u[1]
        parts = terms["parts"]
        if parts.shape[1] == 1:  # the table is the whole vocabulary: every proposal is exact
            return np.ones(t, dtype=bool), self._exact_part(terms, w, u_pick[:, 0])
        # An exponential variate per proposal for the acceptance test: accepting when
        # E > log g(y) − log w(y) happens with probability w(y)/g(y).
        expo = rng.standard_exponential((t, k))
        pw = parts[w]  # (t, columns): each token's cumulative part masses
        table_p = u_part < pw[:, 0:1]
        low_p = ~table_p & (u_part < pw[:, 1:2])
        y = np.zeros((t, k), dtype=np.int64)

        sel = np.nonzero(table_p)  # the exact part (table or extended list): always accepted
        if len(sel[0]):
            y[sel] = self._exact_part(terms, w[sel[0]], u_pick[sel])

        sel = np.nonzero(low_p)  # the merged bins below κ_x, by π over their words
        if len(sel[0]):
            end = terms["low_end"][w[sel[0]]]
            if self.uniform_bins:
                pos = rng.integers(0, end)
            else:
                target = u_pick[sel] * self.prefix_cum[end - 1]
                pos = np.minimum(_guided_search(self.prefix_cum, self.guide, target), end - 1)
            y[sel] = self.perm[pos]

        rest = ~table_p & ~low_p
        sel = np.nonzero(rest)
        col = np.zeros((t, k), dtype=np.int64)
        if len(sel[0]):
            col[sel] = search_rows(parts, w[sel[0]], u_part[sel])
        last = parts.shape[1] - 1
        sel = np.nonzero(rest & (col < last))  # one bin above κ_x
        if len(sel[0]):
            b = col[sel] - 2
            start, size = self.bin_start[b], self.bin_size[b]
            if self.uniform_bins:
                j = rng.integers(0, size)
            else:
                j = _search_segments(self.local_cum, start, size, u_pick[sel], self._local_steps)
            y[sel] = self.perm[start + j]

        rev = rest & (col == last)
        sel = np.nonzero(rev)  # reverse neighbours beyond the table, uniformly
        if len(sel[0]):
            r = w[sel[0]]
            j = rng.integers(0, terms["rev_size"][r])
            y[sel] = self.rev_members[terms["rev_start"][r] + j]

        # Distances for every proposal in a (t, k, m) block: x's row is gathered once per token
        # (the table-part proposals' distances are computed but unused).
        # Gathered with take, widened, then the input's row subtracted in place: the same float64
        # values as subtracting in float64, without the mixed-type ufunc's slow casting loop.
        diff = self.vectors.take(y.reshape(-1), axis=0).astype(np.float64).reshape(t, k, -1)
        diff -= self.vectors.take(x, axis=0)[:, None, :]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        kx = terms["kappa"][w][:, None]
        # Bound b(y) = π(y)·exp(−s·min(max(κ_x, κ_B), c)) with B the bin holding y (the prior
        # cancels in w/b); it is the same function of (x, y) whichever part proposed y.
        excess = s * (np.minimum(dist, c) - np.minimum(np.maximum(kx, self.bin_kappa[self.bin_of[y]]), c))
        accept = table_p | (~table_p & (expo > excess))
        # Membership in T_x or E_x only needs checking when d is within the table radii.
        near = np.nonzero(~table_p & (dist <= np.maximum(terms["d_k"][w][:, None], self.d_k[y]) * (1.0 + _REL)))
        if len(near[0]):
            xn, yn = x[near[0]], y[near]
            in_table = self._in_list(terms, w[near[0]], yn)
            in_reverse = (self.table[yn] == xn[:, None]).any(axis=1) & ~in_table
            # g(y) = b(y) + e_x for y ∈ E_x: log g − log w = log(1 + e_x/b(y)) + excess.
            lb = -s * np.minimum(np.maximum(kx[near[0], 0], self.bin_kappa[self.bin_of[yn]]), c)
            lw = self.log_prior[yn] - s * np.minimum(dist[near], c)
            with np.errstate(invalid="ignore"):  # −inf − (−inf) for an out-of-range y: rejected
                gap = np.logaddexp(self.log_prior[yn] + lb, -s * np.minimum(kx[near[0], 0], c)) - lw
            accept[near] = ~in_table & np.where(in_reverse, expo[near] > gap, accept[near])
        # A reverse-neighbour proposal may lie outside the candidate range: never accepted.
        sel = np.nonzero(rev)
        if len(sel[0]):
            accept[sel] &= np.isfinite(self.log_prior[y[sel]])
        got = accept.any(axis=1)
        first = accept.argmax(axis=1)
        return got, y[np.arange(t), first]

    @staticmethod
    def _exact_part(terms: dict[str, np.ndarray], r: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Inverse CDF over the exact list of word rows r (its cumulative weights)."""
        cum = terms["cum"]
        width = cum.shape[1]
        r = terms["list_row"][r]
        j = first_above(cum.reshape(-1), r * width, width, u * cum[r, -1])
        return terms["rows"][r, np.minimum(j, width - 1)]

    @staticmethod
    def _in_list(terms: dict[str, np.ndarray], r: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether y is in the exact list of word row r (sorted by id when extended)."""
        rows = terms["rows"]
        r = terms["list_row"][r]
        if not terms["sorted"]:
            return (rows[r] == y[:, None]).any(axis=1)
        width = rows.shape[1]
        j = first_above(rows.reshape(-1), r * width, width, y - 1)  # first entry ≥ y
        return rows[r, np.minimum(j, width - 1)] == y


def proposal_rounds(count: int, first_round: int, max_tries: int,
                    propose: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
                    busy: int = _BUSY_ROUND) -> tuple[np.ndarray, np.ndarray, int]:
    """Rejection sampling for `count` tokens in rounds: each round gives every pending token k
    proposals (`propose(tokens, k)` -> (accepted, first accepted output)), k doubling (up to
    _MAX_ROUND_TRIES) once at most `busy` tokens are pending, in slices of at most
    _SLICE_PROPOSALS proposals, until every token is done or `max_tries` proposals were made.
    Returns (outputs, done, proposals made); a token not done must be drawn another way."""
    out = np.full(count, -1, dtype=np.int64)
    done = np.zeros(count, dtype=bool)
    pending = np.arange(count)
    tries = proposals = 0
    k = first_round
    while len(pending) and tries < max_tries:
        if len(pending) <= busy and tries:
            k = min(2 * k, _MAX_ROUND_TRIES)
        k = min(k, max_tries - tries)
        still = []
        step = max(1, _SLICE_PROPOSALS // k)
        for start in range(0, len(pending), step):
            tok = pending[start : start + step]
            got, value = propose(tok, k)
            out[tok[got]] = value[got]
            done[tok[got]] = True
            still.append(tok[~got])
        proposals += len(pending) * k
        pending = np.concatenate(still)
        tries += k
    return out, done, proposals


def first_above(flat: np.ndarray, base: np.ndarray, width: int, targets: np.ndarray) -> np.ndarray:
    """For each i, the number of entries of the non-decreasing run flat[base[i] : base[i] + width]
    that are ≤ targets[i] (so `width` when none exceeds it): a binary search vectorised over i."""
    lo = np.zeros(len(base), dtype=np.int64)
    hi = np.full(len(base), width, dtype=np.int64)
    for _ in range(max(1, math.ceil(math.log2(width + 1)))):
        mid = (lo + hi) >> 1
        right = (flat[base + np.minimum(mid, width - 1)] <= targets) & (lo < hi)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right, hi, mid)
    return lo


def _guided_search(cum: np.ndarray, guide: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The number of entries of the non-decreasing `cum` that are ≤ target (np.searchsorted,
    side right), started from the guide table and settled by exact comparisons: the guide is only
    a hint, so its own rounding cannot change the answer."""
    g = np.minimum((target * (len(guide) / cum[-1])).astype(np.int64), len(guide) - 1)
    pos = guide[np.maximum(g, 0)]
    last = len(cum) - 1
    back = np.flatnonzero((pos > 0) & (cum[np.maximum(pos - 1, 0)] > target))
    while len(back):  # the hint overshot: step back while the previous entry is still > target
        pos[back] -= 1
        back = back[(pos[back] > 0) & (cum[np.maximum(pos[back] - 1, 0)] > target[back])]
    ahead = np.flatnonzero((pos <= last) & (cum[np.minimum(pos, last)] <= target))
    while len(ahead):  # step forward while the entry is still ≤ target
        pos[ahead] += 1
        ahead = ahead[(pos[ahead] <= last) & (cum[np.minimum(pos[ahead], last)] <= target[ahead])]
    return pos


def search_rows(table: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each i, the first column j with table[rows[i], j] > u[i] (rows non-decreasing and
    ending at 1, u < 1): a binary search vectorised over the proposals."""
    width = table.shape[1]
    flat = table.reshape(-1)
    base = rows * width
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), width - 1, dtype=np.int64)
    for _ in range(max(1, math.ceil(math.log2(width)))):
        mid = (lo + hi) >> 1
        right = flat[base + mid] <= u
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right, hi, mid)
    return lo


def _search_segments(cum: np.ndarray, start: np.ndarray, size: np.ndarray, u: np.ndarray,
                     steps: int) -> np.ndarray:
    """Inverse CDF inside segments cum[start : start + size] (each cumulative from its start):
    the first offset j with cum[start + j] > u·cum[start + size − 1]."""
    target = u * cum[start + size - 1]
    lo = np.zeros(len(start), dtype=np.int64)
    hi = size - 1
    for _ in range(steps):
        mid = (lo + hi) >> 1
        right = cum[start + mid] <= target
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right, hi, mid)
    return np.minimum(lo, size - 1)


GUIDE_CELLS = 1024  # a power of two: u·G and g/G are exact in float64


def guide_table(cum: np.ndarray, cells: int = GUIDE_CELLS) -> np.ndarray:
    """For rows of non-decreasing cumulative masses in [0, 1] (each ending at 1): guide[r, g] =
    the number of entries of row r that are ≤ g/G, for g < G. Counted exactly: with G a power
    of two, cum·G is exact, and cum ≤ g/G ⟺ ⌈cum·G⌉ ≤ g."""
    rows, width = cum.shape
    level = np.minimum(np.ceil(cum * cells), cells).astype(np.int64)
    flat = (np.arange(rows, dtype=np.int64) * (cells + 1))[:, None] + level
    counts = np.bincount(flat.reshape(-1), minlength=rows * (cells + 1)).reshape(rows, cells + 1)
    dtype = np.int16 if width < (1 << 15) else np.int32
    return np.cumsum(counts[:, :cells], axis=1).astype(dtype)


def guided_columns(cum: np.ndarray, guide: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each i, the first column j with cum[rows[i], j] > u[i] (u in (0, 1), rows ending at
    1): `search_rows`' answer, started from the guide table and settled by exact comparisons
    (the entries counted by guide[r, ⌊u·G⌋] are all ≤ ⌊u·G⌋/G ≤ u, so the answer is at or after
    it); a few steps instead of a binary search over the whole row."""
    cells = guide.shape[1]
    width = cum.shape[1]
    g = (u * cells).astype(np.int64)
    col = guide.reshape(-1)[rows * cells + g].astype(np.int64)
    flat = cum.reshape(-1)
    base = rows * width
    active = np.flatnonzero(flat[base + col] <= u)
    while len(active):  # step forward while the entry is still ≤ u (the last entry, 1, is not)
        col[active] += 1
        active = active[flat[base[active] + col[active]] <= u[active]]
    return col
