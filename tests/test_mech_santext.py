"""SanText and SanText+ (mechanisms.md §7), and the exact full-vocabulary sampler under them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mech_stats import chi_square_pvalue, pairwise_distances, pooled_chi_square_pvalue

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.fullvocab import BLOCK, FullVocabularySampler
from privtext.mechanisms.santext import SanTextMechanism, SanTextParams, sensitive_start

EPS = 1.5


def vocabulary(n: int = 30, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)) * 1.5


def santext_closed_form(vectors: np.ndarray, epsilon: float) -> np.ndarray:
    w = np.exp(-epsilon / 2.0 * pairwise_distances(vectors))
    return w / w.sum(axis=1, keepdims=True)


def plus_closed_form(vectors: np.ndarray, epsilon: float, w: float, p: float) -> np.ndarray:
    n = len(vectors)
    cut = n - math.ceil(w * n)
    weights = np.exp(-epsilon / 2.0 * pairwise_distances(vectors))
    weights[:, :cut] = 0.0
    dist = weights / weights.sum(axis=1, keepdims=True)
    dist[:cut] *= p
    dist[np.arange(cut), np.arange(cut)] += 1.0 - p
    return dist


def draws(index, epsilon: float, params: dict[str, str], per_word: int, seed: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    mech = create("santext", index, epsilon, params)
    ids = np.repeat(np.arange(index.n), per_word)
    return ids, mech.perturb_ids(ids, np.random.default_rng(seed))


def test_santext_frequencies_match_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    vectors = vocabulary()
    idx = index_factory(vectors, neighbors=8)
    ids, out = draws(idx, EPS, {}, 2000, seed=1)
    assert pooled_chi_square_pvalue(ids, out, santext_closed_form(vectors, EPS)) > 1e-3


def test_santext_frequency_test_rejects_a_wrong_epsilon(index_factory) -> None:  # type: ignore[no-untyped-def]
    vectors = vocabulary()
    idx = index_factory(vectors, neighbors=8)
    ids, out = draws(idx, EPS * 1.3, {}, 2000, seed=1)
    assert pooled_chi_square_pvalue(ids, out, santext_closed_form(vectors, EPS)) < 1e-6


def test_santext_plus_frequencies_match_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    vectors = vocabulary()
    idx = index_factory(vectors, neighbors=8)
    ids, out = draws(idx, EPS, {"plus": "true", "w": "0.5", "p": "0.4"}, 2000, seed=2)
    expected = plus_closed_form(vectors, EPS, 0.5, 0.4)
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    ids, out = draws(idx, EPS * 1.3, {"plus": "true", "w": "0.5", "p": "0.4"}, 2000, seed=2)
    assert pooled_chi_square_pvalue(ids, out, expected) < 1e-6


def test_sensitive_set_is_the_least_frequent_rows(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(40), neighbors=8)
    mech = create("santext", idx, 0.5, {"plus": "true", "w": "0.25"})
    assert mech.cut == 30 == sensitive_start(40, 0.25)
    ids = np.repeat(np.arange(40), 200)
    out = mech.perturb_ids(ids, np.random.default_rng(3))
    assert (out[ids >= 30] >= 30).all()  # sensitive words always become sensitive words
    kept = out[ids < 30] == ids[ids < 30]
    assert 0.6 < kept.mean() < 0.8  # non-sensitive: kept with probability 1 − p = 0.7
    assert mech.derived()["sensitive_words"] == 10


def test_many_distinct_words_and_the_cache_give_identical_draws(index_factory) -> None:  # type: ignore[no-untyped-def]
    """More distinct words than one work batch, several 256-word blocks per row, and a cache that
    holds only some words: the draws must not depend on which path served a word."""
    vectors = vocabulary(3 * BLOCK + 17, seed=11)
    idx = index_factory(vectors, neighbors=8)
    ids = np.random.default_rng(4).integers(0, idx.n, 30_000)
    cached = FullVocabularySampler(idx, 0.4, cache_bytes=40 * 8 * (4 * BLOCK + 4), method="scan")
    uncached = FullVocabularySampler(idx, 0.4, cache_bytes=0, method="scan")
    assert cached.cache_words == 40 and uncached.cache_words == 0
    a = cached.sample(ids, np.random.default_rng(5))
    b = uncached.sample(ids, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    again = cached.sample(ids, np.random.default_rng(5))  # now served from the filled cache
    np.testing.assert_array_equal(a, again)


def test_multi_block_rows_follow_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(3 * BLOCK + 17, seed=11), neighbors=8)
    vectors = np.asarray(idx.vectors, np.float64)  # the stored float32 values
    sampler = FullVocabularySampler(idx, 0.3)
    x = 5
    out = sampler.sample(np.full(60_000, x), np.random.default_rng(6))
    expected = santext_closed_form(vectors, 0.6)[x]
    np.testing.assert_allclose(sampler.probabilities(x), expected, rtol=1e-9)
    assert chi_square_pvalue(out, expected) > 1e-3
    assert chi_square_pvalue(out, santext_closed_form(vectors, 0.6 * 1.3)[x]) < 1e-6


def test_probabilities_are_exact_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    mech = create("santext", glove_small, 2.0, {})
    v = np.asarray(glove_small.vectors, np.float64)
    for x in (0, 100, glove_small.n - 1):
        w = np.exp(-1.0 * np.linalg.norm(v - v[x], axis=1))
        np.testing.assert_allclose(mech.probabilities(x), w / w.sum(), rtol=1e-10)


def test_output_shape_dtype_and_empty_input(glove_small) -> None:  # type: ignore[no-untyped-def]
    mech = create("santext", glove_small, 2.0, {"plus": "true"})
    out = mech.perturb_ids(np.array([3, 3, 1000]), np.random.default_rng(0))
    assert out.dtype == np.int64 and out.shape == (3,)
    assert mech.perturb_ids(np.array([], dtype=np.int64), np.random.default_rng(0)).shape == (0,)


@pytest.mark.parametrize(("params", "message"), [
    ({"w": "0.5"}, "apply only to SanText\\+"),
    ({"p": "0.5"}, "apply only to SanText\\+"),
    ({"plus": "true", "w": "0"}, r"w=0.0 is out of range; valid: \(0, 1\]"),
    ({"plus": "true", "w": "1.2"}, r"valid: \(0, 1\]"),
    ({"plus": "true", "p": "0"}, r"p=0.0 is out of range; valid: \(0, 1\]"),
    ({"plus": "maybe"}, "cannot read the value as bool"),
])
def test_bad_parameters_are_refused_naming_the_range(tiny_index, params, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=message):
        create("santext", tiny_index, 1.0, params)


def test_privacy_map_santext_is_metric_dp(tiny_index) -> None:  # type: ignore[no-untyped-def]
    geo = tiny_index.geometry
    g = SanTextMechanism.privacy_map(2.0, SanTextParams(), geo)
    assert g.kind == "metric" and g.rate == 2.0 and g.metric == "euclidean"
    assert g.per_token_pure_bound == pytest.approx(2.0 * geo.delta_max)


def test_privacy_map_santext_plus_is_relaxed_with_its_parameters(tiny_index) -> None:  # type: ignore[no-untyped-def]
    geo = tiny_index.geometry
    g = SanTextMechanism.privacy_map(2.0, SanTextParams(plus=True, w=0.5, p=0.25), geo)
    assert g.kind == "relaxed" and g.rate == 2.0
    assert g.per_token_pure_bound is None
    assert "utility-optimised metric LDP" in g.statement
    assert "w = 0.5" in g.statement and "1 − p = 0.75" in g.statement
    assert "non-sensitive words have no privacy guarantee" in g.statement
    assert f"ln(1/p)) = exp(ε·d(x, x') + {math.log(4):.4g})" in g.statement
    assert any("never by the corpus" in c for c in g.conditions)
