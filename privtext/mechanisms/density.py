"""Density-aware prior (`density`): Feyisetan, Aggarwal, Xu, Teissier, FLAIRS 2021.

Contract: mechanisms.md §6. π is a Gaussian kernel density estimate over the public vocabulary
vectors, π(z) = (1/n) Σ_j N(z; φ(j), h²I), with bandwidth h by Scott's rule,
h = σ̄ · n^(−1/(m+4)) with σ̄² = trace(Cov)/m, unless given. It depends on public vectors only.

Two samplers:

* `sampler=exact` (default): P[y | x] ∝ π(y) · exp(−ε d(x, y)/2) over the whole vocabulary. The
  ratio for two inputs is at most exp(ε d(x, x')/2) in the numerator times exp(ε d(x, x')/2) in
  the normaliser, since π does not depend on x: metric DP at rate ε. log π(y) at every vocabulary
  word is computed once per (index, h) and cached with the index (n² kernel terms in float64
  blocks, about a minute at 92k words). Sampling uses `FullVocabularySampler` with log π as the
  log prior: exact envelope rejection with π inside the proposal (sorted rows built for the
  prior for the most frequent words, cluster bounds for the other listed words).
* `sampler=mh`: the paper's continuous form, density ∝ π(z) · exp(−ε‖z − φ(x)‖) over R^m, by
  Metropolis–Hastings with the §1 Laplace noise around φ(x) as an independence proposal (so the
  acceptance ratio is π(z')/π(z)), starting from a proposal draw; after `chain` steps the
  nearest vocabulary word is output. At stationarity the ratio is bounded by exp(2ε d(x, x'))
  (the normaliser contributes the second ε); a finite chain only approximates that, so the
  guarantee is labelled approximate. Independently of mixing, the finite chain's output is a
  function of its T + 1 Laplace proposals and of uniforms and π values that do not depend on x,
  so it satisfies metric DP at rate (T + 1)·ε: the report states that rigorous, looser bound too.
  Each step evaluates π at every chain state over all n kernel centres (float64), vectorised over
  the chunk: it is a research sampler, much slower than `exact`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import EmbeddingIndex, Geometry
from privtext.mechanisms.base import (
    ExponentialForm,
    Guarantee,
    Mechanism,
    MechanismParams,
    pair_distances,
    pair_ids,
    param,
)
from privtext.mechanisms.fullvocab import (
    FullVocabularySampler,
    augmented_vectors,
    squared_distances,
)
from privtext.mechanisms.laplace import laplace_noise
from privtext.mechanisms.nearest import nearest_words
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import open_uniform

DEFAULT_CHAIN = 20
PRIOR_VERSION = 1
_KDE_BATCH = 128


@dataclass(frozen=True)
class DensityParams(MechanismParams):
    sampler: str = param("exact", "exact: categorical over the vocabulary (metric DP at rate ε); "
                                  "mh: the paper's continuous form by Metropolis–Hastings "
                                  "(approximate)", choices=("exact", "mh"))
    chain: int | None = param(None, f"Metropolis–Hastings steps per token (default {DEFAULT_CHAIN}; "
                                    "sampler=mh only)", min=1, max=100_000)
    bandwidth: float | None = param(None, "kernel bandwidth h of the density estimate (default: "
                                          "Scott's rule)", min=0, min_open=True)

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        if self.sampler != "mh" and self.chain is not None:
            raise ParameterError("--param chain applies only with --param sampler=mh")

    @property
    def chain_length(self) -> int:
        return self.chain if self.chain is not None else DEFAULT_CHAIN


def scott_bandwidth(vectors: np.ndarray) -> float:
    """h = σ̄ · n^(−1/(m+4)), σ̄² the mean per-dimension variance (Scott's rule, isotropic)."""
    v = np.asarray(vectors, dtype=np.float64)
    n, m = v.shape
    sigma = math.sqrt(float(v.var(axis=0, ddof=1).mean()))
    return sigma * n ** (-1.0 / (m + 4))


def log_kde_at(aug: np.ndarray, centroid: np.ndarray, points: np.ndarray, bandwidth: float) -> np.ndarray:
    """log π(z) for arbitrary points z (rows, float64), over all n kernel centres."""
    n = aug.shape[1]
    m = aug.shape[0] - 2
    const = -math.log(n) - 0.5 * m * math.log(2.0 * math.pi * bandwidth**2)
    out = np.empty(len(points), dtype=np.float64)
    shifted = points - centroid
    buf = np.empty((min(_KDE_BATCH, len(points)), n), dtype=np.float64)
    for start in range(0, len(points), _KDE_BATCH):
        z = shifted[start : start + _KDE_BATCH]
        query = np.empty((len(z), m + 2), dtype=np.float64)
        query[:, :m] = -2.0 * z
        query[:, m] = np.einsum("ij,ij->i", z, z)
        query[:, m + 1] = 1.0
        d2 = buf[: len(z)]
        np.matmul(query, aug, out=d2)
        np.maximum(d2, 0.0, out=d2)
        nearest = d2.min(axis=1, keepdims=True)
        d2 -= nearest
        d2 *= -0.5 / bandwidth**2
        np.exp(d2, out=d2)
        out[start : start + len(z)] = np.log(d2.sum(axis=1)) - 0.5 * nearest[:, 0] / bandwidth**2
    return out + const


def build_log_prior(index: EmbeddingIndex, bandwidth: float) -> np.ndarray:
    """log π(y) at every vocabulary word (float64), blockwise: never an n × n array."""
    n, m = index.n, index.dim
    aug = augmented_vectors(index)
    const = -math.log(n) - 0.5 * m * math.log(2.0 * math.pi * bandwidth**2)
    out = np.empty(n, dtype=np.float64)
    buf = np.empty((min(256, n), n), dtype=np.float64)
    for start in range(0, n, 256):
        words = np.arange(start, min(start + 256, n))
        d2 = buf[: len(words)]
        squared_distances(aug, words, 0, n, out=d2)
        d2 *= -0.5 / bandwidth**2
        np.exp(d2, out=d2)  # the self term is exp(0) = 1, so the sum never underflows
        out[words] = np.log(d2.sum(axis=1))
    return out + const


@register
class DensityMechanism(Mechanism):
    name = "density"
    summary = ("exponential mechanism weighted by a kernel density prior over the vocabulary "
               "(exact), or the paper's continuous form by Metropolis–Hastings (mh)")
    reference = "Feyisetan, Aggarwal, Xu, Teissier. FLAIRS 2021"
    guarantee_summary = ("exact: metric DP at rate ε (Euclidean); mh: rate 2ε at stationarity, "
                         "approximate for a finite chain")
    Params = DensityParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        p = self.dparams
        self.bandwidth = p.bandwidth if p.bandwidth is not None else scott_bandwidth(index.vectors)
        self._log_prior: np.ndarray | None = None
        self._sampler: FullVocabularySampler | None = None
        self._centroid: np.ndarray | None = None
        self._aug: np.ndarray | None = None

    @property
    def dparams(self) -> DensityParams:
        assert isinstance(self.params, DensityParams)
        return self.params

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        assert isinstance(params, DensityParams)
        bandwidth = "Scott's rule" if params.bandwidth is None else f"h = {params.bandwidth:g}"
        prior = (f"π is a Gaussian kernel density estimate over the public vocabulary vectors "
                 f"({bandwidth}); it does not depend on the input")
        if params.sampler == "exact":
            return Guarantee(
                kind="metric", rate=epsilon, metric=geometry.metric,
                per_token_pure_bound=epsilon * geometry.delta_max,
                statement=(f"metric DP at rate ε = {epsilon:g} per unit of Euclidean distance: "
                           "for any two words x, x' and output y, P[y|x] ≤ exp(ε·d(x, x'))·P[y|x']"),
                conditions=(
                    "P[y|x] ∝ π(y)·exp(−ε·d(x, y)/2) over the whole vocabulary (exact sampling in "
                    "float64: table weights plus envelope rejection, or inverse CDF)",
                    prior,
                    f"per-token pure bound ε·Δ_max with Δ_max = {geometry.delta_max:.4g} "
                    f"({geometry.delta_max_kind})",
                ),
            )
        chain = params.chain_length
        rate = 2.0 * epsilon
        return Guarantee(
            kind="metric", rate=rate, metric=geometry.metric,
            per_token_pure_bound=rate * geometry.delta_max,
            statement=(f"approximately metric DP at rate 2ε = {rate:g} per unit of Euclidean "
                       f"distance: the bound holds for the chain's stationary distribution, and a "
                       f"chain of {chain} steps only approximates it"),
            conditions=(
                "target density ∝ π(z)·exp(−ε‖z − φ(x)‖) over R^m, then the nearest vocabulary word",
                f"Metropolis–Hastings with {chain} steps, Laplace(ε) proposals around φ(x) "
                "(independence sampler), started from a proposal",
                prior,
                f"rigorous for the finite chain: metric DP at rate (chain + 1)·ε = "
                f"{(chain + 1) * epsilon:g} (the output depends on x only through the "
                f"{chain + 1} Laplace proposals)",
            ),
            caveats=("approximate: how close a finite chain is to stationarity is not measured",),
            approximate=True,
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """rate·d(x, x'): ε·d for the exact sampler; for mh the stated (approximate) 2ε·d."""
        x, x2 = pair_ids(x_ids, x2_ids)
        return self.guarantee.rate * pair_distances(self.index, x, x2)

    def closed_form(self) -> ExponentialForm | None:
        if self.dparams.sampler != "exact":
            return None  # a finite Metropolis–Hastings chain has no closed form
        return ExponentialForm(scale=self.epsilon / 2.0, log_prior=np.asarray(self.log_prior))

    @property
    def log_prior(self) -> np.ndarray:
        if self._log_prior is None:
            h = self.bandwidth
            self._log_prior = self.index.derived_artifact(
                "density-log-prior", {"bandwidth": repr(float(h)), "version": PRIOR_VERSION},
                lambda ix: build_log_prior(ix, h))
        return self._log_prior

    @property
    def sampler(self) -> FullVocabularySampler:
        if self._sampler is None:
            self._sampler = FullVocabularySampler(self.index, self.epsilon / 2.0,
                                                  log_prior=np.asarray(self.log_prior))
        return self._sampler

    def prepare(self) -> None:
        augmented_vectors(self.index)
        if self.dparams.sampler == "exact":
            _ = self.log_prior
            self.sampler.prepare()  # the envelope's reverse-neighbour list, before workers start

    def derived(self) -> dict[str, Any]:
        p = self.dparams
        out: dict[str, Any] = {
            "sampler": p.sampler,
            "bandwidth": self.bandwidth,
            "bandwidth_rule": "Scott's rule" if p.bandwidth is None else "given",
        }
        if p.sampler == "mh":
            out.update({"chain_length": p.chain_length, "proposals_per_token": p.chain_length + 1,
                        "approximate": True,
                        "rigorous_finite_chain_rate": (p.chain_length + 1) * self.epsilon})
        return out

    def probabilities(self, word: int) -> np.ndarray:
        """Exact output distribution of `word` under the exact sampler (for audits and tests)."""
        return self.sampler.probabilities(word)

    def log_density(self, points: np.ndarray) -> np.ndarray:
        """log π at arbitrary points (float64 rows)."""
        if self._centroid is None or self._aug is None:
            self._centroid = np.asarray(self.index.vectors, dtype=np.float64).mean(axis=0)
            self._aug = augmented_vectors(self.index)
        return log_kde_at(self._aug, self._centroid, np.asarray(points, dtype=np.float64),
                          self.bandwidth)

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.dparams.sampler == "exact":
            return self.sampler.sample(ids, rng)
        return self._metropolis_hastings(ids, rng)

    def _metropolis_hastings(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        count, dim = len(ids), self.index.dim
        if count == 0:
            return ids.copy()
        origin = np.asarray(self.index.vectors[ids], dtype=np.float64)
        state = origin + laplace_noise(rng, count, dim, self.epsilon)
        log_pi = self.log_density(state)
        for _ in range(self.dparams.chain_length):  # chain steps, each vectorised over tokens
            proposal = origin + laplace_noise(rng, count, dim, self.epsilon)
            log_pi_proposal = self.log_density(proposal)
            accept = np.log(open_uniform(rng, count)) < log_pi_proposal - log_pi
            state[accept] = proposal[accept]
            log_pi[accept] = log_pi_proposal[accept]
        out, _ = nearest_words(self.index, state, ids, k=1)
        return out[:, 0]
