"""The fast neighbour table is exactly the brute-force float64 table: same ids, same distances,
ties broken by id, whatever the block layout, grouping or thread count."""

from __future__ import annotations

import numpy as np
import pytest

import privtext.neighbors as nb
from privtext.neighbors import (
    blas_threads,
    exact_neighbor_table,
    float32_margin,
    pair_distances,
)


def brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair in float64 (NumPy's norm of the difference), rows sorted by (distance, id)."""
    v = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    ids, dist = [], []
    for start in range(0, len(v), 256):
        full = np.linalg.norm(v[start:start + 256, None, :] - v[None, :, :], axis=2)
        order = np.argsort(full, axis=1, kind="stable")[:, :k]  # stable: equal distances by id
        ids.append(order)
        dist.append(np.take_along_axis(full, order, axis=1))
    return np.concatenate(ids), np.concatenate(dist)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the block and grouping sizes so a few thousand words cross every code path:
    many block pairs, the k-means grouping, several probe groups, pending-candidate flushes."""
    monkeypatch.setattr(nb, "BLOCK", 256)
    monkeypatch.setattr(nb, "_GROUP_SIZE", 64)
    monkeypatch.setattr(nb, "_PROBE_COLUMNS", 400)


@pytest.mark.parametrize("threads", [1, 2])
def test_equals_brute_force_across_blocks(small_blocks, threads: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(11)
    # clustered data with varied norms, like embeddings (frequent words near the centre)
    centres = rng.normal(size=(20, 12)) * 3
    vecs = (centres[rng.integers(0, 20, 3000)] + rng.normal(size=(3000, 12)) * rng.uniform(0.2, 2, (3000, 1)))
    vecs = vecs.astype(np.float32)
    ids, dist, stats = exact_neighbor_table(vecs, 24, threads=threads, progress=False)
    exp_ids, exp_dist = brute_force(vecs, 24)
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_array_equal(dist, exp_dist)  # bit-for-bit float64
    assert ids.dtype == np.int32 and dist.dtype == np.float64
    assert stats.candidates_per_row >= 24


def test_ties_are_broken_by_id(small_blocks) -> None:  # type: ignore[no-untyped-def]
    # a lattice: many words at exactly equal distances from each other
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    vecs = (grid * 0.5).astype(np.float32)
    ids, dist, _ = exact_neighbor_table(vecs, 30, progress=False)
    exp_ids, exp_dist = brute_force(vecs, 30)
    assert (np.diff(exp_dist, axis=1) == 0).sum() > 1000  # the case really has ties
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_array_equal(dist, exp_dist)


def test_real_embedding_sample_equals_brute_force(glove_small) -> None:  # type: ignore[no-untyped-def]
    ids, dist, _ = exact_neighbor_table(np.asarray(glove_small.vectors), 64, progress=False)
    sample = np.arange(0, glove_small.n, 97)
    v = np.asarray(glove_small.vectors).astype(np.float64)
    full = np.linalg.norm(v[sample, None, :] - v[None, :, :], axis=2)
    expected = np.argsort(full, axis=1, kind="stable")[:, :64]
    np.testing.assert_array_equal(ids[sample], expected)
    np.testing.assert_array_equal(dist[sample], np.take_along_axis(full, expected, axis=1))
    # and the cached table is this table
    np.testing.assert_array_equal(glove_small.neighbor_ids, ids)
    np.testing.assert_array_equal(glove_small.neighbor_dist, dist)


def test_k_larger_than_vocabulary() -> None:
    vecs = np.random.default_rng(2).normal(size=(7, 4)).astype(np.float32)
    ids, dist, _ = exact_neighbor_table(vecs, 64, progress=False)
    exp_ids, exp_dist = brute_force(vecs, 7)
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_array_equal(dist, exp_dist)


def test_pair_distances_is_symmetric_and_batch_independent() -> None:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(500, 50)).astype(np.float32) * 5
    rows, cols = rng.integers(0, 500, 3000), rng.integers(0, 500, 3000)
    d = pair_distances(vecs, rows, cols)
    np.testing.assert_array_equal(d, pair_distances(vecs, cols, rows))
    np.testing.assert_array_equal(d[17:18], pair_distances(vecs, rows[17:18], cols[17:18]))
    v = vecs.astype(np.float64)
    np.testing.assert_array_equal(d, np.linalg.norm(v[rows] - v[cols], axis=-1))


def test_float32_margin_bounds_the_error_of_the_augmented_product() -> None:
    """The premise of exactness: |D̃ − ‖x − y‖²| ≤ c (‖x‖² + ‖y‖²) for the float32 product the
    scan computes, on vectors with large norms and tiny separations (the worst cancellation)."""
    rng = np.random.default_rng(4)
    dim = 50
    base = rng.normal(size=(400, dim)) * 8
    x = base.astype(np.float32)
    y = (base + rng.normal(size=base.shape) * 1e-3).astype(np.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    nx, ny = (x64**2).sum(1), (y64**2).sum(1)
    left = np.hstack([x, nx[:, None].astype(np.float32), np.ones((400, 1), np.float32)])
    right = np.hstack([-2 * y, np.ones((400, 1), np.float32), ny[:, None].astype(np.float32)])
    approx = (left @ right.T).astype(np.float64)
    exact = ((x64[:, None, :] - y64[None, :, :]) ** 2).sum(-1)
    err = np.abs(approx - exact)
    bound = float32_margin(dim) * (nx[:, None] + ny[None, :])
    assert np.all(err <= bound)
    assert err.max() > bound.max() / 1000  # the bound is not vacuous: errors come near it


def test_blas_threads_limits_and_restores() -> None:
    setters = nb._openblas_setters()
    if not setters:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS with a thread setter")
    before = [get() for _set, get in setters]
    with blas_threads(1):
        assert [get() for _set, get in setters] == [1] * len(setters)
    assert [get() for _set, get in setters] == before
