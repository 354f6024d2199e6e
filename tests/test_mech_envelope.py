"""The exact envelope sampler (envelope.py) behind santext, density exact and tem beyond the table.

These tests force the envelope path (no scan rows, no cache) on vocabularies with a tiny neighbour
table and small ε, so that almost all of the mass lies beyond the table and almost every output
comes from the rejection step; the frequencies must match the closed form, and the same test must
reject a 30% wrong ε (power check). Each case runs with the table as the exact list and with the
extended lists (the M nearest words of the most frequent words, here M = 12 of 80).
"""

from __future__ import annotations

import numpy as np
import pytest
from mech_stats import chi_square_pvalue, pairwise_distances, pooled_chi_square_pvalue

from privtext.mechanisms import create
from privtext.mechanisms.envelope import build_extended, build_reverse_neighbours, tail_radius
from privtext.mechanisms.fullvocab import FullVocabularySampler

N = 80


def vocabulary(n: int = N, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)) * 1.5


def closed_form(vectors: np.ndarray, scale: float, lo: int = 0, clamp: float | None = None,
                log_prior: np.ndarray | None = None) -> np.ndarray:
    d = pairwise_distances(vectors)
    if clamp is not None:
        d = np.minimum(d, clamp)
    logits = -scale * d + (0.0 if log_prior is None else log_prior[None, :])
    logits[:, :lo] = -np.inf
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return w / w.sum(axis=1, keepdims=True)


def envelope_only(index, scale: float, **kwargs) -> FullVocabularySampler:  # type: ignore[no-untyped-def]
    """A sampler that draws every token by the envelope (no scan rows, no cache, no sorted rows,
    no cluster bounds, no extended lists unless asked)."""
    kwargs.setdefault("extended_words", 0)
    return FullVocabularySampler(index, scale, cache_bytes=0, scan_from_count=1 << 62, sorted_words=0,
                                 clusters=0, table_clusters=0, **kwargs)


# Extended lists for the first 50 of the 80 words: both groups of words occur in every test.
EXTENDED = {"extended_words": 50, "extended_width": 12}


