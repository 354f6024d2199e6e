"""Sampling primitives shared by mechanisms. All take an injected Generator and work in float64."""

from __future__ import annotations

import numpy as np

_TWO_POW_53 = 1 << 53


def open_uniform(rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
    """Uniforms strictly inside (0, 1): the midpoints of a 2^-53 grid, so log(u) and log(1 − u)
    are always finite (rng.random() can return exactly 0)."""
    k = rng.integers(0, _TWO_POW_53, size=size, dtype=np.uint64)
    return (k.astype(np.float64) + 0.5) * (1.0 / _TWO_POW_53)


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
