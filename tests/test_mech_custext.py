"""CusText (mechanisms.md §8): the greedy partition, the in-group exponential mechanism."""

from __future__ import annotations

import numpy as np
import pytest
from mech_stats import pairwise_distances, pooled_chi_square_pvalue

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.custext import CusTextMechanism, CusTextParams

EPS, K, N = 4.0, 7, 40


def vocabulary() -> np.ndarray:
    return np.random.default_rng(31).normal(size=(N, 3)) * 2.0


def reference_partition(vectors: np.ndarray, k: int) -> list[list[int]]:
    """The rule of §8 spelled out: in row order, each unassigned word and its k − 1 nearest
    unassigned words (by distance, then id) form a group."""
    d = pairwise_distances(vectors)
    free = set(range(len(vectors)))
    groups = []
    for anchor in range(len(vectors)):
        if anchor not in free:
            continue
        ranked = sorted(free, key=lambda y: (d[anchor, y], y))[:k]
        groups.append(ranked)
        free -= set(ranked)
    return groups


def closed_form(vectors: np.ndarray, groups: list[list[int]], epsilon: float) -> np.ndarray:
    d = pairwise_distances(vectors)
    out = np.zeros((len(vectors), len(vectors)))
    for members in groups:
        for x in members:
            dist = d[x, members]
            u = -(dist - dist.min()) / (dist.max() - dist.min())
            w = np.exp(epsilon * u / 2.0)
            out[x, members] = w / w.sum()
    return out


@pytest.mark.parametrize("neighbors", [N, 3])
def test_partition_follows_the_greedy_rule(index_factory, neighbors: int) -> None:  # type: ignore[no-untyped-def]
    """A table as wide as the vocabulary (table path) and a 3-wide one (exact fallback search)."""
    idx = index_factory(vocabulary(), neighbors=neighbors)
    mech = create("custext", idx, EPS, {"K": str(K)})
    groups, _, group_of = mech._artifacts()
    vectors = np.asarray(idx.vectors, np.float64)
    got = [list(row[row >= 0]) for row in np.asarray(groups)]
    assert got == reference_partition(vectors, K)
    assert sorted(np.concatenate([np.asarray(g) for g in got]).tolist()) == list(range(N))
    assert [len(g) for g in got] == [7, 7, 7, 7, 7, 5]
    assert (group_of >= 0).all()


def test_output_frequencies_match_the_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=12)
    vectors = np.asarray(idx.vectors, np.float64)
    expected = closed_form(vectors, reference_partition(vectors, K), EPS)
    mech = create("custext", idx, EPS, {"K": str(K)})
    ids = np.repeat(np.arange(N), 1500)
    out = mech.perturb_ids(ids, np.random.default_rng(1))
    assert pooled_chi_square_pvalue(ids, out, expected) > 1e-3
    np.testing.assert_allclose(mech.probabilities(3), expected[3], rtol=1e-12)
    # The output never leaves the input's group.
    assert (mech.group_of(out) == mech.group_of(ids)).all()


def test_frequency_test_rejects_a_wrong_epsilon(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=12)
    vectors = np.asarray(idx.vectors, np.float64)
    expected = closed_form(vectors, reference_partition(vectors, K), EPS)
    mech = create("custext", idx, EPS * 1.3, {"K": str(K)})
    ids = np.repeat(np.arange(N), 1500)
    assert pooled_chi_square_pvalue(ids, mech.perturb_ids(ids, np.random.default_rng(1)), expected) < 1e-6


def test_partition_is_built_once_and_cached_with_the_index(index_factory) -> None:  # type: ignore[no-untyped-def]
    idx = index_factory(vocabulary(), neighbors=12)
    create("custext", idx, EPS, {"K": str(K)}).prepare()
    files = sorted((idx.path / "derived").glob("custext-*.npy"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    create("custext", idx, 1.0, {"K": str(K)}).prepare()  # ε does not change the partition
    assert [f.stat().st_mtime_ns for f in files] == stamps
    create("custext", idx, EPS, {"K": "5"}).prepare()
    assert len(list((idx.path / "derived").glob("custext-*.npy"))) == 4


def test_partition_on_the_real_embedding(glove_small) -> None:  # type: ignore[no-untyped-def]
    mech = create("custext", glove_small, 2.0, {})
    derived = mech.derived()
    n = glove_small.n
    assert derived["groups"] == -(-n // 20)
    assert derived["largest_group"] == 20 and derived["smallest_group"] == (n % 20 or 20)
    ids = np.arange(n)
    out = mech.perturb_ids(ids, np.random.default_rng(2))
    assert (mech.group_of(out) == mech.group_of(ids)).all()


@pytest.mark.parametrize(("value", "message"), [
    ("1", r"K=1 is out of range; valid: \[2, inf\]"),
    ("0", r"valid: \[2, inf\]"),
    ("13", r"K=13 is larger than the vocabulary; valid: \[2, 12\]"),
    ("many", "cannot read the value as int"),
])
def test_bad_group_size_is_refused(tiny_index, value: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=message):
        create("custext", tiny_index, 1.0, {"K": value})


def test_privacy_map_says_pure_dp_within_groups_only(tiny_index) -> None:  # type: ignore[no-untyped-def]
    g = CusTextMechanism.privacy_map(2.0, CusTextParams(K=5), tiny_index.geometry)
    assert g.kind == "pure" and g.rate == 2.0 and g.metric is None
    assert g.statement.startswith("pure ε-DP between words of the same group; words of different "
                                  "groups are distinguishable")
    assert g.per_token_pure_bound is None  # across groups there is no bound
    assert any("reveals which group" in c for c in g.caveats)
    single = CusTextMechanism.privacy_map(2.0, CusTextParams(K=11), tiny_index.geometry)
    assert any("single word" in c for c in single.caveats)  # 12 words in groups of 11
