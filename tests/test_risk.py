"""Attack success (mechanisms.md §10): exact closed forms against brute force, the held-out
Monte-Carlo lower bound against the exact value (with a power check), the bounds, the cache, and
the `privtext risk` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privtext.analysis import risk
from privtext.index import EmbeddingIndex
from privtext.mechanisms import create
from privtext.mechanisms.base import Mechanism


def brute_force(m: Mechanism, prior: str) -> float:
    """Σ_y max_x π(x)·P[y|x] from the mechanism's own exact rows (an n × n matrix: tiny n only)."""
    n = m.index.n
    p = np.stack([m.probabilities(x) for x in range(n)])  # type: ignore[attr-defined]
    pi = risk.prior_weights(n, prior)
    return float((pi[:, None] * p).max(axis=0).sum())


@pytest.fixture
def small(index_factory) -> EmbeddingIndex:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(44)
    return index_factory(rng.normal(size=(70, 4)) * 1.3, neighbors=16)


EXACT_CASES = [
    ("santext", 1.0, {}), ("santext", 6.0, {}), ("santext", 3.0, {"plus": "true", "w": "0.3", "p": "0.4"}),
    ("tem", 2.0, {}), ("tem", 6.0, {"beta": "0.2"}), ("density", 3.0, {}),
    ("density", 3.0, {"bandwidth": "0.2"}), ("custext", 2.0, {"K": "6"}),
    ("custext", 4.0, {"K": "6", "floor": "0.02"}),
]


@pytest.mark.parametrize(("name", "eps", "params"), EXACT_CASES)
def test_exact_forms_match_brute_force(name: str, eps: float, params: dict[str, str],
                                       small: EmbeddingIndex) -> None:
    m = create(name, small, eps, params)
    results = risk.attack_success(m, risk.PRIORS, threads=2)
    for prior, r in results.items():
        assert r.method == "exact" and r.interval == (r.attack_success, r.attack_success)
        assert r.attack_success == pytest.approx(brute_force(m, prior), rel=1e-12)
        assert r.baseline <= r.attack_success + 1e-15
        if r.bound is not None:
            assert r.attack_success <= r.bound


def test_exact_value_moves_with_epsilon(small: EmbeddingIndex) -> None:
    """Not a constant: more ε, more success; the uniform-prior bound from ε·Δ_max holds."""
    values = [risk.attack_success(create("santext", small, e, {}))["uniform"].attack_success
              for e in (0.5, 2.0, 8.0)]
    assert values[0] < values[1] < values[2]


