"""Multivariate Laplace (mechanisms.md §1): radius, direction, and the nearest-word step."""

import numpy as np
import pytest
from scipy import stats

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.laplace import laplace_noise
from privtext.mechanisms.sampling import uniform_directions

DIM = 50
EPS = 4.0
DRAWS = 20_000


def radius_ks_pvalue(radii: np.ndarray, epsilon: float, dim: int) -> float:
    return float(stats.kstest(radii, stats.gamma(a=dim, scale=1.0 / epsilon).cdf).pvalue)


def direction_ks_pvalue(directions: np.ndarray, axis: np.ndarray) -> float:
    # For u uniform on S^{m−1} and a fixed unit a: (u·a + 1)/2 ~ Beta((m−1)/2, (m−1)/2).
    m = directions.shape[1]
    proj = (directions @ axis + 1.0) / 2.0
    return float(stats.kstest(proj, stats.beta((m - 1) / 2, (m - 1) / 2).cdf).pvalue)


def test_radius_follows_gamma_m_over_epsilon() -> None:
    noise = laplace_noise(np.random.default_rng(1), DRAWS, DIM, EPS)
    assert radius_ks_pvalue(np.linalg.norm(noise, axis=1), EPS, DIM) > 0.01


def test_radius_test_has_power_against_a_30_percent_wrong_scale() -> None:
    wrong = laplace_noise(np.random.default_rng(1), DRAWS, DIM, EPS * 1.3)
    assert radius_ks_pvalue(np.linalg.norm(wrong, axis=1), EPS, DIM) < 1e-6
    wrong = laplace_noise(np.random.default_rng(2), DRAWS, DIM, EPS / 1.3)
    assert radius_ks_pvalue(np.linalg.norm(wrong, axis=1), EPS, DIM) < 1e-6


def test_directions_are_uniform_on_the_sphere() -> None:
    rng = np.random.default_rng(3)
    dirs = uniform_directions(rng, DRAWS, DIM)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-12)
    for axis in np.eye(DIM)[:3]:
        assert direction_ks_pvalue(dirs, axis) > 0.01


def test_direction_test_has_power_against_a_biased_sampler() -> None:
    rng = np.random.default_rng(4)
    axis = np.eye(DIM)[0]
    g = rng.standard_normal((DRAWS, DIM)) + 0.15 * axis  # slightly off-centre Gaussian
    biased = g / np.linalg.norm(g, axis=1, keepdims=True)
    assert direction_ks_pvalue(biased, axis) < 1e-6


def test_output_is_the_exact_nearest_word_to_the_noisy_point(glove_small) -> None:  # type: ignore[no-untyped-def]
    idx = glove_small
    mech = create("laplace", idx, 8.0, {})
    ids = np.random.default_rng(5).integers(0, idx.n, 3000)
    out = mech.perturb_ids(ids, np.random.default_rng(6))
    # Redraw the same noise (same seed, same call order) and search by brute force.
    noisy = np.asarray(idx.vectors[ids], np.float64) + laplace_noise(np.random.default_rng(6), len(ids), idx.dim, 8.0)
    v = np.asarray(idx.vectors, np.float64)
    brute = np.argmin(((noisy[:, None, :] - v[None, :, :]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(out, brute)
    assert 0.0 < (out == ids).mean() < 1.0


def test_large_epsilon_keeps_words_small_epsilon_moves_them(glove_small) -> None:  # type: ignore[no-untyped-def]
    ids = np.arange(500)
    rng = np.random.default_rng(7)
    high = create("laplace", glove_small, 200.0, {}).perturb_ids(ids, rng)
    low = create("laplace", glove_small, 1.0, {}).perturb_ids(ids, rng)
    assert (high == ids).mean() > 0.99
    assert (low == ids).mean() < 0.05


@pytest.mark.parametrize("eps", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_epsilon_is_refused(glove_small, eps: float) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match="positive finite"):
        create("laplace", glove_small, eps, {})


def test_privacy_map_states_metric_dp_with_per_token_bound(glove_small) -> None:  # type: ignore[no-untyped-def]
    g = create("laplace", glove_small, 5.0, {}).guarantee
    assert g.kind == "metric" and g.rate == 5.0 and g.metric == "euclidean"
    assert g.per_token_pure_bound == pytest.approx(5.0 * glove_small.geometry.delta_max)
    assert not g.approximate
