"""Mahalanobis (mechanisms.md §4): the noise shape, the nearest-word step, λ and the guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.mahalanobis import (
    MahalanobisMechanism,
    MahalanobisParams,
    mahalanobis_noise,
    normalised_covariance,
)

EPS, LAM, DRAWS = 2.0, 0.6, 100_000


def anisotropic_vocabulary() -> np.ndarray:
    """300 words in 4-D, standard deviations 3, 1, 0.5, 0.2 along rotated axes."""
    rng = np.random.default_rng(41)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    return (rng.normal(size=(300, 4)) * np.array([3.0, 1.0, 0.5, 0.2])) @ rotation


def shape_from_scratch(vectors: np.ndarray, lam: float) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    centred = v - v.mean(axis=0)
    cov = centred.T @ centred / (len(v) - 1)
    cov *= v.shape[1] / np.trace(cov)
    return lam * cov + (1 - lam) * np.eye(v.shape[1])


def whitened_radius_pvalue(noise: np.ndarray, shape: np.ndarray, epsilon: float) -> float:
    """Z = r·M^{1/2}u ⇔ ‖M^{−1/2}Z‖ ~ Gamma(m, 1/ε): the defining property of the density
    ∝ exp(−ε‖M^{−1/2}z‖)."""
    values, vecs = np.linalg.eigh(shape)
    inv_sqrt = (vecs / np.sqrt(values)) @ vecs.T
    radius = np.linalg.norm(noise @ inv_sqrt, axis=1)
    return float(stats.kstest(radius, stats.gamma(a=shape.shape[0], scale=1 / epsilon).cdf).pvalue)


def test_noise_covariance_is_m_plus_1_over_eps_squared_times_the_shape(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(anisotropic_vocabulary(), neighbors=8)
    mech = create("mahalanobis", idx, EPS, {"lam": str(LAM)})
    noise = mech.noise(np.random.default_rng(1), DRAWS)
    shape = shape_from_scratch(idx.vectors, LAM)
    expected = (idx.dim + 1) / EPS**2 * shape
    error = np.linalg.norm(np.cov(noise, rowvar=False) - expected) / np.linalg.norm(expected)
    assert error < 0.03
    # The same check tells a wrong λ apart.
    wrong = (idx.dim + 1) / EPS**2 * shape_from_scratch(idx.vectors, 0.3)
    assert np.linalg.norm(np.cov(noise, rowvar=False) - wrong) / np.linalg.norm(wrong) > 0.1


def test_whitened_noise_radius_is_gamma_and_the_test_has_power(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(anisotropic_vocabulary(), neighbors=8)
    mech = create("mahalanobis", idx, EPS, {"lam": str(LAM)})
    noise = mech.noise(np.random.default_rng(2), DRAWS)
    assert whitened_radius_pvalue(noise, shape_from_scratch(idx.vectors, LAM), EPS) > 1e-3
    assert whitened_radius_pvalue(noise, shape_from_scratch(idx.vectors, 0.3), EPS) < 1e-6
    assert whitened_radius_pvalue(noise, shape_from_scratch(idx.vectors, LAM), EPS * 1.3) < 1e-6


def test_square_root_is_cached_symmetric_and_squares_to_the_shape(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(anisotropic_vocabulary(), neighbors=8)
    mech = create("mahalanobis", idx, EPS, {"lam": str(LAM)})
    mech.prepare()
    assert len(list((idx.path / "derived").glob("mahalanobis-sqrt-*.npy"))) == 1
    s = mech.sqrt_shape
    np.testing.assert_allclose(s, s.T, atol=1e-12)
    np.testing.assert_allclose(s @ s, shape_from_scratch(idx.vectors, LAM), atol=1e-10)
    assert np.trace(normalised_covariance(idx.vectors)) == pytest.approx(idx.dim)


def test_lambda_zero_is_the_laplace_mechanism(glove_small) -> None:  # type: ignore[no-untyped-def]
    ids = np.random.default_rng(3).integers(0, glove_small.n, 2000)
    maha = create("mahalanobis", glove_small, 12.0, {"lam": "0"}).perturb_ids(ids, np.random.default_rng(4))
    lap = create("laplace", glove_small, 12.0, {}).perturb_ids(ids, np.random.default_rng(4))
    np.testing.assert_array_equal(maha, lap)


def test_output_is_the_exact_nearest_word_to_the_noisy_point(glove_small) -> None:  # type: ignore[no-untyped-def]
    idx = glove_small
    mech = create("mahalanobis", idx, 10.0, {})
    ids = np.random.default_rng(5).integers(0, idx.n, 1500)
    out = mech.perturb_ids(ids, np.random.default_rng(6))
    v = np.asarray(idx.vectors, np.float64)
    noisy = v[ids] + mahalanobis_noise(np.random.default_rng(6), len(ids), mech.sqrt_shape, 10.0)
    brute = np.concatenate([np.argmin(((part[:, None, :] - v[None, :, :]) ** 2).sum(-1), axis=1)
                            for part in np.array_split(noisy, 15)])
    np.testing.assert_array_equal(out, brute)
    assert 0.0 < (out == ids).mean() < 1.0


@pytest.mark.parametrize(("lam", "message"), [
    ("1", r"lam=1 is refused.*infinite; valid: \[0, 1\)"),
    ("1.0", r"lam=1 is refused"),
    ("-0.1", r"lam=-0.1 is out of range; valid: \[0, 1\)"),
    ("2", r"valid: \[0, 1\)"),
    ("nan", "finite"),
])
def test_bad_lambda_is_refused(tiny_index, lam: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=message):
        create("mahalanobis", tiny_index, 1.0, {"lam": lam})


def test_privacy_map_states_its_metric_and_the_euclidean_rate(tiny_index) -> None:  # type: ignore[no-untyped-def]
    geo = tiny_index.geometry
    g = MahalanobisMechanism.privacy_map(2.0, MahalanobisParams(lam=0.36), geo)
    euclid = 2.0 / math.sqrt(1 - 0.36)
    assert g.kind == "metric" and g.rate == 2.0
    assert "Mahalanobis" in (g.metric or "") and "λ = 0.36" in (g.metric or "")
    assert f"ε/sqrt(1 − λ) = {euclid:.6g}" in g.statement
    assert g.per_token_pure_bound == pytest.approx(euclid * geo.delta_max)
