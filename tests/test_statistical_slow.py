"""Heavier statistical checks on the real embedding, marked `slow`.

CI runs them at the bounded default size; set PRIVTEXT_SLOW_SCALE=10 (or more) for a longer, more
sensitive local run. Each check is paired with a power check: the same test at the same sample
size must reject a mechanism whose noise scale is 30% off.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from mech_stats import chi_square_pvalue
from scipy import stats

from privtext.mechanisms import create
from privtext.mechanisms.gumbel import (
    TruncatedGumbelMechanism,
    epsilon_for_scale,
    output_distribution,
)
from privtext.mechanisms.laplace import laplace_noise

pytestmark = pytest.mark.slow
SCALE = max(1, int(os.environ.get("PRIVTEXT_SLOW_SCALE", "1")))


def reference_laplace(index, word: int, epsilon: float, draws: int, seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """An independent implementation: noise from numpy's own samplers, brute-force nearest word."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((draws, index.dim))
    noisy = index.vectors[word].astype(np.float64) + g / np.linalg.norm(g, axis=1, keepdims=True) * rng.gamma(
        index.dim, 1.0 / epsilon, size=(draws, 1))
    v = np.asarray(index.vectors, np.float64)
    out = np.empty(draws, dtype=np.int64)
    for start in range(0, draws, 512):
        block = noisy[start : start + 512]
        out[start : start + 512] = np.argmin((v**2).sum(1)[None, :] - 2 * block @ v.T, axis=1)
    return out


def homogeneity_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two samples of word ids come from one distribution (rare cells pooled)."""
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    counts = np.zeros((2, len(values)), dtype=np.int64)
    np.add.at(counts[0], inverse[: len(a)], 1)
    np.add.at(counts[1], inverse[len(a) :], 1)
    common = counts.sum(0) >= 10
    table = np.column_stack([counts[:, common], counts[:, ~common].sum(1)])
    table = table[:, table.sum(0) > 0]
    return float(stats.chi2_contingency(table).pvalue)


@pytest.mark.parametrize("word", [3, 150, 1200])
def test_laplace_matches_an_independent_implementation(glove_small, word: int) -> None:  # type: ignore[no-untyped-def]
    draws = 6000 * SCALE
    eps = 6.0
    mech = create("laplace", glove_small, eps, {})
    ours = mech.perturb_ids(np.full(draws, word), np.random.default_rng(word))
    assert homogeneity_pvalue(ours, reference_laplace(glove_small, word, eps, draws, seed=10_000 + word)) > 1e-3
    # power: the same test tells ε apart from ε off by 30%
    assert homogeneity_pvalue(ours, reference_laplace(glove_small, word, eps * 1.3, draws, seed=20_000 + word)) < 1e-3


def test_laplace_noise_radius_on_many_draws() -> None:
    noise = laplace_noise(np.random.default_rng(9), 200_000 * SCALE, 50, 3.0)
    radius = np.linalg.norm(noise, axis=1)
    assert stats.kstest(radius, stats.gamma(a=50, scale=1 / 3.0).cdf).pvalue > 1e-3
    assert stats.kstest(radius, stats.gamma(a=50, scale=1 / 3.03).cdf).pvalue < 1e-3  # 1% off


def test_gumbel_every_word_of_a_full_table_vocabulary(index_factory) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(31)
    idx = index_factory(rng.normal(size=(30, 3)), neighbors=30)
    eps = epsilon_for_scale(1.0, idx.n, idx.geometry.delta_min, idx.geometry.delta_max)
    mech = TruncatedGumbelMechanism(idx, eps)
    wrong = mech.scale * 1.3
    draws = 20_000 * SCALE
    rejected_wrong = 0
    for word in range(idx.n):
        out = mech.perturb_ids(np.full(draws, word), np.random.default_rng(word))
        column = np.empty(idx.n, dtype=np.int64)
        column[idx.neighbor_ids[word]] = np.arange(idx.n)  # the table holds every word
        for scale in (mech.scale, wrong):
            expected = output_distribution(idx.neighbor_dist[word], scale, idx.geometry.delta_max, mech.lam)
            p = chi_square_pvalue(column[out], expected)
            if scale == mech.scale:
                assert p > 1e-4 / idx.n, f"word {word}"  # Bonferroni over the vocabulary
            else:
                rejected_wrong += p < 1e-4 / idx.n
    assert rejected_wrong >= idx.n * 0.8
