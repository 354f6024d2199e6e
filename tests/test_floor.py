"""The uniform floor (mechanisms.md §9): realisation on the integer coin grid, ε₀, floor=auto."""

import math

import numpy as np
import pytest
from mech_stats import chi_square_pvalue

from privtext.errors import ParameterError
from privtext.mechanisms import create
from privtext.mechanisms.floor import (
    COIN_RANGE,
    MIN_FLOOR,
    UniformFloor,
    auto_floor,
    coin_threshold,
    parse_floor,
    pure_bound,
    realised,
)


def test_realised_probability_is_on_the_coin_grid_and_never_below_the_request() -> None:
    for alpha in (0.05, 0.01, 2.0**-40, 1e-7, 0.3, 1.0, 0.0):
        r = realised(alpha)
        assert r >= alpha and r - alpha < 2.0**-53
        assert r * COIN_RANGE == coin_threshold(alpha)
    assert realised(0.25) == 0.25 and realised(0.05) > 0.05  # 0.05 has bits below 2^-53


def test_pure_bound_and_auto_floor() -> None:
    n = 100_000
    assert pure_bound(0.0, n) == math.inf
    assert pure_bound(1.0, n) == pytest.approx(0.0, abs=1e-300)
    assert pure_bound(0.5, n) == pytest.approx(math.log(1 + n))
    for target in (3.0, 12.0, 28.0, 60.0):
        alpha = auto_floor(target, n)
        assert pure_bound(alpha, n) <= target
        if alpha > MIN_FLOOR:  # smallest: one grid step lower breaks the target
            assert pure_bound((coin_threshold(alpha) - 1) / COIN_RANGE, n) > target
    assert auto_floor(60.0, n) == MIN_FLOOR  # e⁻⁶⁰·n is below the 2⁻⁴⁰ floor
    assert auto_floor(700.0, n) == MIN_FLOOR
    smaller_q = auto_floor(12.0, n, qbar=0.1)
    assert smaller_q < auto_floor(12.0, n)


def test_parse_floor() -> None:
    assert parse_floor("auto") is None and parse_floor("AUTO") is None
    assert parse_floor("0") == 0.0 and parse_floor(0.2) == 0.2
    for bad in ("-0.1", "1.5", "nan", "often", str(2.0**-45)):
        with pytest.raises(ParameterError):
            parse_floor(bad)


def test_floor_apply_uses_integer_draws_and_keeps_the_stream_at_zero() -> None:
    ids = np.arange(1000) % 7
    base = ids.copy()
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    UniformFloor(0.0, 7).apply(ids, base.copy(), rng_a)
    assert rng_a.integers(0, 2**62) == rng_b.integers(0, 2**62)  # α = 0 consumed nothing
    out = UniformFloor(1.0, 50).apply(ids, base.copy(), np.random.default_rng(2))
    assert out.min() >= 0 and out.max() < 50 and (out >= 7).any()
    with pytest.raises(ValueError):
        UniformFloor(0.05, 7)  # not a realised value


def test_floor_share_matches_alpha_with_power_check() -> None:
    """The share of floored tokens (identity mechanism underneath, uniform over 4 words) fits α,
    and the same test rejects α off by 30 %."""
    n, draws = 4, 200_000
    alpha = realised(0.2)
    floor = UniformFloor(alpha, n)
    out = floor.apply(np.zeros(draws, dtype=np.int64), np.zeros(draws, dtype=np.int64),
                      np.random.default_rng(3))
    expected = np.full(n, alpha / n)
    expected[0] += 1 - alpha
    assert chi_square_pvalue(out, expected) > 1e-4
    wrong = np.full(n, 1.3 * alpha / n)
    wrong[0] = 1 - 3 * wrong[1]
    assert chi_square_pvalue(out, wrong) < 1e-6


def test_gumbel_and_custext_take_the_floor_parameter(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.mechanisms.gumbel import min_epsilon

    geo = glove_small.geometry
    eps = 1.5 * min_epsilon(geo.n, geo.delta_min)
    auto = create("gumbel", glove_small, eps, {})
    assert auto.guarantee.floor == auto_floor(eps * geo.delta_min, geo.n)
    assert auto.guarantee.per_token_pure_bound <= eps * geo.delta_min  # type: ignore[operator]
    with pytest.raises(ParameterError, match="floor"):
        create("gumbel", glove_small, eps, {"floor": "sometimes"})
    cus = create("custext", glove_small, 2.0, {"floor": "0.01"})
    assert cus.guarantee.per_token_pure_bound == pure_bound(realised(0.01), geo.n,
                                                            cus.guarantee.floor_qbar or 1.0)
    assert create("custext", glove_small, 2.0, {}).guarantee.floor == 0.0
