"""Goodness-of-fit helpers for the mechanism tests (closed-form output distributions)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def _binned(samples: np.ndarray, expected: np.ndarray, min_expected: float) -> tuple[float, int] | None:
    """(statistic, degrees of freedom) after pooling small bins; None if an impossible outcome
    occurred."""
    expected = np.asarray(expected, dtype=np.float64)
    expected = expected / expected.sum()
    counts = np.bincount(samples, minlength=len(expected)).astype(np.float64)
    if len(counts) > len(expected) or counts[expected == 0].sum() > 0:
        return None
    exp_counts = expected * len(samples)
    big = exp_counts >= min_expected
    obs = list(counts[big])
    ex = list(exp_counts[big])
    small = ~big & (expected > 0)
    if exp_counts[small].sum() > 0:
        obs.append(counts[small].sum())
        ex.append(exp_counts[small].sum())
    o, e = np.asarray(obs), np.asarray(ex)
    return float(((o - e) ** 2 / e).sum()), len(obs) - 1


def pooled_chi_square_pvalue(inputs: np.ndarray, outputs: np.ndarray, expected: np.ndarray,
                             min_expected: float = 5.0) -> float:
    """One chi-square test over many input words at once: expected[x] is the output
    distribution of input x; the per-word statistics and degrees of freedom are summed."""
    total, dof = 0.0, 0
    for x in np.unique(inputs):
        res = _binned(outputs[inputs == x], expected[x], min_expected)
        if res is None:
            return 0.0
        total += res[0]
        dof += res[1]
    return float(stats.chi2.sf(total, max(dof, 1)))


def chi_square_pvalue(samples: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value of integer `samples` against probabilities `expected` over
    0..len(expected)-1. Outcomes with small expected counts are pooled into one bin, so the
    test stays valid; an outcome of probability zero that occurs gives p = 0."""
    res = _binned(samples, expected, min_expected)
    if res is None:
        return 0.0
    statistic, dof = res
    return 1.0 if dof < 1 else float(stats.chi2.sf(statistic, dof))


def pairwise_distances(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    return np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=-1))
