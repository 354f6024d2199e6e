"""Truncated Gumbel (mechanisms.md §2): calibration, refusal, and the output distribution."""

import math

import numpy as np
import pytest
from mech_stats import chi_square_pvalue
from scipy import stats

from privtext.errors import InfeasibleEpsilonError, ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.gumbel import (
    TruncatedGumbelMechanism,
    epsilon_for_scale,
    min_epsilon,
    output_distribution,
    scale_for_epsilon,
    truncated_gumbel,
)

N, DMIN, DMAX = 91927, 0.3514, 25.34


@pytest.mark.parametrize("epsilon", [79.5, 80.0, 100.0, 300.0, 1e3, 1e5, 1e9, 1e30])
def test_epsilon_scale_round_trip(epsilon: float) -> None:
    b = scale_for_epsilon(epsilon, N, DMIN, DMAX)
    assert epsilon_for_scale(b, N, DMIN, DMAX) == pytest.approx(epsilon, rel=1e-9)


def test_scale_decreases_as_epsilon_grows() -> None:
    scales = [scale_for_epsilon(e, N, DMIN, DMAX) for e in (100.0, 300.0, 1e4, 1e8)]
    assert np.all(np.diff(scales) < 0)


def test_two_word_vocabulary_is_refused(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(np.array([[0.0, 0.0], [1.0, 1.0]]), neighbors=2)
    with pytest.raises(ParameterError, match="at least 3 words"):
        TruncatedGumbelMechanism(idx, 1e6)


def test_infeasible_epsilon_is_refused_naming_the_minimum(glove_small) -> None:  # type: ignore[no-untyped-def]
    geo = glove_small.geometry
    floor = min_epsilon(geo.n, geo.delta_min)
    assert floor == pytest.approx((2 * (1 + math.log(geo.n)) + 3) / geo.delta_min)
    for eps in (1.0, floor * 0.999, floor):
        with pytest.raises(InfeasibleEpsilonError, match=f"{floor:.6g}"):
            create("gumbel", glove_small, eps, {})
    create("gumbel", glove_small, floor * 1.01, {})


def test_truncated_gumbel_stays_in_bounds_and_matches_its_cdf() -> None:
    scale, bound = 2.0, 3.0
    x = truncated_gumbel(np.random.default_rng(0), (50_000,), scale, bound)
    assert x.min() >= -bound and x.max() <= bound
    gumbel = stats.gumbel_r(scale=scale)
    lo, hi = gumbel.cdf(-bound), gumbel.cdf(bound)
    assert stats.kstest(x, lambda v: (gumbel.cdf(v) - lo) / (hi - lo)).pvalue > 0.01
    wrong = truncated_gumbel(np.random.default_rng(0), (50_000,), scale * 1.3, bound)
    assert stats.kstest(wrong, lambda v: (gumbel.cdf(v) - lo) / (hi - lo)).pvalue < 1e-6


def _tiny_gumbel(index_factory):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    idx = index_factory(rng.normal(size=(9, 2)) * 1.2, neighbors=9)
    # ε chosen so that b is comparable to the distances: the distribution is far from trivial.
    eps = epsilon_for_scale(1.5, idx.n, idx.geometry.delta_min, idx.geometry.delta_max)
    return idx, TruncatedGumbelMechanism(idx, eps)


def _chi_square_pvalue(mech, idx, word: int, scale: float, draws: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    """Draws for `word` against the numerical distribution at `scale`, over its table row."""
    expected = output_distribution(idx.neighbor_dist[word], scale, idx.geometry.delta_max, mech.lam)
    out = mech.perturb_ids(np.full(draws, word), np.random.default_rng(seed))
    column = np.full(idx.n, len(expected))  # an output outside the row lands in an impossible bin
    column[idx.neighbor_ids[word]] = np.arange(len(expected))
    return chi_square_pvalue(column[out], np.append(expected, 0.0))


def test_output_frequencies_match_the_numerical_distribution(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx, mech = _tiny_gumbel(index_factory)
    assert mech.scale == pytest.approx(1.5, rel=1e-9)
    for word in (0, 4, 8):
        assert _chi_square_pvalue(mech, idx, word, mech.scale, 100_000, seed=word) > 1e-3


def test_far_columns_beyond_the_table_head_give_the_same_draws(index_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The sampler reads the first columns from a cached head of the table and the rest from the
    # table itself: with a 3-column head (k > 3 is common here) the draws must not change at all.
    import privtext.mechanisms.gumbel as gumbel

    idx, full = _tiny_gumbel(index_factory)
    ids = np.repeat(np.arange(idx.n), 5_000)
    expected = full.perturb_ids(ids, np.random.default_rng(5))
    monkeypatch.setattr(gumbel, "_HEAD_COLUMNS", 3)
    narrow = TruncatedGumbelMechanism(idx, full.epsilon)
    assert narrow._table_head()[1].shape[1] == 3
    np.testing.assert_array_equal(narrow.perturb_ids(ids, np.random.default_rng(5)), expected)
    assert _chi_square_pvalue(narrow, idx, 4, narrow.scale, 100_000, seed=9) > 1e-3


def test_frequency_test_rejects_a_wrong_noise_scale(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx, mech = _tiny_gumbel(index_factory)
    # the sampler runs at b = 1.5; the test checks against the distribution of b 30% off
    for wrong in (mech.scale * 1.3, mech.scale / 1.3):
        assert _chi_square_pvalue(mech, idx, 0, wrong, 100_000, seed=1) < 1e-6


def test_candidate_count_is_poisson_conditioned_and_capped(glove_small) -> None:  # type: ignore[no-untyped-def]
    mech = create("gumbel", glove_small, 500.0, {})
    k = mech.sample_counts(np.random.default_rng(2), 200_000)
    assert k.min() >= 1 and k.max() <= glove_small.neighbors
    lam = math.log(glove_small.n - 1)
    assert mech.lam == pytest.approx(lam)
    assert k.mean() == pytest.approx(lam / (1 - math.exp(-lam)), rel=0.01)
    assert mech.derived()["candidate_cap_mass"] < 1e-20


def test_guarantee_names_the_reconstruction_the_truncation_and_the_floor(glove_small) -> None:  # type: ignore[no-untyped-def]
    g = create("gumbel", glove_small, 500.0, {}).guarantee
    assert g.kind == "metric" and g.rate == 500.0
    assert g.published_statement_covered is True and g.floor is not None and g.floor > 0
    assert g.per_token_pure_bound is not None
    assert g.per_token_pure_bound <= 500.0 * glove_small.geometry.delta_min
    assert not g.warnings
    text = " ".join(g.caveats)
    assert "reconstructed" in text and "K = 64" in text
    bare = create("gumbel", glove_small, 500.0, {"floor": "0"}).guarantee
    assert "unprotected" in bare.statement and "unbounded" in bare.statement
    assert bare.per_token_pure_bound is None and bare.published_statement_covered is False
    assert len(bare.warnings) == 1 and "floor=0" in bare.warnings[0]
