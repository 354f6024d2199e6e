"""The cluster-bounded envelope (clusters.py) for words with an extended list.

On an 80-word vocabulary with a 3-word table, extended lists of 12 words for the first 50 words
and 8 clusters, at small ε, most of the mass lies beyond the lists and most outputs come from the
cluster parts; the frequencies must match the closed form, and the same test must reject a 30%
wrong ε (power check). Words 50–79 (no extended list) take the κ-envelope in the same calls.
"""

from __future__ import annotations

import numpy as np
import pytest
from mech_stats import chi_square_pvalue, pooled_chi_square_pvalue
from test_mech_envelope import N, _wide_prior, closed_form, vocabulary

from privtext.mechanisms import create
from privtext.mechanisms.clusters import build_cluster_bounds, build_clusters
from privtext.mechanisms.fullvocab import FullVocabularySampler

LISTED = 50


def clustered(index, scale: float, **kwargs) -> FullVocabularySampler:  # type: ignore[no-untyped-def]
    """No scan, no sorted rows: words < 50 by the cluster-bounded envelope, the rest by the
    κ-envelope."""
    return FullVocabularySampler(index, scale, cache_bytes=0, scan_from_count=1 << 62, sorted_words=0,
                                 extended_words=LISTED, extended_width=12, clusters=8, table_clusters=0,
                                 **kwargs)


def table_mode(index, scale: float, **kwargs) -> FullVocabularySampler:  # type: ignore[no-untyped-def]
    """Every word by the cluster bounds with its 3-word table row as the exact list (the mode
    for words beyond the extended lists), over 8 clusters."""
    return FullVocabularySampler(index, scale, cache_bytes=0, scan_from_count=1 << 62, sorted_words=0,
                                 extended_words=0, clusters=0, table_clusters=8, table_cluster_words=N,
                                 **kwargs)


