"""Mahalanobis (`mahalanobis`): Xu, Aggarwal, Feyisetan, Teissier, PrivateNLP 2020.

Contract: mechanisms.md §4. Elliptical noise shaped by the vocabulary covariance: with Σ the
covariance of the vocabulary vectors (float64) rescaled to trace(Σ) = m and
M = λΣ + (1 − λ)I, the noise is Z = r · M^{1/2} u with u uniform on the unit sphere and
r ~ Gamma(m, 1/ε). Then M^{−1/2}Z = r·u has density ∝ exp(−ε‖w‖), so Z has density
∝ exp(−ε‖M^{−1/2} z‖): metric DP at rate ε in the regularised Mahalanobis metric
d_M(x, x') = ‖M^{−1/2}(φ(x) − φ(x'))‖. Since Σ is positive semi-definite, every eigenvalue of M
is at least 1 − λ, so d_M ≤ d / sqrt(1 − λ): the implied Euclidean rate is ε / sqrt(1 − λ),
infinite at λ = 1, which is refused. The output is the exact Euclidean nearest word to
φ(x) + Z (post-processing). M^{1/2} (symmetric, via an eigendecomposition) is computed once per
index and cached with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import EmbeddingIndex, Geometry
from privtext.mechanisms.base import Guarantee, Mechanism, MechanismParams, pair_ids, param
from privtext.mechanisms.laplace import laplace_noise
from privtext.mechanisms.nearest import NearestSearch, SearchParams, nearest_words, search_condition
from privtext.mechanisms.registry import register

DEFAULT_LAMBDA = 0.2
SQRT_VERSION = 1


def check_lambda(lam: float) -> None:
    if lam == 1.0:
        raise ParameterError(
            "--param lam=1 is refused: the noise would follow the covariance alone and the "
            "implied Euclidean rate ε/sqrt(1 − λ) would be infinite; valid: [0, 1)"
        )


@dataclass(frozen=True)
class MahalanobisParams(SearchParams):
    lam: float = param(DEFAULT_LAMBDA, "λ: weight of the vocabulary covariance in the noise shape "
                                       "λΣ + (1 − λ)I (0 is isotropic Laplace)",
                       min=0, max=1, max_open=True)

    def validate(self, geometry: Geometry) -> None:
        check_lambda(self.lam)
        super().validate(geometry)


def normalised_covariance(vectors: np.ndarray) -> np.ndarray:
    """The vocabulary covariance in float64, rescaled so that its trace is the dimension m."""
    v = np.asarray(vectors, dtype=np.float64)
    cov = np.cov(v, rowvar=False)
    return cov * (v.shape[1] / np.trace(cov))


def shape_matrix(vectors: np.ndarray, lam: float) -> np.ndarray:
    """M = λΣ + (1 − λ)I with Σ the normalised covariance."""
    dim = vectors.shape[1]
    return lam * normalised_covariance(vectors) + (1.0 - lam) * np.eye(dim)


def sqrt_shape_matrix(index: EmbeddingIndex, lam: float) -> np.ndarray:
    """Symmetric M^{1/2} by eigendecomposition (eigenvalues clipped at 0 against rounding)."""
    values, vecs = np.linalg.eigh(shape_matrix(index.vectors, lam))
    return (vecs * np.sqrt(np.clip(values, 0.0, None))) @ vecs.T


def shape_sqrt_artifact(index: EmbeddingIndex, lam: float) -> np.ndarray:
    return index.derived_artifact("mahalanobis-sqrt", {"lambda": float(lam), "version": SQRT_VERSION},
                                  lambda ix: sqrt_shape_matrix(ix, lam))


def mahalanobis_noise(rng: np.random.Generator, count: int, sqrt_shape: np.ndarray,
                      epsilon: float) -> np.ndarray:
    """Noise with density ∝ exp(−ε‖M^{−1/2} z‖): M^{1/2} applied to isotropic Laplace noise."""
    return laplace_noise(rng, count, sqrt_shape.shape[0], epsilon) @ sqrt_shape


def mahalanobis_distances(index: EmbeddingIndex, sqrt_shape: np.ndarray, x: np.ndarray,
                          x2: np.ndarray) -> np.ndarray:
    """d_M(x, x') = ‖M^{−1/2}(φ(x) − φ(x'))‖ = ‖w‖ with M^{1/2}·w = φ(x) − φ(x') (float64)."""
    diff = (np.asarray(index.vectors[x], dtype=np.float64)
            - np.asarray(index.vectors[x2], dtype=np.float64))
    w = np.linalg.solve(np.asarray(sqrt_shape, dtype=np.float64), diff.T)
    return np.sqrt(np.einsum("ij,ij->j", w, w))


def mahalanobis_guarantee(epsilon: float, lam: float, geometry: Geometry,
                          post_processing: str = "", search: str = "exact") -> Guarantee:
    euclidean = epsilon / math.sqrt(1.0 - lam)
    return Guarantee(
        kind="metric",
        rate=epsilon,
        metric=f"regularised Mahalanobis, d_M(x, x') = ‖(λΣ + (1 − λ)I)^(−1/2)(φ(x) − φ(x'))‖ "
               f"with λ = {lam:g} and Σ the vocabulary covariance scaled to trace m",
        per_token_pure_bound=euclidean * geometry.delta_max,
        statement=(
            f"metric DP at rate ε = {epsilon:g} in the regularised Mahalanobis metric (λ = {lam:g}): "
            f"P[y|x] ≤ exp(ε·d_M(x, x'))·P[y|x']; this implies Euclidean metric DP at rate "
            f"ε/sqrt(1 − λ) = {euclidean:.6g}" + post_processing
        ),
        conditions=(
            "noise Z = r·(λΣ + (1 − λ)I)^(1/2)·u, r ~ Gamma(m, 1/ε), u uniform on the sphere",
            "Σ is the covariance of the public vocabulary vectors (float64), trace scaled to m",
            search_condition(SearchParams(search=search)),
            f"per-token pure bound ε/sqrt(1 − λ)·Δ_max with Δ_max = {geometry.delta_max:.4g} "
            f"({geometry.delta_max_kind})",
        ),
    )


@register
class MahalanobisMechanism(NearestSearch, Mechanism):
    name = "mahalanobis"
    summary = ("elliptical Laplace-type noise shaped by the vocabulary covariance, then the "
               "nearest vocabulary word")
    reference = "Xu, Aggarwal, Feyisetan, Teissier. PrivateNLP 2020"
    guarantee_summary = ("metric DP at rate ε in the regularised Mahalanobis metric; Euclidean "
                         "rate ε/sqrt(1 − λ)")
    Params = MahalanobisParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        self._sqrt: np.ndarray | None = None

    @property
    def lam(self) -> float:
        return float(self.params.lam)  # type: ignore[attr-defined]

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        assert isinstance(params, MahalanobisParams)
        return mahalanobis_guarantee(epsilon, params.lam, geometry, search=params.search)

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """ε·d_M(x, x') in the regularised Mahalanobis metric of the guarantee."""
        x, x2 = pair_ids(x_ids, x2_ids)
        out = self.epsilon * mahalanobis_distances(self.index, self.sqrt_shape, x, x2)
        out[x == x2] = 0.0
        return out

    @property
    def sqrt_shape(self) -> np.ndarray:
        if self._sqrt is None:
            self._sqrt = np.asarray(shape_sqrt_artifact(self.index, self.lam), dtype=np.float64)
        return self._sqrt

    def prepare(self) -> None:
        _ = self.sqrt_shape
        self.prepare_search()

    def derived(self) -> dict[str, Any]:
        dim = self.index.dim
        return {
            "lambda": self.lam,
            "euclidean_rate": self.epsilon / math.sqrt(1.0 - self.lam),
            "radius_distribution": f"Gamma(shape={dim}, scale={1 / self.epsilon:.6g})",
            "noise_covariance": "(m + 1)/ε² · (λΣ + (1 − λ)I)",
            **self.search_info(),
        }

    def noise(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return mahalanobis_noise(rng, count, self.sqrt_shape, self.epsilon)

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        noisy = np.asarray(self.index.vectors[ids], dtype=np.float64)
        noisy += self.noise(rng, len(ids))
        out, _ = nearest_words(self.index, noisy, ids, k=1, search=self.search, ef=self.ef_search)
        return out[:, 0]