def test_priors() -> None:
    assert risk.prior_weights(4, "uniform").tolist() == [0.25] * 4
    z = risk.prior_weights(3, "zipf")
    assert z == pytest.approx(np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    with pytest.raises(Exception, match="uniform or zipf"):
        risk.prior_weights(3, "corpus")


def test_bounds_from_a_pure_bound() -> None:
    pi = risk.prior_weights(10, "uniform")
    # ε₀-DP on 10 inputs: the guessing probability is at most e^ε₀/(e^ε₀ + 9)
    assert risk.success_bound(math.log(3), pi, "uniform") == pytest.approx(3 / 12)
    assert risk.success_bound(None, pi, "uniform") is None
    z = risk.prior_weights(10, "zipf")
    assert risk.success_bound(1.0, z, "zipf") == pytest.approx(min(1, math.e * z.max()))


def test_randomized_response_attains_the_uniform_bound(index_factory) -> None:  # type: ignore[no-untyped-def]
    """custext with K = n and ε → 0 inside the group is uniform over V; with a floor the tight
    uniform bound e^ε₀/(e^ε₀ + n − 1) holds and the exact figure sits below it."""
    index = index_factory(np.random.default_rng(3).normal(size=(8, 2)), neighbors=8)
    m = create("custext", index, 1e-9, {"K": "8", "floor": "0.5"})
    r = risk.attack_success(m)["uniform"]
    assert r.attack_success == pytest.approx(1 / 8, rel=1e-6)
    assert r.bound is not None and r.attack_success <= r.bound


def test_monte_carlo_lower_bound_brackets_the_exact_value(small: EmbeddingIndex) -> None:
    """Forced through the Monte-Carlo path on a mechanism with an exact value: with enough
    training draws the held-out MAP guesser is the Bayes guesser, so its 95 % interval covers
    the exact V; the same interval excludes V at an ε 30 % off (power check)."""
    m = create("santext", small, 3.0, {})
    exact = risk.attack_success(m, risk.PRIORS)
    wrong = risk.attack_success(create("santext", small, 3.9, {}), risk.PRIORS)
    mc = risk.monte_carlo(m, {p: risk.prior_weights(small.n, p) for p in risk.PRIORS},
                          np.random.default_rng(9), draws_per_word=3000, test_draws=200_000)
    for prior, (value, (lo, hi), draws) in mc.items():
        assert lo <= exact[prior].attack_success <= hi, (prior, lo, hi, exact[prior].attack_success)
        assert not lo <= wrong[prior].attack_success <= hi
        assert lo <= value <= hi and draws == 3000 * small.n + 100_000 + 200_000  # train, pick, test


def test_monte_carlo_for_mechanisms_without_a_closed_form(small: EmbeddingIndex) -> None:
    from privtext.mechanisms.gumbel import min_epsilon

    eps = 1.5 * min_epsilon(small.n, small.geometry.delta_min)
    for name, e in (("laplace", 4.0), ("gumbel", eps), ("vickrey", 4.0), ("mahalanobis", 4.0)):
        r = risk.attack_success(create(name, small, e, {}), ("uniform",), np.random.default_rng(1),
                                draws_per_word=20, test_draws=20_000)["uniform"]
        assert r.method == "monte-carlo"
        lo, hi = r.interval
        assert 0 <= lo <= r.attack_success <= hi <= 1 and hi - lo < 0.03
        assert r.attack_success > r.baseline  # the output tells the adversary something


def test_monte_carlo_never_falls_far_below_the_baseline(small: EmbeddingIndex) -> None:
    """At a tiny ε the output says almost nothing; under the zipf prior the best guess is the
    likeliest word, and the validation step picks that guesser instead of a noisy MAP one."""
    r = risk.attack_success(create("laplace", small, 0.05, {}), ("zipf",), np.random.default_rng(2),
                            draws_per_word=2, test_draws=20_000)["zipf"]
    assert r.interval[1] >= r.baseline and r.attack_success > 0.9 * r.baseline


def test_cached_figure_is_computed_once(small: EmbeddingIndex) -> None:
    m = create("custext", small, 2.0, {"K": "6"})
    first = risk.cached_attack_success(m)
    files = list((small.path / "derived").glob("attack-success-*.npy"))
    assert len(files) == 1
    again = risk.cached_attack_success(create("custext", small, 2.0, {"K": "6"}))
    assert {k: v.to_dict() for k, v in first.items()} == {k: v.to_dict() for k, v in again.items()}
    other = risk.cached_attack_success(create("custext", small, 3.0, {"K": "6"}))
    assert other["uniform"].attack_success != first["uniform"].attack_success
    assert len(list((small.path / "derived").glob("attack-success-*.npy"))) == 2
    mc = create("laplace", small, 3.0, {})
    a = risk.cached_attack_success(mc, draws_per_word=2, test_draws=2000)
    b = risk.cached_attack_success(create("laplace", small, 3.0, {}), draws_per_word=2, test_draws=2000)
    assert a["zipf"].to_dict() == b["zipf"].to_dict()


# --- the command ----------------------------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privtext", "risk", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli_env(glove_small: EmbeddingIndex, cache_root: Path) -> dict[str, str]:
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root)}


def test_cli_risk_json(cli_env: dict[str, str]) -> None:
    proc = _cli(cli_env, "--mechanism", "santext", "--epsilon", "4", "--vocab-size", "2000",
                "--prior", "zipf", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"mechanism", "epsilon", "params", "prior", "attack_success", "baseline", "bound",
            "method", "interval", "draws", "seconds"} <= set(doc)
    assert doc["method"] == "exact" and doc["prior"] == "zipf" and doc["interval"][0] == doc["attack_success"]
    mc = _cli(cli_env, "--mechanism", "gumbel", "--epsilon", "300", "--vocab-size", "2000",
              "--param", "floor=0", "--test-draws", "5000", "--seed", "1")
    assert mc.returncode == 0, mc.stderr
    assert "monte-carlo" in mc.stdout and "95% interval" in mc.stdout
    assert mc.stderr.count("WARNING") == 1 and "floor=0" in mc.stderr


def test_cli_risk_usage_errors(cli_env: dict[str, str]) -> None:
    bad = _cli(cli_env, "--mechanism", "santext", "--epsilon", "4", "--vocab-size", "2000",
               "--prior", "corpus")
    assert bad.returncode == 2
    param = _cli(cli_env, "--mechanism", "gumbel", "--epsilon", "300", "--vocab-size", "2000",
                 "--param", "floor=often", "-q")
    assert param.returncode != 0 and len(param.stderr.strip().splitlines()) == 1
    assert "floor" in param.stderr
