"""The bf16 AMX kernel of the exact search (amx_search.py): bf16 rounding, the proven bound on
the kernel's products measured on the hardware, and exact answers on awkward vocabularies
(mixed magnitudes, one and several k-steps of 32 dimensions). Skipped where the CPU has no
AMX-BF16 unless PRIVTEXT_REQUIRE_AMX=1 (CI on such machines); the numpy path that answers
otherwise is tested in test_mech_nearest.py."""

from __future__ import annotations

import numpy as np
import pytest

from privtext.mechanisms import amx_search
from privtext.mechanisms import nearest as nearest_mod
from privtext.mechanisms.nearest import nearest_words
from tests.test_mech_nearest import brute_force, require_amx


def test_bf16_rounds_to_nearest_even_and_flushes_subnormals() -> None:
    half = 2.0**-8  # half a bf16 step at 1.0
    values = np.array([1.0, 1.0 + half, 1.0 + 3 * half, 1.0 + half * 1.01, -(1.0 + 3 * half),
                       2.0**-127, -(2.0**-130), 0.0], dtype=np.float32)
    got = amx_search.bf16_values(amx_search.bf16_bits(values))
    want = [1.0, 1.0, 1.0 + 4 * half, 1.0 + 2 * half, -(1.0 + 4 * half), 0.0, 0.0, 0.0]
    np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=10_000) * np.exp(rng.uniform(-20, 20, 10_000))).astype(np.float32)
    err = np.abs(amx_search.bf16_values(amx_search.bf16_bits(x)) - x.astype(np.float64))
    assert (err <= 2.0**-8 * np.abs(x.astype(np.float64))).all()  # half an ulp of 8 bits


def _awkward(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Word vectors of mixed magnitudes: per word scale over 4 orders, some tiny components."""
    v = rng.normal(size=(n, m)) * np.exp(rng.uniform(-3, 3, size=(n, 1)))
    v[rng.random(size=v.shape) < 0.02] *= 1e-30
    return v


@pytest.mark.parametrize("m", [8, 50, 100])
def test_kernel_products_are_within_the_proven_bound(index_factory, m: int) -> None:  # type: ignore[no-untyped-def]
    """|C(w) − c(w)| ≤ E for every (point, word), C the kernel's fp32 result and c computed from
    the same bf16 values in float64; the measured error is a real fraction of E, so a bound
    1000× smaller would fail here."""
    require_amx()
    rng = np.random.default_rng(m)
    idx = index_factory(_awkward(rng, 600, m), neighbors=8)
    v = np.asarray(idx.vectors, np.float64)
    points = v[rng.integers(0, idx.n, 70)] + rng.normal(size=(70, m)) * rng.uniform(0.01, 20, (70, 1))
    got, bound = amx_search.products(idx, points)
    qb = amx_search.bf16_values(amx_search.bf16_bits(points.astype(np.float32)))
    vb = amx_search.bf16_values(amx_search.bf16_bits(np.asarray(idx.vectors, np.float32)))
    exact = np.einsum("ij,ij->i", vb, vb)[None, :] - 2.0 * qb @ vb.T
    error = np.abs(got - exact)
    assert (error <= bound[:, None]).all()
    assert (error / bound[:, None]).max() > 1e-3


@pytest.mark.parametrize("m", [8, 100])
@pytest.mark.parametrize("k", [1, 2])
def test_exact_answers_on_awkward_vocabularies(index_factory, monkeypatch, m: int, k: int) -> None:  # type: ignore[no-untyped-def]
    """One k-step (m + 3 ≤ 32) and four (m = 100, tiles reloaded per step), mixed magnitudes,
    far and near points and float64 near-ties: the float64 brute force's answer."""
    require_amx()
    monkeypatch.setattr(nearest_mod, "EXACT_METHOD", "amx")
    monkeypatch.setattr(amx_search, "_CHUNK_BLOCKS", 3)
    rng = np.random.default_rng(100 + m + k)
    idx = index_factory(_awkward(rng, 1500, m), neighbors=8)
    v = np.asarray(idx.vectors, np.float64)
    a = rng.integers(0, idx.n, 200)
    b = np.asarray(idx.neighbor_ids[a, 1], dtype=np.int64)
    axis = (v[b] - v[a]) / np.linalg.norm(v[b] - v[a], axis=1, keepdims=True)
    points = np.vstack([
        v[a] + rng.normal(size=(200, m)) * rng.uniform(0.001, 3.0, (200, 1)),
        (v[a] + v[b]) / 2 + axis * rng.choice([-1e-12, 1e-12], size=(200, 1)),
        v[a],
    ])
    anchors = rng.integers(0, idx.n, len(points))  # unrelated: the table cannot prune
    ids, dist = nearest_words(idx, points, anchors, k=k)
    want_ids, want_dist = brute_force(v, points, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)


@pytest.mark.parametrize("k", [1, 2])
def test_points_inside_a_shell_of_words(index_factory, monkeypatch, k: int) -> None:  # type: ignore[no-untyped-def]
    """Words on a shell of radius 3–5, points within 0.5 of its centre: every word has
    ‖q − φ‖² > ‖q‖², so only the threshold T' folded into the product (not the sign of the
    product alone) lets the nearest words through; from unrelated anchors, whose first table
    words start U far too high for some points."""
    require_amx()
    monkeypatch.setattr(nearest_mod, "EXACT_METHOD", "amx")
    rng = np.random.default_rng(30 + k)
    shell = rng.normal(size=(1200, 50))
    shell *= rng.uniform(3, 5, size=(1200, 1)) / np.linalg.norm(shell, axis=1, keepdims=True)
    idx = index_factory(shell, neighbors=8)
    v = np.asarray(idx.vectors, np.float64)
    points = rng.normal(size=(300, 50)) * rng.uniform(0.0, 0.5, size=(300, 1)) / np.sqrt(50)
    ids, dist = nearest_words(idx, points, rng.integers(0, idx.n, 300), k=k)
    want_ids, want_dist = brute_force(v, points, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)
