"""Vickrey (`vickrey`): Xu, Aggarwal, Feyisetan, Teissier, PrivateNLP 2021.

Contract: mechanisms.md §5. Take the noisy point of `laplace` (§1) or, with `base=mahalanobis`,
of §4; find its two nearest vocabulary words w₁, w₂ (exact search, d₁ ≤ d₂) and output w₂ with
probability t·d₁ / (t·d₁ + (1 − t)·d₂), else w₁. The choice depends only on the noisy point, so
it is post-processing of the base mechanism: the guarantee is the base mechanism's.

The noise is drawn first, exactly as the base mechanism draws it, then one open uniform per token
decides between w₁ and w₂; with t = 0 the output is therefore the base mechanism's output for the
same random stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import Geometry
from privtext.mechanisms.base import (
    Guarantee,
    Mechanism,
    MechanismParams,
    pair_distances,
    pair_ids,
    param,
)
from privtext.mechanisms.laplace import LaplaceMechanism, laplace_noise
from privtext.mechanisms.mahalanobis import (
    DEFAULT_LAMBDA,
    check_lambda,
    mahalanobis_distances,
    mahalanobis_guarantee,
    mahalanobis_noise,
    shape_sqrt_artifact,
)
from privtext.mechanisms.nearest import NearestSearch, SearchParams, nearest_words
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import open_uniform


@dataclass(frozen=True)
class VickreyParams(SearchParams):
    t: float = param(0.75, "weight towards the second-nearest word: w₂ is output with "
                           "probability t·d₁/(t·d₁ + (1 − t)·d₂)", min=0, max=1)
    base: str = param("laplace", "the noise of the base mechanism",
                      choices=("laplace", "mahalanobis"))
    lam: float | None = param(None, f"λ of the mahalanobis base (default {DEFAULT_LAMBDA})",
                              min=0, max=1, max_open=True)

    def validate(self, geometry: Geometry) -> None:
        if self.lam is not None:
            check_lambda(self.lam)
        super().validate(geometry)
        if self.base != "mahalanobis" and self.lam is not None:
            raise ParameterError("--param lam applies only with --param base=mahalanobis")

    @property
    def shape_lambda(self) -> float:
        return self.lam if self.lam is not None else DEFAULT_LAMBDA


def second_probability(d1: np.ndarray, d2: np.ndarray, t: float) -> np.ndarray:
    """P[output w₂] = t·d₁ / (t·d₁ + (1 − t)·d₂); 0 when the noisy point sits on w₁ with t = 1."""
    num = t * d1
    den = num + (1.0 - t) * d2
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def choose(nearest: np.ndarray, dist: np.ndarray, t: float, rng: np.random.Generator) -> np.ndarray:
    """Vickrey's choice between the two nearest words (columns 0 and 1), one uniform per token."""
    second = open_uniform(rng, len(nearest)) < second_probability(dist[:, 0], dist[:, 1], t)
    return np.where(second, nearest[:, 1], nearest[:, 0])


@register
class VickreyMechanism(NearestSearch, Mechanism):
    name = "vickrey"
    summary = ("noisy point as in laplace (or mahalanobis); output the second-nearest word with "
               "a probability set by t and the two distances")
    reference = "Xu, Aggarwal, Feyisetan, Teissier. PrivateNLP 2021"
    guarantee_summary = "the base mechanism's guarantee (post-processing of laplace or mahalanobis)"
    Params = VickreyParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        self._sqrt: np.ndarray | None = None

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        assert isinstance(params, VickreyParams)
        suffix = (f"; Vickrey's choice between the two nearest words (t = {params.t:g}) is "
                  f"post-processing of the {params.base} noise")
        if params.base == "mahalanobis":
            return mahalanobis_guarantee(epsilon, params.shape_lambda, geometry, suffix, params.search)
        base = LaplaceMechanism.privacy_map(epsilon, SearchParams(search=params.search), geometry)
        return Guarantee(
            kind=base.kind, rate=base.rate, metric=base.metric,
            per_token_pure_bound=base.per_token_pure_bound,
            statement=base.statement + suffix,
            conditions=(*base.conditions, "the choice between w₁ and w₂ uses only the noisy point "
                                          "and fresh randomness (post-processing)"),
            caveats=base.caveats,
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """The base mechanism's map (the choice between w₁ and w₂ is post-processing): ε·d
        (laplace) or ε·d_M (mahalanobis)."""
        x, x2 = pair_ids(x_ids, x2_ids)
        if self.vparams.base == "mahalanobis":
            out = self.epsilon * mahalanobis_distances(self.index, self._sqrt_shape(), x, x2)
        else:
            out = self.epsilon * pair_distances(self.index, x, x2)
        out[x == x2] = 0.0
        return out

    @property
    def vparams(self) -> VickreyParams:
        assert isinstance(self.params, VickreyParams)
        return self.params

    def _sqrt_shape(self) -> np.ndarray:
        if self._sqrt is None:
            self._sqrt = np.asarray(shape_sqrt_artifact(self.index, self.vparams.shape_lambda),
                                    dtype=np.float64)
        return self._sqrt

    def prepare(self) -> None:
        if self.vparams.base == "mahalanobis":
            self._sqrt_shape()
        self.prepare_search()

    def derived(self) -> dict[str, Any]:
        p = self.vparams
        out: dict[str, Any] = {"t": p.t, "base": p.base,
                               "radius_distribution": f"Gamma(shape={self.index.dim}, "
                                                      f"scale={1 / self.epsilon:.6g})"}
        if p.base == "mahalanobis":
            out["lambda"] = p.shape_lambda
        out.update(self.search_info())
        return out

    def noise(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.vparams.base == "mahalanobis":
            return mahalanobis_noise(rng, count, self._sqrt_shape(), self.epsilon)
        return laplace_noise(rng, count, self.index.dim, self.epsilon)

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        noisy = np.asarray(self.index.vectors[ids], dtype=np.float64)
        noisy += self.noise(rng, len(ids))
        nearest, dist = nearest_words(self.index, noisy, ids, k=2, search=self.search, ef=self.ef_search)
        return choose(nearest, dist, self.vparams.t, rng)
