"""Truncated Gumbel (`gumbel`): Xu, Feyisetan, Aggarwal, Xu, Teissier, FLAIRS 2021.

Contract: mechanisms.md §2. Per token x: draw k ~ Poisson(λ = ln(n − 1)) conditioned on k ≥ 1,
take the k nearest words (x first), add Gumbel(0, b) noise truncated to [−Δ_max, Δ_max] to their
distances and output the argmin. The scale b comes from inverting the reconstructed guarantee

    ε(b) = 2(1 + ln n)/Δ_min + 3·exp(2Δ_max/b) / min(b, Δ_min),

which decreases in b towards ε_∞ = (2(1 + ln n) + 3)/Δ_min; ε ≤ ε_∞ is infeasible.

That published sampler alone does not give the statement for every pair (a word beyond rank K
of x is never output for x; exact checks also find the formula exceeded near ε_∞). The uniform
floor of mechanisms.md §9 (privtext.mechanisms.floor) repairs it: with `floor=auto` (default)
every pair gets ε₀ ≤ ε·Δ_min ≤ ε·d(x, x'), so the published metric statement holds for every
pair by proof. `floor=0` keeps the bare sampler for research comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import InfeasibleEpsilonError, ParameterError
from privtext.index import Geometry
from privtext.mechanisms.base import (
    Guarantee,
    Mechanism,
    MechanismParams,
    pair_distances,
    pair_ids,
    param,
)
from privtext.mechanisms.floor import (
    AUTO,
    UniformFloor,
    auto_floor,
    coin_threshold,
    parse_floor,
    pure_bound,
    realised,
)
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import open_uniform


def poisson_rate(n: int) -> float:
    return math.log(n - 1)


def min_epsilon(n: int, delta_min: float) -> float:
    """ε_∞: the infimum of ε(b) as b → ∞. Only rates strictly above it are reachable."""
    return (2.0 * (1.0 + math.log(n)) + 3.0) / delta_min


def epsilon_for_scale(b: float, n: int, delta_min: float, delta_max: float) -> float:
    """The reconstructed guarantee ε(b) (may overflow to inf for tiny b)."""
    base = 2.0 * (1.0 + math.log(n)) / delta_min
    log_term = math.log(3.0) + 2.0 * delta_max / b - math.log(min(b, delta_min))
    return base + (math.exp(log_term) if log_term < 709.0 else math.inf)


def scale_for_epsilon(epsilon: float, n: int, delta_min: float, delta_max: float) -> float:
    """Invert ε(b) by bisection on log b, in float64. Raises for ε ≤ ε_∞."""
    floor = min_epsilon(n, delta_min)
    if not epsilon > floor:
        raise InfeasibleEpsilonError(
            f"epsilon {epsilon:g} is infeasible for gumbel on this index: the rate must exceed "
            f"ε_∞ = {floor:.6g} (= (2(1 + ln n) + 3)/Δ_min with n = {n}, Δ_min = {delta_min:.6g}); "
            f"choose --epsilon above {floor:.6g}"
        )
    target = math.log(epsilon - 2.0 * (1.0 + math.log(n)) / delta_min)

    def excess(log_b: float) -> float:  # decreasing in log_b; root is the answer
        b = math.exp(log_b)
        return math.log(3.0) + 2.0 * delta_max / b - math.log(min(b, delta_min)) - target

    lo, hi = math.log(1e-12), math.log(1e-6)
    while excess(hi) > 0:  # grow the bracket: ε(b) approaches ε_∞ only slowly
        lo, hi = hi, hi + 5.0
        if hi > 700:
            raise InfeasibleEpsilonError(
                f"epsilon {epsilon:g} is too close to ε_∞ = {floor:.6g} to calibrate in float64; "
                "choose a larger --epsilon"
            )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def candidate_count_cdf(lam: float, width: int) -> tuple[np.ndarray, float]:
    """CDF of k ~ Poisson(λ) | k ≥ 1 at k = 1..width, and the mass P(k > width | k ≥ 1)."""
    ks = np.arange(1, width + 400, dtype=np.float64)
    log_pmf = ks * math.log(lam) - lam - np.array([math.lgamma(k + 1) for k in ks])
    log_pmf -= math.log(-math.expm1(-lam))  # condition on k ≥ 1
    pmf = np.exp(log_pmf)
    tail = float(pmf[width:].sum())
    return np.cumsum(pmf[:width]), tail


def truncated_gumbel_log_uniforms(rng: np.random.Generator, shape: tuple[int, ...] | int,
                                  scale: float, bound: float) -> np.ndarray:
    """ln u for u uniform on [lo, hi] = [F(−bound), F(bound)], F the Gumbel(0, scale) CDF:
    g = −scale·ln(−ln u) is then Gumbel(0, scale) truncated to [−bound, bound] (inverse CDF)."""
    lo = math.exp(-math.exp(bound / scale)) if bound / scale < 700 else 0.0
    hi = math.exp(-math.exp(-bound / scale))
    # With lo > 0, u = lo + (hi − lo)·v stays in [lo, hi] ⊂ (0, 1) for any v in [0, 1), so the
    # plain 53-bit uniform (one pass) is safe; only lo = 0 needs uniforms that avoid 0.
    u = rng.random(shape) if lo > 0.0 else open_uniform(rng, shape)
    u *= hi - lo
    u += lo
    return np.log(u, out=u)


def truncated_gumbel(rng: np.random.Generator, shape: tuple[int, ...] | int, scale: float,
                     bound: float) -> np.ndarray:
    """Gumbel(0, scale) truncated to [−bound, bound], from `truncated_gumbel_log_uniforms`."""
    x = truncated_gumbel_log_uniforms(rng, shape, scale, bound)
    # ln u can be exactly 0 when hi rounds to 1 (bound ≫ scale): the sample is then +inf, and
    # the clip maps it to the bound, where its probability mass (≈ 0) belongs.
    with np.errstate(divide="ignore"):
        np.negative(x, out=x)
        np.log(x, out=x)
    x *= -scale
    return np.clip(x, -bound, bound, out=x)


@dataclass(frozen=True)
class GumbelParams(MechanismParams):
    floor: str | float = param(
        AUTO, "uniform floor α (mechanisms.md §9): with probability α a token becomes a uniformly "
              "random word, which bounds every pair; auto = the smallest α that makes the "
              "published metric statement hold for every pair; 0 = the bare published sampler "
              "(far pairs unprotected)", range_text="auto | 0 | [2^-40, 1]")

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        parse_floor(self.floor)


def floor_for(epsilon: float, params: MechanismParams, geometry: Geometry) -> float:
    """The realised floor α: auto = the smallest α with ε₀ ≤ ε·Δ_min (q̄ = 1), at least 2⁻⁴⁰."""
    requested = parse_floor(getattr(params, "floor", AUTO))
    if requested is None:
        return auto_floor(epsilon * geometry.delta_min, geometry.n, QBAR)
    return realised(requested)


_TOKEN_BLOCK = 1 << 15
_HEAD_COLUMNS = 32
_COUNT_GUIDE_BUCKETS = 1024  # a power of two: u·buckets is exact, so the bucket is floor of it
# q̄ = 1: no bound on max Q(y|x) below 1 is proven for truncated Gumbel (Q(x|x) can be ≈ 1).
QBAR = 1.0


@register
class TruncatedGumbelMechanism(Mechanism):
    name = "gumbel"
    summary = ("Gumbel noise on the distances to a Poisson-random number of nearest neighbours, "
               "argmin (density-aware), with a uniform floor")
    reference = "Xu, Feyisetan, Aggarwal, Xu, Teissier. FLAIRS 2021"
    guarantee_summary = ("metric DP at rate ε (Euclidean) for every pair, proven through the "
                         "uniform floor (default floor=auto); ε must exceed (2(1 + ln n) + 3)/Δ_min; "
                         "floor=0 is the bare published sampler, whose far pairs are unprotected")
    Params = GumbelParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)  # validates ε, raises when infeasible
        geo = index.geometry
        self.scale = scale_for_epsilon(self.epsilon, geo.n, geo.delta_min, geo.delta_max)
        self.lam = poisson_rate(geo.n)
        self.count_cdf, self.truncation_mass = candidate_count_cdf(self.lam, index.neighbors)
        # exactly the α the map states (the guarantee is computed from the same params)
        self.floor = UniformFloor(self.guarantee.floor or 0.0, geo.n)
        self._head: tuple[np.ndarray, np.ndarray] | None = None
        self._weights: np.ndarray | None = None
        # +inf after the last entry: a draw in the capped tail walks there and stops.
        self._count_cdf_sentinel = np.append(self.count_cdf, np.inf)
        bucket_starts = np.arange(_COUNT_GUIDE_BUCKETS, dtype=np.float64) / _COUNT_GUIDE_BUCKETS
        self._count_guide = np.searchsorted(self.count_cdf, bucket_starts, side="left")

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        if geometry.n < 3:  # λ = ln(n − 1) must be positive
            raise ParameterError("gumbel needs a vocabulary of at least 3 words; raise --vocab-size")
        b = scale_for_epsilon(epsilon, geometry.n, geometry.delta_min, geometry.delta_max)
        _, tail = candidate_count_cdf(poisson_rate(geometry.n), geometry.neighbors)
        alpha = floor_for(epsilon, params, geometry)
        n = geometry.n
        conditions = (
            f"b = {b:.6g} from ε = 2(1 + ln n)/Δ_min + 3·exp(2Δ_max/b)/min(b, Δ_min)",
            f"n = {n}, Δ_min = {geometry.delta_min:.6g} (global, exact), "
            f"Δ_max = {geometry.delta_max:.6g} ({geometry.delta_max_kind})",
            f"candidate count k ~ Poisson(λ = ln(n − 1) = {math.log(n - 1):.4g}) given k ≥ 1",
        )
        caveats = (
            "the published guarantee formula is reconstructed from a re-implementation; the "
            "paper's full text was not available",
            f"neighbour table width K = {geometry.neighbors}: P(k > K) = {tail:.3g} is capped at K",
            "Gumbel noise added to distances with argmin is the published mechanism, not the "
            "Gumbel-max form of the exponential mechanism",
        )
        if alpha == 0.0:
            return Guarantee(
                kind="metric", rate=epsilon, metric=geometry.metric, per_token_pure_bound=None,
                statement=(
                    f"floor=0 (the bare published sampler): metric DP at rate ε = {epsilon:g} per "
                    "unit of Euclidean distance is claimed as published but not proven, and pairs "
                    "whose neighbour rows differ (far pairs) are unprotected: a word beyond rank K "
                    "of x is never output for x, so the likelihood ratio is unbounded"),
                conditions=conditions,
                caveats=(*caveats,
                         "exact checks find the published formula exceeded even inside a full "
                         "table near ε_∞ (the tail of the candidate count is not accounted for); "
                         "see docs/audit.md"),
                floor=0.0, floor_qbar=None, published_statement_covered=False,
                warnings=("gumbel floor=0: the bare published sampler; pairs whose neighbour "
                          "rows differ are unprotected (unbounded likelihood ratio); use the "
                          "default floor=auto except for research comparisons",),
            )
        eps0 = pure_bound(alpha, n, QBAR)
        covered = eps0 <= epsilon * geometry.delta_min
        floor_text = (f"uniform floor α = {alpha:.6g} (realised exactly: an integer coin on "
                      f"[0, 2^53) below {coin_threshold(alpha)}), q̄ = 1")
        floor_conditions = (
            floor_text,
            f"every pair: P[y|x]/P[y|x'] ≤ 1+(1 − α)·n·q̄/α, so ε₀ = ln(1 + (1 − α)·n/α) = "
            f"{eps0:.6g} nats per token (randomized-response mixing argument, no new assumption)",
        )
        if covered:
            return Guarantee(
                kind="metric", rate=epsilon, metric=geometry.metric, per_token_pure_bound=eps0,
                statement=(
                    f"metric DP at rate ε = {epsilon:g} per unit of Euclidean distance for every "
                    f"pair of words: the uniform floor α = {alpha:.3g} gives every pair the pure "
                    f"per-token bound ε₀ = {eps0:.6g} ≤ ε·Δ_min = {epsilon * geometry.delta_min:.6g} "
                    "≤ ε·d(x, x')"),
                conditions=(*conditions, *floor_conditions),
                caveats=caveats, floor=alpha, floor_qbar=QBAR, published_statement_covered=True,
            )
        return Guarantee(
            kind="pure", rate=eps0, metric=None, per_token_pure_bound=eps0,
            statement=(
                f"pure ε₀-DP per token with ε₀ = {eps0:.6g} (uniform floor α = {alpha:.3g}); the "
                f"published metric statement at rate ε = {epsilon:g} is NOT covered: ε₀ exceeds "
                f"ε·Δ_min = {epsilon * geometry.delta_min:.6g}, so near pairs only get ε₀ "
                "(raise the floor, or use floor=auto)"),
            conditions=(*conditions, *floor_conditions),
            caveats=caveats, floor=alpha, floor_qbar=QBAR, published_statement_covered=False,
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """With a floor: ε₀ for every pair of distinct words. floor=0: ε·d where both neighbour
        rows hold the same words (the published claim, unverified), inf where they differ: an
        output in one row and not the other has probability 0 for one input only."""
        x, x2 = pair_ids(x_ids, x2_ids)
        g = self.guarantee
        if g.floor:  # the stated floor; the sampler realises exactly this α
            assert g.per_token_pure_bound is not None
            out = np.full(len(x), g.per_token_pure_bound, dtype=np.float64)
        else:
            out = self.epsilon * pair_distances(self.index, x, x2)
            if self.index.neighbors < self.index.n:
                rows = np.sort(np.asarray(self.index.neighbor_ids[x]), axis=1)
                rows2 = np.sort(np.asarray(self.index.neighbor_ids[x2]), axis=1)
                out[(rows != rows2).any(axis=1)] = np.inf
        out[x == x2] = 0.0
        return out

    @classmethod
    def feasible_epsilon(cls, params: MechanismParams, geometry: Geometry) -> tuple[float, float]:
        return min_epsilon(geometry.n, geometry.delta_min), math.inf

    def derived(self) -> dict[str, Any]:
        geo = self.index.geometry
        return {
            "gumbel_scale_b": self.scale,
            "poisson_lambda": self.lam,
            "truncation_bound": geo.delta_max,
            "epsilon_infimum": min_epsilon(geo.n, geo.delta_min),
            "candidate_cap_K": self.index.neighbors,
            "candidate_cap_mass": self.truncation_mass,
            "floor": self.floor.alpha,
            "floor_coin_threshold": self.floor.threshold,
            "floor_pure_bound": self.guarantee.per_token_pure_bound,
        }

    def sample_counts(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """k ≥ 1 per token by inverse CDF; draws beyond the table width are capped at K.

        k − 1 is the first i with cdf[i] ≥ u (a binary search would give the same). A guide
        table gives, for the bucket of u, the first i with cdf[i] ≥ the bucket's start, which is
        never past the answer; walking on while cdf[i] < u reaches it in a step or two, without
        a branchy search per token."""
        u = rng.random(size)
        i = self._count_guide[(u * _COUNT_GUIDE_BUCKETS).astype(np.int64)]
        walking = np.flatnonzero(self._count_cdf_sentinel[i] < u)
        while walking.size:
            i[walking] += 1
            walking = walking[self._count_cdf_sentinel[i[walking]] < u[walking]]
        return np.minimum(i + 1, len(self.count_cdf))

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty_like(ids)
        if ids.size == 0:
            return out
        # Blocks of tokens keep the per-candidate arrays (~12 entries a token) at a few MiB
        # whatever the chunk; the Generator is consumed block after block, in token order.
        for start in range(0, ids.size, _TOKEN_BLOCK):
            block = slice(start, start + _TOKEN_BLOCK)
            out[block] = self._sample_block(ids[block], rng)
        return self.floor.apply(ids, out, rng)

    def _sample_block(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = ids.size
        k = self.sample_counts(rng, n)
        # Tokens in decreasing order of k: the tokens that still compete at column j (k > j) are
        # then a prefix, so the argmin runs column by column over exactly sum(k) entries, with no
        # padding and no masks. Column 0 is the word itself at distance 0.
        order = np.argsort(-k.astype(np.int8), kind="stable")
        width = self.index.neighbors
        competing = n - np.cumsum(np.bincount(k, minlength=width + 1))
        widest = int(k.max())
        # argmin_j d_j + g_j with g_j = −b·ln(−ln u_j) is argmin_j ln(u_j)·exp(−d_j/b): the same
        # choice (exp is increasing; ln u_j < 0), for one logarithm a candidate instead of two.
        log_u = truncated_gumbel_log_uniforms(rng, int(competing[:widest].sum()), self.scale,
                                              self.index.geometry.delta_max)
        head_weights, head_ids = self._head_weights(), self._table_head()[1]
        head = head_ids.shape[1]
        sorted_ids = ids[order]
        rows = sorted_ids * head  # flat offsets of the tokens' rows in the head tables
        # The few tokens with k > head columns (a prefix) read their far columns from the table.
        far_rows = sorted_ids[: int(competing[head])] * width if widest > head else rows[:0]
        minus_inverse_scale = -1.0 / self.scale
        best = log_u[:n]  # column 0: the word itself, d = 0
        choice = np.zeros(n, dtype=np.int64)
        at = n
        for j in range(1, widest):
            m = int(competing[j])
            if j < head:
                score = head_weights.take(rows[:m] + j)
            else:
                score = np.asarray(self.index.neighbor_dist).reshape(-1).take(far_rows[:m] + j)
                score *= minus_inverse_scale
                np.exp(score, out=score)
            score *= log_u[at : at + m]
            at += m
            better = score < best[:m]
            np.copyto(best[:m], score, where=better)
            np.copyto(choice[:m], j, where=better)
        chosen = head_ids.take(rows + np.minimum(choice, head - 1))
        far = np.flatnonzero(choice >= head)
        if far.size:
            chosen[far] = np.asarray(self.index.neighbor_ids).reshape(-1).take(far_rows[far] + choice[far])
        out = np.empty_like(ids)
        out[order] = chosen
        return out

    def prepare(self) -> None:
        self._table_head()

    def _head_weights(self) -> np.ndarray:
        """exp(−d/b) for the head columns, flat, computed once per process: the score's only use
        of a distance, so the exponential is not taken again for every candidate (the same
        floats either way). The distances are read from the file, not through its map, so the
        process holds the weights instead of the distances, not both."""
        if self._weights is None:
            distances = self._table_head()[0]
            if isinstance(distances, np.memmap) and distances.filename is not None:
                distances = np.fromfile(distances.filename, dtype=distances.dtype,
                                        count=distances.size, offset=distances.offset)
            else:
                distances = np.array(distances)
            distances *= -1.0 / self.scale
            self._weights = np.exp(distances, out=distances)
        return self._weights

    def _table_head(self) -> tuple[np.ndarray, np.ndarray]:
        """The first columns of the neighbour table (distances, ids), flattened, from a cached
        derived file. Candidate counts beyond them have probability ~1e-7, and a worker reading
        only the head keeps a third of the table resident instead of all of it (the pages of a
        row-major table hold all 64 columns of each row)."""
        if self._head is None:
            columns = min(_HEAD_COLUMNS, self.index.neighbors)
            params = {"columns": columns}
            distances = self.index.derived_artifact(
                "table-head-distances", params,
                lambda index: np.ascontiguousarray(index.neighbor_dist[:, :columns]),
                uncached_if_read_only=True)
            ids = self.index.derived_artifact(
                "table-head-ids", params,
                lambda index: np.ascontiguousarray(index.neighbor_ids[:, :columns]),
                uncached_if_read_only=True)
            self._head = (distances.reshape(-1), np.asarray(ids))
        distances, ids = self._head
        return distances, ids


def output_distribution(distances: np.ndarray, scale: float, bound: float, lam: float,
                        grid: int = 4001) -> np.ndarray:
    """Exact P[output = column j] for one word by numerical integration over the truncated noise.

    `distances` is the word's neighbour-table row (column 0 = itself, distance 0). For each
    candidate count k, P(c wins | k) = ∫ f(g) Π_{j<k, j≠c} S(d_c + g − d_j) dg with the truncated
    Gumbel density f and survival S; the result mixes these over k ~ Poisson(λ) | k ≥ 1, capped at
    the row width exactly as the sampler caps it. Used by tests and the audit, not by sampling.
    """
    d = np.asarray(distances, dtype=np.float64)
    width = len(d)
    lo = math.exp(-math.exp(bound / scale)) if bound / scale < 700 else 0.0
    hi = math.exp(-math.exp(-bound / scale))
    mass = hi - lo
    g = np.linspace(-bound, bound, grid)
    density = np.exp(-g / scale - np.exp(-g / scale)) / (scale * mass)

    def survival(y: np.ndarray) -> np.ndarray:
        inside = np.clip(y, -bound, bound)
        s = (hi - np.exp(-np.exp(-inside / scale))) / mass
        return np.where(y < -bound, 1.0, np.where(y >= bound, 0.0, s))

    # beat[c, j, :] = P(candidate j's score exceeds candidate c's score | g_c = g)
    beat = survival(d[:, None, None] + g[None, None, :] - d[None, :, None])
    cdf, _ = candidate_count_cdf(lam, width)
    pmf_k = np.diff(np.concatenate([[0.0], cdf]))
    pmf_k[-1] += 1.0 - cdf[-1]  # the cap: k > width behaves as k = width
    probs = np.zeros(width)
    for k in range(1, width + 1):
        if pmf_k[k - 1] < 1e-300:
            continue
        sub = beat[:k, :k, :].copy()
        sub[np.arange(k), np.arange(k), :] = 1.0
        integrand = density[None, :] * np.prod(sub, axis=1)
        probs[:k] += pmf_k[k - 1] * np.trapezoid(integrand, g, axis=1)
    return probs / probs.sum()
