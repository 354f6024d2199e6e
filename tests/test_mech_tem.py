"""TEM (mechanisms.md §3): the ⊥ construction against the closed form, both samplers, γ and β."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mech_stats import pairwise_distances, pooled_chi_square_pvalue

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.tem import (
    TemParams,
    TruncatedExponentialMechanism,
    complement_ids,
    threshold,
)

EPS, BETA = 2.0, 0.15
DRAWS_PER_WORD = 1500


def two_clusters() -> np.ndarray:
    """A tight cluster of 10 words (their L_x fits a 12-wide table) and a loose one of 30 (it
    does not), 25 apart, so one chunk exercises both samplers."""
    rng = np.random.default_rng(20260301)
    tight = rng.normal(size=(10, 2)) * 0.5
    loose = rng.normal(size=(30, 2)) * 2.0 + np.array([25.0, 0.0])
    return np.vstack([tight, loose])


def closed_form(vectors: np.ndarray, epsilon: float, beta: float) -> np.ndarray:
    """P[y|x] ∝ exp(−(ε/2)·min(d(x, y), γ)), row per input word, computed from scratch."""
    d = pairwise_distances(vectors)
    gamma = 2.0 / epsilon * math.log((1.0 - beta) * len(vectors) / beta)
    w = np.exp(-epsilon / 2.0 * np.minimum(d, gamma))
    return w / w.sum(axis=1, keepdims=True)


def run(index, epsilon: float, seed: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    mech = create("tem", index, epsilon, {"beta": BETA})
    ids = np.repeat(np.arange(index.n), DRAWS_PER_WORD)
    return ids, mech.perturb_ids(ids, np.random.default_rng(seed))


def test_both_samplers_are_exercised(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(two_clusters(), neighbors=12)
    mech = create("tem", idx, EPS, {"beta": BETA})
    fits = mech._fits(np.arange(idx.n))
    assert fits[:10].all() and (~fits[10:]).sum() >= 25


def test_output_frequencies_match_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    vectors = two_clusters()
    idx = index_factory(vectors, neighbors=12)
    ids, out = run(idx, EPS, seed=1)
    assert pooled_chi_square_pvalue(ids, out, closed_form(vectors, EPS, BETA)) > 1e-3
    # The complement (⊥) branch really is taken from the table sampler: words of the other
    # cluster appear as outputs of tight-cluster words.
    assert ((ids < 10) & (out >= 10)).sum() > 50


def test_frequency_test_rejects_a_wrong_epsilon(index_factory) -> None:  # type: ignore[no-untyped-def]
    vectors = two_clusters()
    idx = index_factory(vectors, neighbors=12)
    ids, out = run(idx, EPS * 1.3, seed=1)
    assert pooled_chi_square_pvalue(ids, out, closed_form(vectors, EPS, BETA)) < 1e-6


def test_wide_sampler_alone_matches_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    """A 3-wide table: no word's L_x fits, everything goes through the exact whole-vocabulary sampler."""
    vectors = two_clusters()
    idx = index_factory(vectors, neighbors=3)
    assert not create("tem", idx, EPS, {"beta": BETA})._fits(np.arange(idx.n)).any()
    ids, out = run(idx, EPS, seed=2)
    assert pooled_chi_square_pvalue(ids, out, closed_form(vectors, EPS, BETA)) > 1e-3


def test_table_sampler_alone_matches_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    """A table as wide as the vocabulary: the ⊥ construction for every word."""
    vectors = two_clusters()
    idx = index_factory(vectors, neighbors=40)
    assert create("tem", idx, EPS, {"beta": BETA})._fits(np.arange(idx.n)).all()
    ids, out = run(idx, EPS, seed=3)
    assert pooled_chi_square_pvalue(ids, out, closed_form(vectors, EPS, BETA)) > 1e-3


def test_probabilities_method_is_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(two_clusters(), neighbors=12)
    mech = create("tem", idx, EPS, {"beta": BETA})
    expected = closed_form(np.asarray(idx.vectors, np.float64), EPS, BETA)
    for x in (0, 15):
        np.testing.assert_allclose(mech.probabilities(x), expected[x], rtol=1e-9)


def test_complement_index_is_the_jth_missing_id() -> None:
    rng = np.random.default_rng(5)
    n = 50
    for _ in range(200):
        size = int(rng.integers(0, 12))
        members = rng.choice(n, size=12, replace=False)
        rest = np.setdiff1d(np.arange(n), members[:size])
        j = rng.integers(0, len(rest), size=8)
        got = complement_ids(np.tile(members, (8, 1)), np.full(8, size), j)
        np.testing.assert_array_equal(got, rest[j])


def test_gamma_bounds_the_probability_of_leaving_l_x(glove_small) -> None:  # type: ignore[no-untyped-def]
    beta = 0.01
    mech = create("tem", glove_small, 6.0, {"beta": beta})
    assert mech.gamma == pytest.approx(2 / 6.0 * math.log((1 - beta) * glove_small.n / beta))
    v = np.asarray(glove_small.vectors, np.float64)
    for x in (0, 7, 500, glove_small.n - 1):
        d = np.linalg.norm(v - v[x], axis=1)
        outside = mech.probabilities(x)[d > mech.gamma].sum()
        assert outside <= beta * (1 + 1e-9)


def test_same_seed_same_output(glove_small) -> None:  # type: ignore[no-untyped-def]
    mech = create("tem", glove_small, 8.0, {})
    ids = np.random.default_rng(0).integers(0, glove_small.n, 5000)
    a = mech.perturb_ids(ids, np.random.default_rng(9))
    b = mech.perturb_ids(ids, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == ids.shape


@pytest.mark.parametrize("beta", ["0", "1", "-0.1", "1.5"])
def test_beta_outside_the_open_unit_interval_is_refused(tiny_index, beta: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=r"beta.*valid: \(0, 1\)"):
        create("tem", tiny_index, 1.0, {"beta": beta})


def test_beta_giving_a_non_positive_threshold_is_refused(tiny_index) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match="γ ≤ 0"):
        create("tem", tiny_index, 1.0, {"beta": "0.99"})


def test_privacy_map_states_metric_dp_with_gamma(tiny_index) -> None:  # type: ignore[no-untyped-def]
    geo = tiny_index.geometry
    g = TruncatedExponentialMechanism.privacy_map(3.0, TemParams(beta=0.01), geo)
    assert g.kind == "metric" and g.rate == 3.0 and g.metric == "euclidean"
    assert g.per_token_pure_bound == pytest.approx(3.0 * geo.delta_max)
    assert not g.approximate
    gamma = threshold(3.0, 0.01, geo.n)
    assert any(f"{gamma:.6g}" in c for c in g.conditions)
    assert "metric DP at rate ε = 3" in g.statement


def test_empty_complement_never_draws_bottom(tiny_index) -> None:  # type: ignore[no-untyped-def]
    """Small ε: γ exceeds every distance, L_x is the whole vocabulary (here the whole table), ⊥
    has no mass, and TEM is the plain exponential mechanism exp(−ε·d/2)."""
    mech = create("tem", tiny_index, 0.5, {})
    assert mech.gamma > tiny_index.geometry.delta_max and mech._fits(np.arange(12)).all()
    ids = np.repeat(np.arange(12), 2000)
    out = mech.perturb_ids(ids, np.random.default_rng(8))
    w = np.exp(-0.25 * pairwise_distances(np.asarray(tiny_index.vectors, np.float64)))
    assert pooled_chi_square_pvalue(ids, out, w / w.sum(axis=1, keepdims=True)) > 1e-3
