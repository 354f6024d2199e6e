"""Density-aware prior (mechanisms.md §6): the KDE, the exact sampler's closed form, and the
Metropolis–Hastings sampler's target, chain length and approximate label."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mech_stats import chi_square_pvalue, pairwise_distances, pooled_chi_square_pvalue
from scipy.special import logsumexp

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.density import DEFAULT_CHAIN, DensityMechanism, DensityParams

EPS = 2.0


def vocabulary() -> np.ndarray:
    rng = np.random.default_rng(51)
    dense = rng.normal(size=(20, 2)) * 0.6  # a dense region the prior favours
    sparse = rng.normal(size=(10, 2)) * 3.0 + np.array([2.0, 0.0])
    return np.vstack([dense, sparse])


def scott(vectors: np.ndarray) -> float:
    n, m = vectors.shape
    return math.sqrt(np.var(vectors, axis=0, ddof=1).mean()) * n ** (-1 / (m + 4))


def log_kde(points: np.ndarray, centres: np.ndarray, h: float) -> np.ndarray:
    d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    m, n = centres.shape[1], centres.shape[0]
    return logsumexp(-d2 / (2 * h * h), axis=1) - math.log(n) - m / 2 * math.log(2 * math.pi * h * h)


def closed_form(vectors: np.ndarray, epsilon: float, h: float) -> np.ndarray:
    w = np.exp(log_kde(vectors, vectors, h)[None, :] - epsilon / 2 * pairwise_distances(vectors))
    return w / w.sum(axis=1, keepdims=True)


def test_prior_is_the_gaussian_kde_with_scotts_bandwidth(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=8)
    v = np.asarray(idx.vectors, np.float64)
    mech = create("density", idx, EPS, {})
    assert mech.bandwidth == pytest.approx(scott(v), rel=1e-12)
    np.testing.assert_allclose(mech.log_prior, log_kde(v, v, scott(v)), rtol=1e-10)
    z = np.random.default_rng(0).normal(size=(50, 2)) * 3
    np.testing.assert_allclose(mech.log_density(z), log_kde(z, v, scott(v)), rtol=1e-9)


def test_exact_sampler_matches_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=8)
    v = np.asarray(idx.vectors, np.float64)
    expected = closed_form(v, EPS, 0.8)
    mech = create("density", idx, EPS, {"bandwidth": "0.8"})
    ids = np.repeat(np.arange(idx.n), 1500)
    out = mech.perturb_ids(ids, np.random.default_rng(1))
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    np.testing.assert_allclose(mech.probabilities(4), expected[4], rtol=1e-9)
    # The prior matters here: the same draws are far from the prior-free (SanText) law.
    flat = np.exp(-EPS / 2 * pairwise_distances(v))
    assert pooled_chi_square_pvalue(ids, out, flat / flat.sum(axis=1, keepdims=True)) < 1e-6


def test_exact_frequency_test_rejects_a_wrong_epsilon(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=8)
    expected = closed_form(np.asarray(idx.vectors, np.float64), EPS, 0.8)
    mech = create("density", idx, EPS * 1.3, {"bandwidth": "0.8"})
    ids = np.repeat(np.arange(idx.n), 1500)
    assert pooled_chi_square_pvalue(ids, mech.perturb_ids(ids, np.random.default_rng(1)), expected) < 1e-6


def test_prior_is_cached_per_bandwidth(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=8)
    create("density", idx, EPS, {}).prepare()
    create("density", idx, 5.0, {}).prepare()  # same bandwidth: reused
    assert len(list((idx.path / "derived").glob("density-log-prior-*.npy"))) == 1
    create("density", idx, EPS, {"bandwidth": "0.8"}).prepare()
    assert len(list((idx.path / "derived").glob("density-log-prior-*.npy"))) == 2


# -- Metropolis–Hastings: a 1-D vocabulary, where the target's mass in each word's cell can be
# -- integrated numerically.

POSITIONS = np.array([0.0, 1.0, 2.5, 4.0, 7.0])
MH_EPS, MH_H, MH_WORD = 1.0, 1.0, 2


def mh_target_cells(epsilon: float) -> np.ndarray:
    """P[nearest word = y] under the density ∝ π(z)·exp(−ε|z − φ(x)|) on the real line."""
    z = np.linspace(-60, 70, 1_300_001)
    log_f = log_kde(z[:, None], POSITIONS[:, None], MH_H) - epsilon * np.abs(z - POSITIONS[MH_WORD])
    f = np.exp(log_f - log_f.max())
    cell = np.argmin(np.abs(z[:, None] - POSITIONS[None, :]), axis=1)
    mass = np.bincount(cell, weights=f, minlength=len(POSITIONS))
    return mass / mass.sum()


def test_mh_chain_reaches_the_continuous_target(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(POSITIONS[:, None], neighbors=5)
    mech = create("density", idx, MH_EPS, {"sampler": "mh", "chain": "60", "bandwidth": str(MH_H)})
    out = mech.perturb_ids(np.full(20_000, MH_WORD), np.random.default_rng(7))
    assert chi_square_pvalue(out, mh_target_cells(MH_EPS)) > 1e-3
    # Power: the same draws against the target of a 30% larger ε.
    assert chi_square_pvalue(out, mh_target_cells(MH_EPS * 1.3)) < 1e-6


def test_mh_reports_chain_length_and_approximate_guarantee(tiny_index) -> None:  # type: ignore[no-untyped-def]
    mech = create("density", tiny_index, EPS, {"sampler": "mh", "chain": "7"})
    d = mech.derived()
    assert d["chain_length"] == 7 and d["proposals_per_token"] == 8 and d["approximate"] is True
    g = mech.guarantee
    assert g.approximate and g.kind == "metric" and g.rate == pytest.approx(2 * EPS)
    assert "approximately" in g.statement and "7 steps" in g.statement
    assert any("(chain + 1)·ε = 16" in c for c in g.conditions)
    default = DensityMechanism.privacy_map(EPS, DensityParams(sampler="mh"), tiny_index.geometry)
    assert f"{DEFAULT_CHAIN} steps" in default.statement
    out = mech.perturb_ids(np.arange(12).repeat(3), np.random.default_rng(0))
    assert out.shape == (36,) and ((out >= 0) & (out < 12)).all()


def test_exact_guarantee_is_metric_dp_at_rate_epsilon(tiny_index) -> None:  # type: ignore[no-untyped-def]
    g = DensityMechanism.privacy_map(EPS, DensityParams(), tiny_index.geometry)
    assert g.kind == "metric" and g.rate == EPS and not g.approximate
    assert g.per_token_pure_bound == pytest.approx(EPS * tiny_index.geometry.delta_max)
    assert any("does not depend on the input" in c for c in g.conditions)


@pytest.mark.parametrize(("params", "message"), [
    ({"chain": "10"}, "chain applies only with --param sampler=mh"),
    ({"sampler": "mh", "chain": "0"}, r"chain=0 is out of range; valid: \[1, 100000\]"),
    ({"sampler": "gibbs"}, "choose one of exact, mh"),
    ({"bandwidth": "0"}, r"bandwidth=0.0 is out of range; valid: \(0, inf\]"),
    ({"bandwidth": "-1"}, "out of range"),
])
def test_bad_parameters_are_refused(tiny_index, params, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=message):
        create("density", tiny_index, 1.0, params)


def test_sampler_handles_a_prior_with_a_huge_range(index_factory) -> None:  # type: ignore[no-untyped-def]
    """A prior spanning e^±500 takes the per-row shift path; the law is still the closed form."""
    from privtext.mechanisms.fullvocab import FullVocabularySampler

    idx = index_factory(vocabulary(), neighbors=8)
    v = np.asarray(idx.vectors, np.float64)
    log_prior = np.linspace(-500.0, 500.0, idx.n)
    log_prior[3] = 480.0
    sampler = FullVocabularySampler(idx, EPS / 2, log_prior=log_prior)
    logits = log_prior[None, :] - EPS / 2 * pairwise_distances(v)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    for x in (0, 3, 29):
        np.testing.assert_allclose(sampler.probabilities(x), expected[x], rtol=1e-9, atol=1e-300)
    out = sampler.sample(np.full(20_000, 0), np.random.default_rng(3))
    assert chi_square_pvalue(out, expected[0]) > 1e-3
