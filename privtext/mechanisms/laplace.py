"""Multivariate Laplace (`laplace`): Feyisetan et al., WSDM 2020. Contract: mechanisms.md §1."""

from __future__ import annotations

from typing import Any

import numpy as np

from privtext.index import Geometry
from privtext.mechanisms.base import Guarantee, Mechanism, MechanismParams, pair_distances, pair_ids
from privtext.mechanisms.nearest import NearestSearch, SearchParams, nearest_words, search_condition
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import uniform_directions


def laplace_noise(rng: np.random.Generator, count: int, dim: int, epsilon: float) -> np.ndarray:
    """Noise with density ∝ exp(−ε‖z‖) in R^dim: uniform direction × Gamma(dim, 1/ε) radius."""
    radius = rng.gamma(shape=dim, scale=1.0 / epsilon, size=count)
    return uniform_directions(rng, count, dim) * radius[:, None]


def metric_guarantee(epsilon: float, geometry: Geometry, metric: str, statement: str,
                     conditions: tuple[str, ...] = (), caveats: tuple[str, ...] = ()) -> Guarantee:
    """Metric DP at rate ε, with the per-token pure bound ε · Δ_max of the index."""
    return Guarantee(
        kind="metric",
        rate=epsilon,
        metric=metric,
        per_token_pure_bound=epsilon * geometry.delta_max,
        statement=statement,
        conditions=conditions,
        caveats=caveats,
    )


@register
class LaplaceMechanism(NearestSearch, Mechanism):
    name = "laplace"
    summary = "multivariate Laplace noise on the word vector, then the nearest vocabulary word"
    reference = "Feyisetan, Balle, Drake, Diethe. WSDM 2020"
    guarantee_summary = "metric DP at rate ε (Euclidean); per-token pure bound ε·Δ_max"
    Params = SearchParams

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        return metric_guarantee(
            epsilon,
            geometry,
            geometry.metric,
            f"metric DP at rate ε = {epsilon:g} per unit of Euclidean distance: for any two words "
            f"x, x' and output y, P[y|x] ≤ exp(ε·d(x, x'))·P[y|x']",
            conditions=(
                "noise density ∝ exp(−ε‖z − φ(x)‖) (Gamma(m, 1/ε) radius, uniform direction)",
                search_condition(params),
                f"per-token pure bound ε·Δ_max with Δ_max = {geometry.delta_max:.4g} ({geometry.delta_max_kind})",
            ),
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """ε·d(x, x'), Euclidean, float64."""
        x, x2 = pair_ids(x_ids, x2_ids)
        return self.epsilon * pair_distances(self.index, x, x2)

    def derived(self) -> dict[str, Any]:
        dim = self.index.dim
        return {"radius_distribution": f"Gamma(shape={dim}, scale={1 / self.epsilon:.6g})",
                "mean_noise_radius": dim / self.epsilon, **self.search_info()}

    def prepare(self) -> None:
        self.prepare_search()

    def noise(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return laplace_noise(rng, count, self.index.dim, self.epsilon)

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        noisy = np.asarray(self.index.vectors[ids], dtype=np.float64)
        noisy += self.noise(rng, len(ids))
        out, _ = nearest_words(self.index, noisy, ids, k=1, search=self.search, ef=self.ef_search)
        return out[:, 0]
