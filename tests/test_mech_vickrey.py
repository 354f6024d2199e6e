"""Vickrey (mechanisms.md §5): the second-neighbour probability, post-processing of the base."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.base import MechanismParams
from privtext.mechanisms.laplace import LaplaceMechanism, laplace_noise
from privtext.mechanisms.sampling import open_uniform
from privtext.mechanisms.vickrey import VickreyMechanism, VickreyParams, choose, second_probability


def test_second_probability_formula() -> None:
    d1, d2 = np.array([1.0, 2.0, 0.0, 3.0]), np.array([2.0, 2.0, 1.0, 3.0])
    np.testing.assert_allclose(second_probability(d1, d2, 0.75),
                               [0.75 / (0.75 + 0.5), 0.75, 0.0, 0.75])
    np.testing.assert_allclose(second_probability(d1, d2, 0.0), 0.0)
    np.testing.assert_allclose(second_probability(d1, d2, 1.0), [1.0, 1.0, 0.0, 1.0])


def _second_share(t: float, seed: int, draws: int = 100_000) -> int:
    nearest = np.tile([[10, 20]], (draws, 1))
    dist = np.tile([[1.0, 2.0]], (draws, 1))
    return int((choose(nearest, dist, t, np.random.default_rng(seed)) == 20).sum())


def test_second_neighbour_is_chosen_with_the_stated_probability() -> None:
    p = 0.75 * 1.0 / (0.75 * 1.0 + 0.25 * 2.0)
    assert stats.binomtest(_second_share(0.75, 1), 100_000, p).pvalue > 1e-3
    # Power: the same test rejects a sampler run with a t that is 20% off.
    assert stats.binomtest(_second_share(0.6, 1), 100_000, p).pvalue < 1e-6


def test_t_zero_is_the_base_mechanism(glove_small) -> None:  # type: ignore[no-untyped-def]
    ids = np.random.default_rng(2).integers(0, glove_small.n, 2000)
    vick = create("vickrey", glove_small, 10.0, {"t": "0"}).perturb_ids(ids, np.random.default_rng(3))
    lap = create("laplace", glove_small, 10.0, {}).perturb_ids(ids, np.random.default_rng(3))
    np.testing.assert_array_equal(vick, lap)
    vick = create("vickrey", glove_small, 10.0, {"t": "0", "base": "mahalanobis", "lam": "0.5"})
    maha = create("mahalanobis", glove_small, 10.0, {"lam": "0.5"})
    np.testing.assert_array_equal(vick.perturb_ids(ids, np.random.default_rng(4)),
                                  maha.perturb_ids(ids, np.random.default_rng(4)))


def test_output_follows_the_rule_for_each_noisy_point(glove_small) -> None:  # type: ignore[no-untyped-def]
    """Replay the same random stream by hand: noise, brute-force two nearest, then the coin."""
    idx = glove_small
    ids = np.random.default_rng(5).integers(0, idx.n, 1500)
    out = create("vickrey", idx, 8.0, {"t": "0.75"}).perturb_ids(ids, np.random.default_rng(6))
    rng = np.random.default_rng(6)
    v = np.asarray(idx.vectors, np.float64)
    noisy = v[ids] + laplace_noise(rng, len(ids), idx.dim, 8.0)
    d = np.vstack([np.sqrt(((part[:, None, :] - v[None, :, :]) ** 2).sum(-1))
                   for part in np.array_split(noisy, 15)])
    two = np.argsort(d, axis=1)[:, :2]
    d12 = np.take_along_axis(d, two, axis=1)
    second = open_uniform(rng, len(ids)) < 0.75 * d12[:, 0] / (0.75 * d12[:, 0] + 0.25 * d12[:, 1])
    np.testing.assert_array_equal(out, np.where(second, two[:, 1], two[:, 0]))
    assert 0.05 < second.mean() < 0.95


@pytest.mark.parametrize(("params", "message"), [
    ({"t": "1.5"}, r"t=1.5 is out of range; valid: \[0, 1\]"),
    ({"t": "-0.1"}, r"valid: \[0, 1\]"),
    ({"base": "gaussian"}, "choose one of laplace, mahalanobis"),
    ({"lam": "0.3"}, "lam applies only with --param base=mahalanobis"),
    ({"base": "mahalanobis", "lam": "1"}, "infinite"),
])
def test_bad_parameters_are_refused(tiny_index, params, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=message):
        create("vickrey", tiny_index, 1.0, params)


def test_privacy_map_is_the_base_guarantee(tiny_index) -> None:  # type: ignore[no-untyped-def]
    geo = tiny_index.geometry
    g = VickreyMechanism.privacy_map(3.0, VickreyParams(t=0.5), geo)
    base = LaplaceMechanism.privacy_map(3.0, MechanismParams(), geo)
    assert (g.kind, g.rate, g.metric, g.per_token_pure_bound) == (
        base.kind, base.rate, base.metric, base.per_token_pure_bound)
    assert "post-processing" in g.statement
    maha = VickreyMechanism.privacy_map(3.0, VickreyParams(base="mahalanobis", lam=0.19), geo)
    assert "Mahalanobis" in (maha.metric or "") and "λ = 0.19" in maha.statement
    assert maha.per_token_pure_bound == pytest.approx(3.0 / 0.9 * geo.delta_max)