def draws(sampler: FullVocabularySampler, n: int, per_word: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.repeat(np.arange(n), per_word)
    return ids, sampler.sample(ids, np.random.default_rng(seed))


def _wide_prior() -> np.ndarray:
    """A prior whose range (> 600 nats, one word far below the others) turns off the merged
    low part: every bin is then its own column of the proposal."""
    lp = np.random.default_rng(9).normal(size=N) * 1.5
    lp[7] = -700.0
    return lp


CASES = {  # (scale = ε/2, sampler options)
    "santext": (0.35, {}),
    "santext+ range": (0.35, {"lo": 30}),
    "tem clamp": (0.6, {"clamp": 4.0}),
    "density prior": (0.35, {"log_prior": np.random.default_rng(9).normal(size=N) * 1.5}),
    "prior without merging": (0.35, {"log_prior": _wide_prior()}),
}


@pytest.mark.parametrize("extended", [False, True], ids=["table", "extended"])
@pytest.mark.parametrize("case", list(CASES))
def test_tail_dominated_draws_match_the_closed_form(index_factory, case: str, extended: bool) -> None:  # type: ignore[no-untyped-def]
    scale, kwargs = CASES[case]
    kwargs = {**kwargs, **(EXTENDED if extended else {})}
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    ids, out = draws(envelope_only(idx, scale, **kwargs), N, 1500, seed=1)
    expected = closed_form(v, scale, kwargs.get("lo", 0), kwargs.get("clamp"), kwargs.get("log_prior"))
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    # The tail really is what was sampled: most outputs lie beyond the 3-word table (and beyond
    # the 12-word extended lists).
    table = np.asarray(idx.neighbor_ids)
    assert (~(table[ids] == out[:, None]).any(axis=1)).mean() > 0.8
    sampler = envelope_only(idx, scale, **kwargs)
    sampler.envelope._setup()
    assert sampler.envelope.merge_low == (case != "prior without merging")
    if extended:
        lists = np.asarray(sampler.envelope.ext_ids, dtype=np.int64)
        has = ids < 50
        assert (~(lists[ids[has]] == out[has, None]).any(axis=1)).mean() > 0.5
    # Power: the same test rejects draws made at a 30% larger ε.
    ids, wrong = draws(envelope_only(idx, scale * 1.3, **kwargs), N, 1500, seed=1)
    assert pooled_chi_square_pvalue(ids, wrong, expected) < 1e-6


def test_moderate_epsilon_mixes_table_and_tail_exactly(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=5)
    v = np.asarray(idx.vectors, np.float64)
    ids, out = draws(envelope_only(idx, 1.2), N, 1500, seed=2)
    expected = closed_form(v, 1.2)
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    ids, wrong = draws(envelope_only(idx, 1.2 * 1.3), N, 1500, seed=2)
    assert pooled_chi_square_pvalue(ids, wrong, expected) < 1e-6


def hub_vocabulary() -> np.ndarray:
    """A centre word with the 12 vertices of an icosahedron around it (circumradius 1, edges
    about 1.05, slightly jittered): every vertex has the centre in its 3-word table, the centre's
    table holds only 2 of them, so 10 are reverse neighbours beyond the centre's table (E_x),
    where only the weaker bound d ≥ κ_x holds."""
    phi = (1 + 5**0.5) / 2
    verts = np.array([[a, b * phi, 0] for a in (-1, 1) for b in (-1, 1)], dtype=np.float64)
    verts = np.vstack([verts, np.roll(verts, 1, axis=1), np.roll(verts, 2, axis=1)])
    verts /= np.linalg.norm(verts, axis=1, keepdims=True)
    verts += np.random.default_rng(3).normal(size=verts.shape) * 0.01
    far = np.random.default_rng(4).normal(size=(20, 3)) * 0.5 + np.array([4.0, 0.0, 0.0])
    return np.vstack([[[0.0, 0.0, 0.0]], verts, far])


def test_reverse_neighbours_beyond_the_table_are_sampled_exactly(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(hub_vocabulary(), neighbors=3)
    packed = build_reverse_neighbours(idx)
    offsets, members = packed[: idx.n + 1], packed[idx.n + 1 :]
    hub = members[offsets[0] : offsets[1]]
    assert len(hub) == 10 and set(hub.tolist()) <= set(range(1, 13))
    v = np.asarray(idx.vectors, np.float64)
    sampler = envelope_only(idx, 0.8)
    out = sampler.sample(np.zeros(60_000, dtype=np.int64), np.random.default_rng(3))
    expected = closed_form(v, 0.8)[0]
    assert chi_square_pvalue(out, expected) > 1e-3
    wrong = envelope_only(idx, 0.8 * 1.3).sample(np.zeros(60_000, dtype=np.int64), np.random.default_rng(3))
    assert chi_square_pvalue(wrong, expected) < 1e-6


def test_reverse_lists_match_brute_force(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=4)
    packed = build_reverse_neighbours(idx)
    offsets, members = packed[: idx.n + 1], packed[idx.n + 1 :]
    table = np.asarray(idx.neighbor_ids)
    for x in range(idx.n):
        want = {y for y in range(idx.n) if y != x and x in table[y] and y not in table[x]}
        assert set(members[offsets[x] : offsets[x + 1]].tolist()) == want


def test_tail_radius_bounds_every_distance_beyond_the_table(glove_small) -> None:  # type: ignore[no-untyped-def]
    kappa = tail_radius(glove_small)
    assert (kappa <= np.asarray(glove_small.neighbor_dist[:, -1])).all()
    v = np.asarray(glove_small.vectors, np.float64)
    table = np.asarray(glove_small.neighbor_ids)
    for x in np.random.default_rng(0).choice(glove_small.n, 40, replace=False):
        d = np.linalg.norm(v - v[x], axis=1)
        outside = np.ones(glove_small.n, dtype=bool)
        outside[table[x]] = False
        assert d[outside].min() >= kappa[x]


def test_extended_lists_certify_their_radius(glove_small) -> None:  # type: ignore[no-untyped-def]
    """Every word outside x's extended list is at least ρ_x away, the list holds x's table row
    and x itself, and its distances are the float64 distances."""
    words, width = 60, 300
    ids, dist = build_extended(glove_small, words, width)
    v = np.asarray(glove_small.vectors, np.float64)
    table = np.asarray(glove_small.neighbor_ids)
    for x in range(words):
        d = np.linalg.norm(v - v[x], axis=1)
        listed = ids[x].astype(np.int64)
        assert (np.diff(listed) > 0).all() and x in listed and set(table[x]) <= set(listed.tolist())
        np.testing.assert_allclose(dist[x, :width], d[listed], rtol=1e-12, atol=1e-12)
        outside = np.ones(glove_small.n, dtype=bool)
        outside[listed] = False
        assert d[outside].min() >= dist[x, width]
        assert dist[x, width] > 0.99 * np.sort(d)[width - 1]  # and it is not loose
        assert dist[x, width + 1] == dist[x, :width].max()


@pytest.mark.parametrize("extended", [False, True], ids=["table", "extended"])
def test_exhausted_tries_fall_back_to_the_scan_exactly(index_factory, extended: bool) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    sampler = envelope_only(idx, 0.35, max_tries=1, **(EXTENDED if extended else {}))
    ids, out = draws(sampler, N, 1500, seed=4)
    assert sampler.fallbacks > 0.2 * len(ids)  # many tokens needed the scan
    assert pooled_chi_square_pvalue(ids, out, closed_form(v, 0.35)) > 1e-3


def test_scan_and_envelope_words_in_one_chunk(index_factory) -> None:  # type: ignore[no-untyped-def]
    """Frequent words of a chunk take the scan, rare ones the envelope; both follow the law."""
    idx = index_factory(vocabulary(), neighbors=3)
    v = np.asarray(idx.vectors, np.float64)
    sampler = FullVocabularySampler(idx, 0.5, cache_bytes=0, scan_from_count=1000, sorted_words=0,
                                    clusters=0, table_clusters=0)
    heavy = np.repeat(np.arange(10), 3000)
    light = np.tile(np.arange(10, N), 900)  # 900 tokens each: below the scan threshold
    ids = np.concatenate([heavy, light])
    out = sampler.sample(ids, np.random.default_rng(5))
    expected = closed_form(v, 0.5)
    assert pooled_chi_square_pvalue(ids[: len(heavy)], out[: len(heavy)], expected) > 1e-3
    assert pooled_chi_square_pvalue(ids[len(heavy) :], out[len(heavy) :], expected) > 1e-3


@pytest.mark.parametrize("extended", [False, True], ids=["table", "extended"])
def test_draws_depend_only_on_the_ids_and_the_generator(index_factory, extended: bool) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=3)
    ids = np.random.default_rng(6).integers(0, N, 5000)
    opts = EXTENDED if extended else {}
    first = envelope_only(idx, 0.5, **opts)
    a = first.sample(ids, np.random.default_rng(7))
    first.sample(ids[::-1], np.random.default_rng(8))  # earlier chunks leave no trace
    b = first.sample(ids, np.random.default_rng(7))
    c = envelope_only(idx, 0.5, **opts).sample(ids, np.random.default_rng(7))  # another process's sampler
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_mechanisms_use_the_envelope_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    """santext at small ε on real vectors: the draws of one rare word follow the exact
    distribution (chi-square with pooled small bins) and reject a 30% wrong ε. (On this
    2000-word index every word has an extended list, so the cluster-bounded envelope serves it.)"""
    x = glove_small.n - 7
    mech = create("santext", glove_small, 1.0, {})
    expected = mech.probabilities(x)
    ids = np.full(40_000, x)
    sampler = mech.sampler
    sampler.cache_words, sampler.scan_from_count = 0, 1 << 62
    out = mech.perturb_ids(ids, np.random.default_rng(11))
    assert chi_square_pvalue(out, expected, min_expected=20.0) > 1e-3
    wrong = create("santext", glove_small, 1.3, {})
    wrong.sampler.cache_words, wrong.sampler.scan_from_count = 0, 1 << 62
    assert chi_square_pvalue(wrong.perturb_ids(ids, np.random.default_rng(11)), expected,
                             min_expected=20.0) < 1e-6


def test_guided_search_is_searchsorted() -> None:
    """The guide table only gives a starting point: the result is np.searchsorted's, including
    at repeated values (zero-weight words), at exact entries and at the last one."""
    from privtext.mechanisms.envelope import _guided_search

    rng = np.random.default_rng(0)
    for n in (1, 5, 1000, 100_000):
        cum = np.cumsum(rng.random(n) * (rng.random(n) < 0.7)) + 1e-3
        guide = np.searchsorted(cum, np.arange(1 << 10) * (cum[-1] / (1 << 10)), side="right")
        target = np.concatenate([rng.random(50_000) * cum[-1], cum[rng.integers(0, n, 1000)],
                                 [0.0, cum[-1] * (1 - 2**-53)]])
        np.testing.assert_array_equal(_guided_search(cum, guide, target),
                                      np.searchsorted(cum, target, side="right"))


def test_extended_lists_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    """santext-like draws (ε = 1) of a frequent word with extended lists of 200 words on real
    vectors: most outputs come from beyond the list, the frequencies follow the exact
    distribution, and a 30% wrong ε is rejected."""
    x = 5

    def sampler(scale: float) -> FullVocabularySampler:
        return FullVocabularySampler(glove_small, scale, cache_bytes=0, scan_from_count=1 << 62,
                                     extended_words=100, extended_width=200, sorted_words=0, clusters=0,
                                     table_clusters=0)

    right = sampler(0.5)
    expected = right.probabilities(x)
    ids = np.full(40_000, x)
    out = right.sample(ids, np.random.default_rng(12))
    assert right.envelope.ext_words == 100
    assert (~np.isin(out, np.asarray(right.envelope.ext_ids[x]))).mean() > 0.3
    assert chi_square_pvalue(out, expected, min_expected=20.0) > 1e-3
    wrong = sampler(0.65).sample(ids, np.random.default_rng(12))
    assert chi_square_pvalue(wrong, expected, min_expected=20.0) < 1e-6


def test_guided_columns_are_search_rows() -> None:
    """The guide only gives a starting column: the answer is the binary search's, with zero-mass
    columns, masses on exact multiples of 1/G, one column holding all the mass, and u near 0
    and 1."""
    from privtext.mechanisms.envelope import guide_table, guided_columns, search_rows

    rng = np.random.default_rng(1)
    for width in (1, 2, 7, 300, 5000):
        w = rng.random((50, width)) * (rng.random((50, width)) < 0.6)
        w[:, -1] += 1e-3
        w[0] = 0.0
        w[0, width // 2] = 1.0
        cum = np.cumsum(w, axis=1)
        cum /= cum[:, -1:]
        cum[1] = np.minimum(np.round(cum[1] * 64) / 64, 1.0)  # entries on the guide's grid
        cum[1, -1] = 1.0
        guide = guide_table(cum)
        rows = rng.integers(0, 50, 20_000)
        u = np.concatenate([rng.random(19_000), np.arange(1, 1001) / 1024.0 * 0.999])
        u = np.clip(u, 2.0**-53, 1 - 2.0**-53)
        u[:3] = [2.0**-53, 1 - 2.0**-53, 0.5]
        np.testing.assert_array_equal(guided_columns(cum, guide, rows, u), search_rows(cum, rows, u))
