"""Choosing ε from a measured privacy target: the ε at which the median N_w (or S_w) reaches it.

The statistic is measured (privtext.analysis.stats) on a fixed word sample with a fixed random stream,
re-used at every ε tried (common random numbers): for the nearest-word mechanisms the outcome of
each single draw is then monotone in ε (the noise is one fixed direction scaled by 1/ε, and a
Voronoi cell is convex), so the bisection sees a monotone step function instead of noise.

The search runs in log space over the distance to the feasible floor: t = log(ε − ε_low) where
the mechanism declares a floor ε_low > 0 (`Mechanism.feasible_epsilon`; truncated Gumbel refuses
ε ≤ ε_∞ and needs ε − ε_∞ to span dozens of decades), else t = log ε. It expands a bracket by
doubling steps in t from a scale-aware start, then bisects to `tolerance` in t (1 % of ε − ε_low
by default). A mechanism that declares no floor but refuses some ε (InfeasibleEpsilonError) is
handled too: refused points count as the end of the reachable range.

Which ε is returned: the largest one found (within the tolerance) that still keeps the median on
the private side of the target — median N_w ≤ P, or median S_w ≥ S — so the result never promises
more privacy than was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from privtext.analysis.stats import EpsilonStatistics, StatsSampler, _tqdm_disable
from privtext.errors import InfeasibleEpsilonError, UsageError
from privtext.index import EmbeddingIndex
from privtext.mechanisms import get
from privtext.mechanisms.base import parse_params
from privtext.randomness import run_key, seed_commitment

DEFAULT_SAMPLE = 500
DEFAULT_DRAWS = 50
DEFAULT_TOLERANCE = 0.01
_T_SPAN_DOWN = 30.0  # at most e^30 below the start
_T_MAX = 700.0  # ε (or ε − ε_low) below e^700 ≈ 1e304 stays finite in float64
_FLOOR_PROBES = 12  # bisection steps towards an undeclared floor


class UnreachableTargetError(UsageError):
    """The target lies outside what the mechanism reaches on this index."""


_LABELS = {"unchanged": ("median N_w", "--target-unchanged"),
           "support": ("median S_w", "--target-support"),
           "risk": ("attack success", "--target-risk")}


@dataclass
class CalibrationResult:
    mechanism: str
    params: dict[str, Any]
    statistic: str  # "unchanged" (N_w) or "support" (S_w)
    target: float
    epsilon: float
    achieved: float  # the median statistic measured at `epsilon`
    stats: EpsilonStatistics
    bracket: tuple[float, float]  # ε on the private side, ε just past the target
    evaluations: int
    feasible: tuple[float, float]
    sample: int
    draws: int
    seed_commitment: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "params": self.params,
            "statistic": self.statistic,
            "target": self.target,
            "epsilon": self.epsilon,
            "achieved_median": self.achieved,
            "bracket": list(self.bracket),
            "feasible_epsilon": {"above": self.feasible[0],
                                 "below": self.feasible[1] if math.isfinite(self.feasible[1]) else None},
            "evaluations": self.evaluations,
            "sample": self.sample,
            "draws": self.draws,
            "seed_commitment": self.seed_commitment,
            "statistics": self.stats.summary(),
        }


class Calibrator:
    """Bisection over ε for one mechanism on one index; measurements are memoised, so solving
    several targets in a row (evaluate --match-unchanged P1,P2,...) re-uses the bracket."""

    def __init__(self, index: EmbeddingIndex, mechanism: str, params: dict[str, Any] | None = None,
                 sample: int = DEFAULT_SAMPLE, draws: int = DEFAULT_DRAWS, seed: str | None = None,
                 key: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                 progress: bool | None = None):
        if not tolerance > 0:
            raise UsageError("the calibration tolerance must be positive")
        cls = get(mechanism)
        parsed = parse_params(cls.Params, dict(params or {}))
        parsed.validate(index.geometry)
        self.floor, self.ceiling = cls.feasible_epsilon(parsed, index.geometry)
        self.index = index
        self.mechanism = mechanism
        self.seed_commitment = seed_commitment(seed)
        self.sampler = StatsSampler(index, mechanism, params, sample, draws,
                                    key=key if key is not None else run_key(seed))
        self.tolerance = float(tolerance)
        self.progress = progress
        self._memo: dict[float, EpsilonStatistics | None] = {}
        # Start where the noise is on the scale of the neighbour distances: a Laplace radius
        # m/ε equal to the median nearest-neighbour distance; above a floor, at ε = 2·floor.
        geo = index.geometry
        if self.floor > 0:
            self.t_start = math.log(self.floor)
        else:
            self.t_start = math.log(geo.dim / max(geo.nn_distance_median, 1e-12))

    def epsilon_at(self, t: float) -> float:
        return self.floor + math.exp(t) if self.floor > 0 else math.exp(t)

    def measure(self, t: float) -> EpsilonStatistics | None:
        """Statistics at ε(t), or None where the mechanism refuses that ε."""
        if t in self._memo:
            return self._memo[t]
        eps = self.epsilon_at(t)
        result: EpsilonStatistics | None = None
        if math.isfinite(eps) and eps > self.floor and eps < self.ceiling:
            try:
                result = self.sampler.at(eps)
            except InfeasibleEpsilonError:
                result = None
        self._memo[t] = result
        return result

    def solve(self, statistic: str, target: float) -> CalibrationResult:
        if statistic not in _LABELS:
            raise UsageError("calibrate targets 'unchanged' (N_w), 'support' (S_w) or 'risk'")
        target = float(target)
        if not math.isfinite(target):
            raise UsageError(f"{_LABELS[statistic][1]} must be a finite number")
        increasing = statistic in ("unchanged", "risk")

        def over(s: EpsilonStatistics) -> bool:
            """Past the target on the less private side (monotone in ε, up to sampling)."""
            m = s.median(statistic)
            return m > target if increasing else m < target

        from tqdm import tqdm

        with tqdm(desc=f"calibrate {self.mechanism}", unit="step", leave=False,
                  disable=_tqdm_disable(self.progress)) as bar:
            def probe(t: float) -> EpsilonStatistics | None:
                fresh = t not in self._memo
                s = self.measure(t)
                if fresh:
                    bar.update(1)
                    if s is not None:
                        bar.set_postfix_str(f"ε={self.epsilon_at(t):.4g} median={s.median(statistic):.3g}")
                return s

            lo, hi = self._bracket(probe, over)
            if lo is None or hi is None:
                raise self._unreachable(statistic, target)
            while hi - lo > self.tolerance:
                mid = 0.5 * (lo + hi)
                s = probe(mid)
                if s is None:  # refused between two accepted ε: keep the private side found
                    break
                if over(s):
                    hi = mid
                else:
                    lo = mid
        best = self._memo[lo]
        assert best is not None
        return CalibrationResult(
            mechanism=self.mechanism, params=self.sampler.params, statistic=statistic,
            target=target, epsilon=self.epsilon_at(lo), achieved=best.median(statistic),
            stats=best, bracket=(self.epsilon_at(lo), self.epsilon_at(hi)),
            evaluations=sum(1 for v in self._memo.values() if v is not None),
            feasible=(self.floor, self.ceiling), sample=len(self.sampler.ids),
            draws=self.sampler.draws, seed_commitment=self.seed_commitment)

    def _bracket(self, probe: Any, over: Any) -> tuple[float | None, float | None]:
        """(t on the private side, t past the target), from the memo or by doubling steps."""
        known = sorted((t, s) for t, s in self._memo.items() if s is not None)
        lo = max((t for t, s in known if not over(s)), default=None)
        hi = min((t for t, s in known if over(s) and (lo is None or t > lo)), default=None)
        if lo is not None and hi is not None:
            return lo, hi
        t = self.t_start if not known else (lo if lo is not None else hi)
        assert t is not None
        s = probe(t)
        step = 1.0
        if s is None:  # refused at the start: walk up until the mechanism accepts ε
            while s is None and t < _T_MAX:
                t = min(t + step, _T_MAX)
                step *= 2
                s = probe(t)
            if s is None:
                return None, None
            step = 1.0
        if not over(s):
            lo = t
            while t < _T_MAX:
                t = min(t + step, _T_MAX)
                step *= 2
                s = probe(t)
                if s is None:
                    break
                if over(s):
                    return lo, t
                lo = t
            return lo, None
        hi = t
        t_min = t - _T_SPAN_DOWN
        while t > t_min:
            t = max(t - step, t_min)
            step *= 2
            s = probe(t)
            if s is None:
                return self._towards_floor(probe, over, t, hi)
            if not over(s):
                return t, hi
            hi = t
        return None, hi

    def _towards_floor(self, probe: Any, over: Any, refused: float,
                       accepted: float) -> tuple[float | None, float | None]:
        """An undeclared floor lies between `refused` and `accepted`: bisect towards it."""
        for _ in range(_FLOOR_PROBES):
            mid = 0.5 * (refused + accepted)
            s = probe(mid)
            if s is None:
                refused = mid
            elif not over(s):
                return mid, accepted
            else:
                accepted = mid
        return None, accepted

    def _unreachable(self, statistic: str, target: float) -> UnreachableTargetError:
        label, flag = _LABELS[statistic]
        seen = sorted((self.epsilon_at(t), s.median(statistic)) for t, s in self._memo.items()
                      if s is not None)
        if not seen:
            return UnreachableTargetError(
                f"{self.mechanism} accepted no ε tried on this index; check its --param values")
        low = min(seen, key=lambda p: p[1])
        high = max(seen, key=lambda p: p[1])
        floor = f" (ε must exceed {self.floor:.6g} for {self.mechanism})" if self.floor > 0 else ""
        return UnreachableTargetError(
            f"{flag} {target:g} is not reachable for {self.mechanism} on this index: the measured "
            f"{label} ranges from {low[1]:.4g} (at ε = {low[0]:.4g}) to {high[1]:.4g} "
            f"(at ε = {high[0]:.4g}){floor}; choose a target inside that range")


@dataclass
class RiskPoint:
    """Attack success at one ε, shaped like EpsilonStatistics for the bisection."""

    result: Any  # privtext.analysis.risk.RiskResult

    def median(self, statistic: str) -> float:
        return float(self.result.attack_success)

    def summary(self) -> dict[str, Any]:
        return dict(self.result.to_dict())


class RiskCalibrator(Calibrator):
    """The ε at which the attack success (mechanisms.md §10) under a public prior reaches a
    target. Exact mechanisms are monotone in ε up to float rounding; Monte-Carlo ones replay the
    same random stream at every ε tried (common random numbers), like the N_w calibration."""

    def __init__(self, index: EmbeddingIndex, mechanism: str, params: dict[str, Any] | None = None,
                 prior: str = "uniform", seed: str | None = None, key: int | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, draws_per_word: int | None = None,
                 test_draws: int | None = None, progress: bool | None = None):
        from privtext.analysis import risk

        super().__init__(index, mechanism, params, sample=1, draws=1, seed=seed, key=key,
                         tolerance=tolerance, progress=progress)
        risk.prior_weights(2, prior)  # refuses an unknown prior before any work
        self.prior = prior
        self.draws_per_word = draws_per_word or risk.DEFAULT_DRAWS_PER_WORD
        self.test_draws = test_draws or risk.DEFAULT_TEST_DRAWS

    def measure(self, t: float) -> Any:
        from privtext.analysis import risk
        from privtext.randomness import chunk_rng

        if t in self._memo:
            return self._memo[t]
        eps = self.epsilon_at(t)
        result: RiskPoint | None = None
        if math.isfinite(eps) and eps > self.floor and eps < self.ceiling:
            try:
                mech = self.sampler.build(eps)
            except InfeasibleEpsilonError:
                mech = None
            if mech is not None:
                found = risk.attack_success(mech, (self.prior,), chunk_rng(self.sampler.key, 7, 0),
                                            self.draws_per_word, self.test_draws)
                result = RiskPoint(found[self.prior])
        self._memo[t] = result  # type: ignore[assignment]
        return result


def calibrate_risk(index: EmbeddingIndex, mechanism: str, target: float,
                   params: dict[str, Any] | None = None, prior: str = "uniform",
                   seed: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
                   progress: bool | None = None) -> CalibrationResult:
    """The ε at which the attack success under `prior` reaches `target` (largest ε found whose
    success is still at most the target)."""
    if not 0.0 < target < 1.0:
        raise UsageError("--target-risk is a probability: give a value between 0 and 1")
    return RiskCalibrator(index, mechanism, params, prior, seed, tolerance=tolerance,
                          progress=progress).solve("risk", target)


def calibrate(index: EmbeddingIndex, mechanism: str, statistic: str, target: float,
              params: dict[str, Any] | None = None, sample: int = DEFAULT_SAMPLE,
              draws: int = DEFAULT_DRAWS, seed: str | None = None,
              tolerance: float = DEFAULT_TOLERANCE, progress: bool | None = None) -> CalibrationResult:
    """The ε at which the median N_w ('unchanged') or S_w ('support') reaches `target`."""
    if statistic == "unchanged" and not 0.0 <= target <= 1.0:
        raise UsageError("--target-unchanged is a share of draws: give a value in [0, 1]")
    if statistic == "support" and not 1.0 <= target <= draws:
        raise UsageError(f"--target-support counts distinct outputs in {draws} draws: "
                         f"give a value in [1, {draws}] (or raise --draws)")
    return Calibrator(index, mechanism, params, sample, draws, seed, tolerance=tolerance,
                      progress=progress).solve(statistic, target)
