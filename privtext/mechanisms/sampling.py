"""Sampling primitives shared by mechanisms. All take an injected Generator and work in float64."""

from __future__ import annotations

import numpy as np

_GRID_BITS = 52


def open_uniform(rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
    """Uniforms strictly inside (0, 1): midpoints (k + 1/2)·2^-52 of a 2^-52 grid, so log(u) and
    log(1 − u) are always finite (rng.random() can return exactly 0). With 52 bits, k + 1/2 is
    exact in float64 and the extremes are 2^-53 and 1 − 2^-53; a 53-bit grid would round its
    top midpoint up to exactly 1."""
    k = rng.integers(0, 1 << _GRID_BITS, size=size, dtype=np.int64)
    u = k.astype(np.float64)
    u += 0.5
    u *= 2.0**-_GRID_BITS
    return u


def standard_gumbel(rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
    """Gumbel(0, 1) by inverse CDF: −log(−log u)."""
    return -np.log(-np.log(open_uniform(rng, size)))


def gumbel_argmax(rng: np.random.Generator, scores: np.ndarray) -> np.ndarray:
    """Exponential-mechanism sampling in Gumbel-max form: argmax over the last axis of
    scores + Gumbel(0, 1) selects index j with probability ∝ exp(scores_j)."""
    return np.argmax(scores + standard_gumbel(rng, scores.shape), axis=-1)


def uniform_directions(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """`count` directions uniform on the unit sphere S^{dim−1} (normalised standard Gaussians)."""
    g = rng.standard_normal((count, dim))
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g / norms