CASES = {  # (scale = ε/2, sampler options)
    "santext": (0.35, {}),
    "santext+ range": (0.35, {"lo": 30}),
    "tem clamp": (0.6, {"clamp": 4.0}),
    "density prior": (0.35, {"log_prior": np.random.default_rng(9).normal(size=N) * 1.5}),
    "prior with a far word": (0.35, {"log_prior": _wide_prior()}),
    "larger epsilon": (1.5, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cluster_bounded_draws_match_the_closed_form(index_factory, case: str) -> None:  # type: ignore[no-untyped-def]
    scale, kwargs = CASES[case]
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    ids = np.repeat(np.arange(N), 1500)
    sampler = clustered(idx, scale, **kwargs)
    out = sampler.sample(ids, np.random.default_rng(1))
    assert sampler.clustered.tokens == LISTED * 1500 and sampler.envelope.tokens == (N - LISTED) * 1500
    expected = closed_form(v, scale, kwargs.get("lo", 0), kwargs.get("clamp"), kwargs.get("log_prior"))
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    if scale < 1:  # the tail really is what was sampled: mostly beyond the 12-word lists
        lists = np.asarray(sampler.envelope.ext_ids, dtype=np.int64)
        has = ids < LISTED
        assert (~(lists[ids[has]] == out[has, None]).any(axis=1)).mean() > 0.5
    # Power: the same test rejects draws made at a 30% larger ε.
    wrong = clustered(idx, scale * 1.3, **kwargs).sample(ids, np.random.default_rng(1))
    assert pooled_chi_square_pvalue(ids, wrong, expected) < 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_table_rows_with_cluster_bounds_match_the_closed_form(index_factory, case: str) -> None:  # type: ignore[no-untyped-def]
    scale, kwargs = CASES[case]
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    ids = np.repeat(np.arange(N), 1500)
    sampler = table_mode(idx, scale, **kwargs)
    out = sampler.sample(ids, np.random.default_rng(2))
    assert sampler.clustered_table.tokens == len(ids) and sampler.envelope.tokens == 0
    expected = closed_form(v, scale, kwargs.get("lo", 0), kwargs.get("clamp"), kwargs.get("log_prior"))
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    if scale < 1:  # mostly beyond the 3-word tables
        table = np.asarray(idx.neighbor_ids)
        assert (~(table[ids] == out[:, None]).any(axis=1)).mean() > 0.8
    wrong = table_mode(idx, scale * 1.3, **kwargs).sample(ids, np.random.default_rng(2))
    assert pooled_chi_square_pvalue(ids, wrong, expected) < 1e-6


def test_exhausted_tries_fall_back_to_the_scan_exactly(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    sampler = clustered(idx, 0.35, max_tries=1)
    ids = np.repeat(np.arange(LISTED), 1500)
    out = sampler.sample(ids, np.random.default_rng(4))
    assert sampler.fallbacks > 0.1 * len(ids)
    assert pooled_chi_square_pvalue(ids, out, closed_form(v, 0.35)) > 1e-3


def test_draws_depend_only_on_the_ids_and_the_generator(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=3)
    ids = np.random.default_rng(6).integers(0, N, 5000)
    first = clustered(idx, 0.5)
    a = first.sample(ids, np.random.default_rng(7))
    first.sample(ids[::-1], np.random.default_rng(8))  # earlier chunks (and cached rows) leave no trace
    b = first.sample(ids, np.random.default_rng(7))
    c = clustered(idx, 0.5).sample(ids, np.random.default_rng(7))  # another process's sampler
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_cluster_bounds_certify_every_member(glove_small) -> None:  # type: ignore[no-untyped-def]
    """The clusters partition the vocabulary; λ_xQ is at most the true float64 distance from x to
    every member of Q, and not loose."""
    n = glove_small.n
    packed = build_clusters(glove_small, 40)
    count = len(packed) - n - 1
    offsets, members = packed[: count + 1], packed[count + 1 :]
    assert (np.sort(members) == np.arange(n)).all() and (np.diff(offsets) > 0).all()
    bounds = build_cluster_bounds(glove_small, 30, packed)
    v = np.asarray(glove_small.vectors, np.float64)
    for x in range(30):
        d = np.linalg.norm(v[members] - v[x], axis=1)
        owner = np.repeat(np.arange(count), np.diff(offsets))
        assert (d >= bounds[x, owner]).all()
        np.testing.assert_allclose(bounds[x], np.minimum.reduceat(d, offsets[:-1]), rtol=1e-6, atol=1e-6)


def test_listed_word_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    """santext ε = 1 on real vectors, a word with an extended list beyond the sorted rows: the
    draws follow the exact distribution and reject a 30% wrong ε."""
    x = 300
    mech = create("santext", glove_small, 1.0, {})
    sampler = mech.sampler  # type: ignore[attr-defined]
    # Not by a scan row: this small vocabulary's rows all fit the cache, and one word has many tokens.
    sampler.cache_words, sampler.scan_from_count = 0, 1 << 62
    assert sampler.sorted.words <= x < sampler.clustered.words and sampler.clustered.clusters > 1
    expected = mech.probabilities(x)
    ids = np.full(40_000, x)
    out = mech.perturb_ids(ids, np.random.default_rng(14))
    assert sampler.clustered.tokens == len(ids)
    assert chi_square_pvalue(out, expected, min_expected=20.0) > 1e-3
    wrong = create("santext", glove_small, 1.3, {})
    wrong.sampler.cache_words, wrong.sampler.scan_from_count = 0, 1 << 62  # type: ignore[attr-defined]
    assert chi_square_pvalue(wrong.perturb_ids(ids, np.random.default_rng(14)), expected,
                             min_expected=20.0) < 1e-6


def test_bounds_from_a_first_word_are_the_same_rows(glove_small) -> None:  # type: ignore[no-untyped-def]
    packed = build_clusters(glove_small, 40)
    np.testing.assert_array_equal(build_cluster_bounds(glove_small, 40, packed, start=25),
                                  build_cluster_bounds(glove_small, 40, packed)[25:])


def test_table_mode_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    """A rare word with only its table row as exact list and cluster bounds beyond it (the mode
    for ranks past the extended lists), santext-like at ε = 1 on real vectors."""
    x = 1500

    def sampler(scale: float) -> FullVocabularySampler:
        return FullVocabularySampler(glove_small, scale, cache_bytes=0, scan_from_count=1 << 62,
                                     sorted_words=0, extended_words=0, clusters=0, table_clusters=64,
                                     table_cluster_words=glove_small.n)

    right = sampler(0.5)
    expected = right.probabilities(x)
    ids = np.full(40_000, x)
    out = right.sample(ids, np.random.default_rng(15))
    assert right.clustered_table.tokens == len(ids)
    assert chi_square_pvalue(out, expected, min_expected=20.0) > 1e-3
    wrong = sampler(0.65).sample(ids, np.random.default_rng(15))
    assert chi_square_pvalue(wrong, expected, min_expected=20.0) < 1e-6


def test_every_path_in_one_shuffled_chunk(index_factory) -> None:  # type: ignore[no-untyped-def]
    """One call mixing all five paths (sorted rows 0–9, listed clusters 10–29, table-row clusters
    30–54, the d_K envelope 55–79, a scan row for word 60's burst) on shuffled tokens: each output
    belongs to its own token and the whole follows the closed form; 30% wrong ε is rejected."""
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)

    def sampler(scale: float) -> FullVocabularySampler:
        return FullVocabularySampler(idx, scale, cache_bytes=0, scan_from_count=3000, sorted_words=10,
                                     extended_words=30, extended_width=12, clusters=6, table_clusters=6,
                                     table_cluster_words=55)

    ids = np.concatenate([np.repeat(np.arange(N), 1200), np.full(2500, 60)])
    ids = ids[np.random.default_rng(8).permutation(len(ids))]
    right = sampler(0.4)
    out = right.sample(ids, np.random.default_rng(9))
    assert right.sorted.tokens == 10 * 1200 and right.clustered.tokens == 20 * 1200
    assert right.clustered_table.tokens == 25 * 1200 and right.envelope.tokens == 24 * 1200
    expected = closed_form(v, 0.4)
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    wrong = sampler(0.4 * 1.3).sample(ids, np.random.default_rng(9))
    assert pooled_chi_square_pvalue(ids, wrong, expected) < 1e-6
