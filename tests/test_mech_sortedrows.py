"""Distance-sorted rows (sortedrows.py): the exact sampler of the most frequent words.

The tests put every word of a small vocabulary on the sorted-row path (sorted_words = n), with
small ε so that the mass spreads over the whole vocabulary; the frequencies must match the closed
form, and the same test must reject a 30% wrong ε (power check). The cases cover a flat prior, a
range served by the prior-free rows (SanText+), a narrow range and density-like priors served by
rows built for the prior, and tem's clamp.
"""

from __future__ import annotations

import numpy as np
import pytest
from mech_stats import chi_square_pvalue, pooled_chi_square_pvalue
from test_mech_envelope import closed_form

from privtext.mechanisms import create
from privtext.mechanisms.fullvocab import FullVocabularySampler
from privtext.mechanisms.sortedrows import build_sorted_rows

N = 80


def vocabulary(n: int = N, seed: int = 15) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)) * 1.5


def rows_only(index, scale: float, **kwargs) -> FullVocabularySampler:  # type: ignore[no-untyped-def]
    """Every word drawn from its sorted row (no scan, no envelope)."""
    return FullVocabularySampler(index, scale, cache_bytes=0, scan_from_count=1 << 62,
                                 sorted_words=index.n, **kwargs)


def _wide_prior() -> np.ndarray:
    lp = np.random.default_rng(9).normal(size=N) * 1.5
    lp[7] = -700.0
    return lp


