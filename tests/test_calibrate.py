"""privtext.analysis.calibrate: ε from a target median N_w or S_w, by bisection over measured statistics."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from privtext.analysis.calibrate import Calibrator, UnreachableTargetError, calibrate
from privtext.analysis.stats import StatsSampler
from privtext.cli import cli
from privtext.errors import InfeasibleEpsilonError, UsageError
from privtext.mechanisms import available, registry
from privtext.mechanisms.gumbel import min_epsilon
from privtext.mechanisms.laplace import LaplaceMechanism


def test_laplace_unchanged_target_is_bracketed_on_the_private_side(glove_small) -> None:  # type: ignore[no-untyped-def]
    res = calibrate(glove_small, "laplace", "unchanged", 0.3, sample=80, draws=30, seed="a",
                    progress=False)
    assert res.achieved <= 0.3
    lo, hi = res.bracket
    assert lo == res.epsilon and lo < hi and math.log(hi / lo) <= 0.01 + 1e-12
    # re-measuring with the same seed reproduces the statistic (common random numbers) and the
    # upper end of the bracket is past the target
    sampler = StatsSampler(glove_small, "laplace", sample=80, draws=30, seed="a")
    assert sampler.at(res.epsilon).median("unchanged") == res.achieved
    assert sampler.at(hi).median("unchanged") > 0.3
    assert json.loads(json.dumps(res.to_dict()))["epsilon"] == res.epsilon


def test_support_target_is_met_with_at_least_that_many_outputs(glove_small) -> None:  # type: ignore[no-untyped-def]
    res = calibrate(glove_small, "laplace", "support", 5, sample=60, draws=30, seed="b", progress=False)
    assert res.achieved >= 5
    sampler = StatsSampler(glove_small, "laplace", sample=60, draws=30, seed="b")
    assert sampler.at(res.bracket[1]).median("support") < 5


def test_several_targets_reuse_measurements_and_are_ordered(glove_small) -> None:  # type: ignore[no-untyped-def]
    cal = Calibrator(glove_small, "laplace", sample=60, draws=30, seed="c", progress=False)
    low = cal.solve("unchanged", 0.15)
    first = low.evaluations
    high = cal.solve("unchanged", 0.5)
    assert low.epsilon < high.epsilon
    assert high.evaluations - first < first  # the bracket of the first target is reused


def test_gumbel_searches_above_its_floor_and_reaches_very_large_epsilon(glove_small) -> None:  # type: ignore[no-untyped-def]
    geo = glove_small.geometry
    floor = min_epsilon(geo.n, geo.delta_min)
    res = calibrate(glove_small, "gumbel", "unchanged", 0.5, sample=60, draws=30, seed="d", progress=False)
    assert res.feasible[0] == floor and res.epsilon > floor
    assert res.epsilon > 1e6  # the published calibration needs astronomically large ε here
    assert 0.4 <= res.achieved <= 0.5


def test_unreachable_target_is_refused_with_the_measured_range(glove_small) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnreachableTargetError) as info:
        calibrate(glove_small, "gumbel", "unchanged", 0.01, sample=60, draws=30, seed="e", progress=False)
    msg = str(info.value)
    assert "not reachable" in msg and "ranges from" in msg and "must exceed" in msg
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        calibrate(glove_small, "laplace", "unchanged", 1.5)
    with pytest.raises(UsageError, match="raise --draws"):
        calibrate(glove_small, "laplace", "support", 40, draws=30)


class _FlooredLaplace(LaplaceMechanism):
    """Laplace that refuses ε ≤ 3 without declaring it: the generic fallback must cope."""

    name = "floored-laplace-test"

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        if epsilon <= 3.0:
            raise InfeasibleEpsilonError("ε must exceed 3 for this test mechanism")
        super().__init__(index, epsilon, params)


def test_undeclared_floor_is_found_by_probing(glove_small, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    registry._load()
    monkeypatch.setitem(registry._REGISTRY, _FlooredLaplace.name, _FlooredLaplace)
    cal = Calibrator(glove_small, _FlooredLaplace.name, sample=60, draws=30, seed="f", progress=False)
    cal.t_start = math.log(1.0)  # start inside the refused region
    res = cal.solve("unchanged", 0.3)
    assert res.epsilon > 3.0 and res.achieved <= 0.3
    near_floor = cal.solve("unchanged", 0.0)  # reachable only just above the refused region
    assert 3.0 < near_floor.epsilon < res.epsilon and near_floor.achieved == 0.0


@pytest.mark.parametrize("name", sorted(available()))
def test_every_registered_mechanism_calibrates_or_says_why(name: str, glove_small) -> None:  # type: ignore[no-untyped-def]
    try:
        res = calibrate(glove_small, name, "unchanged", 0.5, sample=40, draws=20, seed="g", progress=False)
    except UnreachableTargetError as exc:
        assert "ranges from" in str(exc)
        return
    assert res.achieved <= 0.5 and res.epsilon > res.feasible[0]
    assert np.isfinite(res.epsilon)


def test_cli_calibrate_json_and_errors(glove_small, cache_root) -> None:  # type: ignore[no-untyped-def]
    common = ["--vocab-size", "2000", "--cache-dir", str(cache_root), "-q", "--sample", "40",
              "--draws", "20", "--seed", "1"]
    res = CliRunner().invoke(cli, ["calibrate", "--mechanism", "laplace", "--target-unchanged", "0.3",
                                   "--json", *common])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["epsilon"] > 0 and data["achieved_median"] <= 0.3 and data["feasible_epsilon"]["below"] is None
    text = CliRunner().invoke(cli, ["calibrate", "--mechanism", "laplace", "--target-support", "4", *common])
    assert text.exit_code == 0 and text.output.startswith("epsilon = ")
    proc = subprocess.run([sys.executable, "-m", "privtext", "calibrate", "--mechanism", "gumbel",
                           "--target-unchanged", "0.01", *common], capture_output=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and b"not reachable" in proc.stderr and b"Traceback" not in proc.stderr
    both = CliRunner().invoke(cli, ["calibrate", "--mechanism", "laplace", *common])
    assert both.exit_code != 0


# --- attack success (mechanisms.md §10) -----------------------------------------------------------


def test_risk_target_is_met_on_the_private_side(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.analysis import risk
    from privtext.analysis.calibrate import calibrate_risk
    from privtext.mechanisms import create

    res = calibrate_risk(glove_small, "santext", 0.3, progress=False)
    assert res.achieved <= 0.3 and res.statistic == "risk"
    # exact mechanism: the figure at the returned ε is the library's, and the bracket's upper end
    # is past the target
    at = risk.attack_success(create("santext", glove_small, res.epsilon, {}))["uniform"]
    assert at.attack_success == res.achieved
    above = risk.attack_success(create("santext", glove_small, res.bracket[1], {}))["uniform"]
    assert above.attack_success > 0.3
    zipf = calibrate_risk(glove_small, "santext", 0.3, prior="zipf", progress=False)
    assert zipf.epsilon != res.epsilon and zipf.stats.summary()["prior"] == "zipf"


def test_risk_target_below_the_baseline_is_unreachable(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.analysis.calibrate import UnreachableTargetError, calibrate_risk

    with pytest.raises(UnreachableTargetError, match="attack success"):
        calibrate_risk(glove_small, "santext", 1e-5, progress=False)  # baseline 1/1949
    with pytest.raises(UsageError):
        calibrate_risk(glove_small, "santext", 1.5, progress=False)


def test_cli_calibrate_target_risk(glove_small, cache_root) -> None:  # type: ignore[no-untyped-def]
    common = ["--vocab-size", "2000", "--cache-dir", str(cache_root), "-q", "--seed", "1"]
    res = CliRunner().invoke(cli, ["calibrate", "--mechanism", "tem", "--target-risk", "0.2",
                                   "--json", *common])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["statistic"] == "risk" and data["achieved_median"] <= 0.2
    assert data["statistics"]["method"] == "exact" and data["statistics"]["prior"] == "uniform"
    text = CliRunner().invoke(cli, ["calibrate", "--mechanism", "gumbel", "--target-risk", "0.25",
                                    "--prior", "zipf", *common])
    assert text.exit_code == 0, text.output
    assert text.output.startswith("epsilon = ") and "monte-carlo" in text.output
