"""Truncated exponential mechanism (`tem`): Carvalho, Vasiloudis, Feyisetan, SDM 2023.

Contract: mechanisms.md §3. The exponential mechanism with utility u(x, y) = −min(d(x, y), γ):

    P[y | x] ∝ exp(−(ε/2) · min(d(x, y), γ)),

sampled exactly through the ⊥ construction. With L_x = {y : d(x, y) ≤ γ} (x included), the
scores −d(x, y) for y in L_x and −γ + (2/ε)·ln|V \\ L_x| for a bottom element ⊥ get independent
Gumbel(0, 2/ε) noise and the argmax wins; if ⊥ wins, the output is a uniformly random word of
V \\ L_x. ⊥ carries mass |V \\ L_x|·e^{−εγ/2}, i.e. exactly e^{−εγ/2} for each word outside L_x,
which is the exponential mechanism above.

γ = (2/ε)·ln((1 − β)·n/β) bounds P(⊥) ≤ β. The guarantee is metric DP at rate ε: the utility
changes by at most min(d(x, x'), γ) between inputs (triangle inequality).

Two exact samplers, chosen per token:

* L_x fits the neighbour table (its K-th distance exceeds γ, or the table holds the whole
  vocabulary): the rows are sorted, so L_x is a prefix of the row, found by one comparison.
  Gumbel-max over the prefix plus ⊥, vectorised over the chunk. A ⊥ draw picks the j-th word of
  the complement directly: with L_x's ids sorted as l_0 < l_1 < ..., the j-th (0-based) id not in
  L_x is j + #{i : l_i − i ≤ j}. No retry loop.
* L_x is wider than the table: `FullVocabularySampler` with clamp γ draws P ∝ exp(−(ε/2)·min(d, γ))
  over the whole vocabulary exactly, never over a silently smaller set: the weight min(d, γ)
  already holds ⊥'s mass spread over the complement, so one draw samples "⊥ then uniform
  complement" and the L_x words in a single step, the same distribution as above (table weights
  plus envelope rejection, see envelope.py; sorted rows and cluster bounds for frequent words).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import Geometry
from privtext.mechanisms.base import (
    ExponentialForm,
    Guarantee,
    Mechanism,
    MechanismParams,
    pair_distances,
    pair_ids,
    param,
)
from privtext.mechanisms.fullvocab import FullVocabularySampler
from privtext.mechanisms.laplace import metric_guarantee
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import standard_gumbel

_TABLE_SLICE = 32768


@dataclass(frozen=True)
class TemParams(MechanismParams):
    beta: float = param(0.001, "bound on the probability that the output falls outside the "
                               "threshold set L_x (it sets γ)", min=0, max=1,
                        min_open=True, max_open=True)

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        if (1.0 - self.beta) * geometry.n / self.beta <= 1.0:
            limit = geometry.n / (geometry.n + 1)
            raise ParameterError(
                f"--param beta={self.beta} gives a threshold γ ≤ 0 on this vocabulary of "
                f"{geometry.n} words; valid: (0, {limit:.6g})"
            )


def threshold(epsilon: float, beta: float, n: int) -> float:
    """γ = (2/ε)·ln((1 − β)·n/β)."""
    return 2.0 / epsilon * math.log((1.0 - beta) * n / beta)


def complement_ids(members: np.ndarray, sizes: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The j[i]-th (0-based) id not among members[i, :sizes[i]] (ids distinct, any order)."""
    width = members.shape[1]
    if width == 0:
        return j.copy()
    padded = np.where(np.arange(width)[None, :] < sizes[:, None], members, np.iinfo(np.int64).max // 2)
    padded = np.sort(padded, axis=1)
    shifted = padded - np.arange(width)[None, :]
    return j + (shifted <= j[:, None]).sum(axis=1)


@register
class TruncatedExponentialMechanism(Mechanism):
    name = "tem"
    summary = ("exponential mechanism with utility −min(d, γ), sampled exactly: Gumbel-max over "
               "the words within γ plus one bottom element for all the others")
    reference = "Carvalho, Vasiloudis, Feyisetan. SDM 2023"
    guarantee_summary = "metric DP at rate ε (Euclidean); per-token pure bound ε·Δ_max"
    Params = TemParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        p: TemParams = self.params  # type: ignore[assignment]
        self.gamma = threshold(self.epsilon, p.beta, index.n)
        self.table_is_whole_vocabulary = index.neighbors >= index.n
        self.wide = FullVocabularySampler(index, self.epsilon / 2.0, clamp=self.gamma)

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        assert isinstance(params, TemParams)
        gamma = threshold(epsilon, params.beta, geometry.n)
        return metric_guarantee(
            epsilon, geometry, geometry.metric,
            f"metric DP at rate ε = {epsilon:g} per unit of Euclidean distance: for any two words "
            f"x, x' and output y, P[y|x] ≤ exp(ε·d(x, x'))·P[y|x']",
            conditions=(
                f"exponential mechanism with utility −min(d(x, y), γ), γ = (2/ε)·ln((1 − β)·n/β) "
                f"= {gamma:.6g} (β = {params.beta:g}, n = {geometry.n}); P(output outside L_x) ≤ β",
                "sampled exactly: Gumbel-max over L_x plus a bottom element, complement by index; "
                "L_x from the exact neighbour table, or the exact whole-vocabulary sampler beyond it",
                f"per-token pure bound ε·Δ_max with Δ_max = {geometry.delta_max:.4g} "
                f"({geometry.delta_max_kind}); the utility's range also bounds it by ε·γ = "
                f"{epsilon * gamma:.4g}",
            ),
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """ε·min(d(x, x'), γ): the utility −min(d, γ) changes by at most min(d(x, x'), γ)
        between inputs, and the exponential mechanism pays that twice at ε/2."""
        x, x2 = pair_ids(x_ids, x2_ids)
        return self.epsilon * np.minimum(pair_distances(self.index, x, x2), self.gamma)

    def closed_form(self) -> ExponentialForm:
        return ExponentialForm(scale=self.epsilon / 2.0, clamp=self.gamma)

    def derived(self) -> dict[str, Any]:
        fits = self._fits(np.arange(self.index.n))
        return {
            "gamma": self.gamma,
            "beta": self.params.beta,  # type: ignore[attr-defined]
            "words_whose_L_x_fits_the_table": float(fits.mean()),
            "wide_sampler": "exact: rejection from sorted rows, cluster bounds or table-radius bins",
        }

    def prepare(self) -> None:
        if not self._fits(np.arange(self.index.n)).all():
            self.wide.prepare()

    def _fits(self, ids: np.ndarray) -> np.ndarray:
        if self.table_is_whole_vocabulary:
            return np.ones(len(ids), dtype=bool)
        # Rows are sorted, so every word outside the row is at least the K-th distance away.
        return np.asarray(self.index.neighbor_dist[ids, -1]) > self.gamma

    def probabilities(self, word: int) -> np.ndarray:
        """Exact output distribution of `word` over the vocabulary (for audits and tests)."""
        return self.wide.probabilities(word)

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(len(ids), dtype=np.int64)
        if len(ids) == 0:
            return out
        fits = self._fits(ids)
        narrow = np.flatnonzero(fits)
        # Slices bound the (tokens × table width) work arrays to a few tens of MB.
        for start in range(0, len(narrow), _TABLE_SLICE):
            part = narrow[start : start + _TABLE_SLICE]
            out[part] = self._from_table(ids[part], rng)
        wide = np.flatnonzero(~fits)
        if len(wide):
            out[wide] = self.wide.sample(ids[wide], rng)
        return out

    def _from_table(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = self.index.n
        half_eps = self.epsilon / 2.0
        dist = np.asarray(self.index.neighbor_dist[ids], dtype=np.float64)
        sizes = (dist <= self.gamma).sum(axis=1)  # L_x is a prefix of the sorted row
        width = int(sizes.max())
        scores = np.empty((len(ids), width + 1), dtype=np.float64)
        np.multiply(dist[:, :width], -half_eps, out=scores[:, :width])
        scores[:, :width][np.arange(width)[None, :] >= sizes[:, None]] = -np.inf
        outside = n - sizes
        with np.errstate(divide="ignore"):  # ln 0 = −inf: an empty complement never wins
            scores[:, width] = -half_eps * self.gamma + np.log(outside.astype(np.float64))
        choice = np.argmax(scores + standard_gumbel(rng, scores.shape), axis=1)
        bottom = choice == width
        result = np.empty(len(ids), dtype=np.int64)
        top = np.flatnonzero(~bottom)
        result[top] = self.index.neighbor_ids[ids[top], choice[top]]
        low = np.flatnonzero(bottom)
        if len(low):
            members = np.asarray(self.index.neighbor_ids[ids[low], :width], dtype=np.int64)
            j = rng.integers(0, outside[low])
            result[low] = complement_ids(members, sizes[low], j)
        return result