CASES = {  # (scale = ε/2, sampler options, whether the rows are the prior-free ones)
    "santext": (0.35, {}, True),
    "santext+ wide range": (0.35, {"lo": 30}, True),
    "narrow range": (0.35, {"lo": 60}, False),
    "tem clamp": (0.6, {"clamp": 4.0}, True),
    "density prior": (0.35, {"log_prior": np.random.default_rng(9).normal(size=N) * 1.5}, False),
    "prior with a far word": (0.35, {"log_prior": _wide_prior()}, False),
    "larger epsilon": (1.5, {}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sorted_rows_draw_the_closed_form(index_factory, case: str) -> None:  # type: ignore[no-untyped-def]
    scale, kwargs, prior_free = CASES[case]
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    ids = np.repeat(np.arange(N), 1500)
    sampler = rows_only(idx, scale, **kwargs)
    out = sampler.sample(ids, np.random.default_rng(1))
    assert sampler.sorted.tokens == len(ids) and sampler.envelope.tokens == 0 and sampler.fallbacks == 0
    assert (sampler.sorted.artifact_prior is None) == prior_free
    expected = closed_form(v, scale, kwargs.get("lo", 0), kwargs.get("clamp"), kwargs.get("log_prior"))
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    # Power: the same test rejects draws made at a 30% larger ε.
    wrong = rows_only(idx, scale * 1.3, **kwargs).sample(ids, np.random.default_rng(1))
    assert pooled_chi_square_pvalue(ids, wrong, expected) < 1e-6


def test_exhausted_tries_fall_back_to_the_scan_exactly(index_factory) -> None:  # type: ignore[no-untyped-def]
    """With one proposal allowed, the rejected tokens (a few hundred: the bins are narrow) are
    drawn by the scan: still the law."""
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    prior = np.random.default_rng(9).normal(size=N) * 1.5
    sampler = rows_only(idx, 0.35, max_tries=1, log_prior=prior)
    ids = np.repeat(np.arange(N), 1500)
    out = sampler.sample(ids, np.random.default_rng(4))
    assert sampler.fallbacks > 100
    assert pooled_chi_square_pvalue(ids, out, closed_form(v, 0.35, log_prior=prior)) > 1e-3


def test_draws_depend_only_on_the_ids_and_the_generator(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=3)
    ids = np.random.default_rng(6).integers(0, N, 5000)
    first = rows_only(idx, 0.5)
    a = first.sample(ids, np.random.default_rng(7))
    first.sample(ids[::-1], np.random.default_rng(8))  # earlier chunks leave no trace
    b = first.sample(ids, np.random.default_rng(7))
    c = rows_only(idx, 0.5).sample(ids, np.random.default_rng(7))  # another process's sampler
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("with_prior", [False, True], ids=["flat", "prior"])
def test_rows_certify_their_bounds(glove_small, with_prior: bool) -> None:  # type: ignore[no-untyped-def]
    """Each row is a permutation of the vocabulary; every word of a bin is at least the bin's ℓ
    away (true float64 distance) and its log π is at most the bin's, within the prior step."""
    words = 24
    prior = np.random.default_rng(2).normal(size=glove_small.n) * 0.7 if with_prior else None
    if prior is not None:
        prior[::50] = -np.inf  # words outside a range: their own bins, of mass 0
    order, bins = build_sorted_rows(glove_small, words, prior)
    v = np.asarray(glove_small.vectors, np.float64)
    n = glove_small.n
    for x in range(words):
        assert (np.sort(order[x]) == np.arange(n)).all()
        starts = bins[x, 0].astype(np.int64)
        used = int(np.searchsorted(starts, n))
        assert (np.diff(starts[:used]) > 0).all() and starts[0] == 0 and (starts[used:] == n).all()
        d = np.linalg.norm(v[order[x]] - v[x], axis=1)
        owner = np.repeat(np.arange(used), np.diff(np.append(starts[:used], n)))
        assert (d >= bins[x, 1, owner]).all()
        # Not loose: ℓ_j is the bin's smallest distance (with a prior: its distance bin's, at
        # most one grid step of 0.05 below).
        slack = 1e-6 if prior is None else 0.05 + 1e-6
        assert (bins[x, 1, :used] > np.minimum.reduceat(d, starts[:used]) - slack).all()
        if prior is None:
            assert (bins[x, 2, :used] == 0.0).all()
        else:
            lp, top = prior[order[x]], bins[x, 2, owner]
            assert (lp <= top).all()
            finite = np.isfinite(lp)
            assert (top[finite] - lp[finite] < 0.1).all() and np.isneginf(top[~finite]).all()


@pytest.mark.parametrize("mechanism,epsilon", [("santext", 1.0), ("tem", 1.0)])
def test_frequent_word_on_the_real_embedding(glove_small, mechanism: str, epsilon: float) -> None:  # type: ignore[no-untyped-def]
    """A frequent word through the mechanism's default sampler: drawn from its sorted row, the
    frequencies follow the exact distribution, and a 30% wrong ε is rejected."""
    x = 5
    mech = create(mechanism, glove_small, epsilon, {})
    sampler = mech.wide if mechanism == "tem" else mech.sampler  # type: ignore[attr-defined]
    assert 0 < x < sampler.sorted.words
    expected = mech.probabilities(x)
    ids = np.full(40_000, x)
    out = mech.perturb_ids(ids, np.random.default_rng(12))
    assert sampler.sorted.tokens > 0.9 * len(ids)
    assert chi_square_pvalue(out, expected, min_expected=20.0) > 1e-3
    wrong = create(mechanism, glove_small, epsilon * 1.3, {})
    assert chi_square_pvalue(wrong.perturb_ids(ids, np.random.default_rng(12)), expected,
                             min_expected=20.0) < 1e-6


def test_density_prior_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    """density (exact) at ε = 1: a frequent word's draws from rows built for the real prior."""
    x = 3
    mech = create("density", glove_small, 1.0, {})
    sampler = mech.sampler  # type: ignore[attr-defined]
    assert x < sampler.sorted.words and sampler.sorted.artifact_prior is not None
    expected = mech.probabilities(x)
    ids = np.full(40_000, x)
    out = mech.perturb_ids(ids, np.random.default_rng(13))
    assert chi_square_pvalue(out, expected, min_expected=20.0) > 1e-3
    wrong = create("density", glove_small, 1.3, {})
    assert chi_square_pvalue(wrong.perturb_ids(ids, np.random.default_rng(13)), expected,
                             min_expected=20.0) < 1e-6
