"""The uniform floor (mechanisms.md §9): a randomized-response mixture, implemented once.

Per token, independently: with probability α output a uniformly random word of the whole
vocabulary (the input included); otherwise run the unchanged mechanism Q. Then

    P[y|x] = (1 − α)·Q(y|x) + α/n,
    P[y|x] / P[y|x'] ≤ ((1 − α)·q̄ + α/n) / (α/n) = 1 + (1 − α)·n·q̄/α     (q̄ ≥ max Q(y|x)),

the standard randomized-response mixing argument: no assumption on Q beyond q̄. Between two
inputs the mixture's ratio is also never larger than Q's own ratio (a mediant of Q(y|x)/Q(y|x')
and 1), so any bound Q already had still holds.

Realisation. The probability the proof uses must be the one the code realises in floating point:
the coin is an integer U uniform on [0, 2⁵³) and the floor fires when U < T with T = ⌈α·2⁵³⌉,
so the realised probability is exactly T/2⁵³ ≥ α (α·2⁵³ is an exact float product, ceil is
exact), and every bound below is computed from that realised value. A float uniform compared
with a tiny α would silently realise probability 0. The uniform word is an unbiased integer
draw (numpy's Generator.integers rejects, it does not take a modulus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privtext.errors import ParameterError

COIN_BITS = 53
COIN_RANGE = 1 << COIN_BITS
MIN_FLOOR = 2.0**-40  # floor=auto never goes lower: far above the 2⁻⁵³ grid of the coin
AUTO = "auto"


def parse_floor(value: object) -> float | None:
    """None for 'auto', else the number; raises ParameterError naming the valid values."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return None
        try:
            number = float(text)
        except ValueError:
            raise ParameterError(f"--param floor={value} is not valid; give auto or a number "
                                 "in [0, 1] (e.g. floor=0.01)") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ParameterError("--param floor must be auto or a number in [0, 1]")
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ParameterError(f"--param floor={value} is out of range; valid: auto | [0, 1]")
    if 0.0 < number < MIN_FLOOR:
        raise ParameterError(f"--param floor={value} is below 2^-40 = {MIN_FLOOR:.3g}, which the "
                             "integer coin cannot realise with a safe margin; use floor=0 "
                             "(no floor) or a value of at least 2^-40")
    return number


def coin_threshold(alpha: float) -> int:
    """T = ⌈α·2⁵³⌉: the floor fires when an integer uniform on [0, 2⁵³) is below T."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("a floor is a probability in [0, 1]")
    return math.ceil(alpha * COIN_RANGE)  # α·2⁵³ is exact in float64; ceil of it is exact


def realised(alpha: float) -> float:
    """The probability the coin realises for a requested α: T/2⁵³ (exact in float64)."""
    return coin_threshold(alpha) / COIN_RANGE


def pure_bound(alpha: float, n: int, qbar: float = 1.0) -> float:
    """ε₀ = ln(1 + (1 − α)·n·q̄/α) for a realised α (inf for α = 0), rounded up by one ulp so
    float rounding never states less than the real value."""
    if alpha <= 0.0:
        return math.inf
    value = math.log1p((1.0 - alpha) * n * qbar / alpha)
    return math.nextafter(value, math.inf)


def auto_floor(target: float, n: int, qbar: float = 1.0) -> float:
    """The smallest realised α with ε₀(α) ≤ target, but never below 2⁻⁴⁰.

    ε₀(α) ≤ t ⟺ (1 − α)·n·q̄ ≤ (eᵗ − 1)·α ⟺ α ≥ n·q̄/(eᵗ − 1 + n·q̄). The realised value is
    rounded up to the coin grid, then stepped up one grid point at a time while float rounding
    of ε₀ still exceeds the target (at most a few steps)."""
    if not target > 0:
        raise ValueError("the target bound must be positive")
    grow = math.expm1(target) if target < 709.0 else math.inf
    alpha = max(n * qbar / (grow + n * qbar), MIN_FLOOR)
    threshold = coin_threshold(min(alpha, 1.0))
    while threshold < COIN_RANGE and pure_bound(threshold / COIN_RANGE, n, qbar) > target:
        threshold += 1
    return threshold / COIN_RANGE


@dataclass(frozen=True)
class UniformFloor:
    """The realised floor of one mechanism instance: α = threshold/2⁵³ over n words."""

    alpha: float
    n: int

    def __post_init__(self) -> None:
        if coin_threshold(self.alpha) / COIN_RANGE != self.alpha:
            raise ValueError("UniformFloor takes a realised α (use realised() or auto_floor())")

    @property
    def threshold(self) -> int:
        return coin_threshold(self.alpha)

    def apply(self, ids: np.ndarray, mechanism_output: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
        """Replace each token's output, with probability α, by a uniform word of V (in place).

        α = 0 draws nothing, so the published sampler's random stream is unchanged."""
        if self.alpha == 0.0 or len(ids) == 0:
            return mechanism_output
        coin = rng.integers(0, COIN_RANGE, size=len(ids), dtype=np.int64) < self.threshold
        hit = np.flatnonzero(coin)
        if len(hit):
            mechanism_output[hit] = rng.integers(0, self.n, size=len(hit), dtype=np.int64)
        return mechanism_output

    def mix(self, probabilities: np.ndarray) -> np.ndarray:
        """(1 − α)·Q + α/n for exact output distributions (rows over the vocabulary)."""
        return (1.0 - self.alpha) * np.asarray(probabilities, dtype=np.float64) + self.alpha / self.n
