"""privtext.analysis.stats: plausible-deniability statistics N_w and S_w, and the `privtext stats` command."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from privtext.analysis.stats import (
    StatsSampler,
    describe,
    frequency_bands,
    measure,
    rows_to_csv,
    run_stats,
    stratified_sample,
)
from privtext.cli import cli
from privtext.errors import InfeasibleEpsilonError
from privtext.mechanisms import available, create, get
from privtext.mechanisms.base import MechanismParams
from privtext.randomness import chunk_rng


def test_bands_are_rank_decades_cut_at_n() -> None:
    assert [(b.start, b.stop) for b in frequency_bands(2000)] == [(0, 100), (100, 1000), (1000, 2000)]
    assert [b.label for b in frequency_bands(12)] == ["1-12"]
    assert frequency_bands(1000)[-1].stop == 1000 and len(frequency_bands(1000)) == 2


def test_stratified_sample_allocates_evenly_and_takes_small_bands_whole() -> None:
    rng = np.random.default_rng(1)
    ids, bands = stratified_sample(2000, 600, rng)
    assert len(ids) == 600 and len(np.unique(ids)) == 600
    # band 0 holds only 100 words: taken whole, the rest shared by the other two bands
    assert np.bincount(bands).tolist() == [100, 250, 250]
    for number, band in enumerate(frequency_bands(2000)):
        sel = ids[bands == number]
        assert sel.min() >= band.start and sel.max() < band.stop
    small, _ = stratified_sample(30, 500, rng)
    assert sorted(small.tolist()) == list(range(30))


def test_two_word_exponential_mechanism_matches_closed_form(index_factory) -> None:  # type: ignore[no-untyped-def]
    """SanText on two words at distance d: P[M(x) = x] = 1 / (1 + exp(−ε d / 2))."""
    index = index_factory(np.array([[0.0, 0.0], [1.5, 0.0]]), neighbors=2)
    eps, draws = 1.2, 8000
    mech = create("santext", index, eps, {})
    unchanged, support = measure(mech, np.array([0, 1]), draws, np.random.default_rng(7))
    p = 1.0 / (1.0 + math.exp(-eps * 1.5 / 2))
    tol = 5 * math.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(unchanged - p) < tol)
    assert support.tolist() == [2, 2]


def test_measure_extremes_and_bounds(glove_small) -> None:  # type: ignore[no-untyped-def]
    ids = np.arange(0, 2000, 100)
    exact = create("laplace", glove_small, 1e6, {})
    unchanged, support = measure(exact, ids, 30, np.random.default_rng(0))
    assert np.all(unchanged == 1.0) and np.all(support == 1)
    noisy = create("laplace", glove_small, 0.5, {})
    unchanged, support = measure(noisy, ids, 30, np.random.default_rng(0))
    assert unchanged.mean() < 0.05 and np.median(support) > 20
    assert np.all((support >= 1) & (support <= 30))


def test_common_random_numbers_make_laplace_monotone_word_by_word(glove_small) -> None:  # type: ignore[no-untyped-def]
    """The same stream at every ε: a draw's noise is one direction scaled by 1/ε, and a Voronoi
    cell is convex, so each word's N_w can only grow with ε."""
    sampler = StatsSampler(glove_small, "laplace", sample=60, draws=40, seed="crn")
    curves = [sampler.at(e).unchanged for e in (4.0, 6.0, 9.0, 14.0)]
    for lower, higher in itertools.pairwise(curves):
        assert np.all(lower <= higher)
    assert curves[0].mean() < curves[-1].mean()


def test_seed_reproduces_and_entropy_differs(glove_small) -> None:  # type: ignore[no-untyped-def]
    a = run_stats(glove_small, "laplace", [6.0], sample=50, draws=20, seed="s", progress=False)
    b = run_stats(glove_small, "laplace", [6.0], sample=50, draws=20, seed="s", progress=False)
    c = run_stats(glove_small, "laplace", [6.0], sample=50, draws=20, seed=None, progress=False)
    assert np.array_equal(a.results[0].unchanged, b.results[0].unchanged)
    assert a.seed_commitment is not None and c.seed_commitment is None
    assert not (np.array_equal(a.results[0].ids, c.results[0].ids)
                and np.array_equal(a.results[0].unchanged, c.results[0].unchanged))


def test_tidy_rows_and_summary(glove_small) -> None:  # type: ignore[no-untyped-def]
    result = run_stats(glove_small, "gumbel", [200.0, 1e6], sample=90, draws=25, seed="1", progress=False)
    rows = result.rows()
    bands = len(frequency_bands(glove_small.n))
    assert len(rows) == 2 * (bands + 1) * 2
    assert {r["statistic"] for r in rows} == {"unchanged", "support"}
    header = rows_to_csv(rows).splitlines()[0].split(",")
    assert header[:6] == ["mechanism", "epsilon", "band", "statistic", "words", "draws"]
    d = result.to_dict()
    assert d["results"][0]["unchanged"]["p50"] <= d["results"][1]["unchanged"]["p50"] + 0.1
    assert "metric DP" in d["results"][0]["guarantee"]
    s = describe(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert s["p50"] == 2.0 and s["mean"] == 2.0


def test_gumbel_infeasible_epsilon_fails_before_sampling(glove_small) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InfeasibleEpsilonError, match="ε_∞"):
        run_stats(glove_small, "gumbel", [5.0], sample=10, draws=5, progress=False)


def _feasible_epsilon(name: str, index) -> float:  # type: ignore[no-untyped-def]
    cls = get(name)
    low, _ = cls.feasible_epsilon(cls.Params(), index.geometry)
    return 2.0 * low if low > 0 else 8.0


@pytest.mark.parametrize("name", sorted(available()))
def test_every_registered_mechanism_gives_valid_statistics(name: str, glove_small) -> None:  # type: ignore[no-untyped-def]
    eps = _feasible_epsilon(name, glove_small)
    result = run_stats(glove_small, name, [eps], sample=40, draws=12, seed="all", progress=False)
    r = result.results[0]
    assert np.all((r.unchanged >= 0) & (r.unchanged <= 1))
    assert np.all((r.support >= 1) & (r.support <= 12))
    # N_w = 1 means every draw returned w, so exactly one distinct output, and conversely
    assert np.array_equal(r.unchanged == 1.0, (r.support == 1) & (r.unchanged == 1.0))


def test_feasible_epsilon_default_and_gumbel(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.mechanisms.gumbel import min_epsilon

    geo = glove_small.geometry
    assert get("laplace").feasible_epsilon(MechanismParams(), geo) == (0.0, math.inf)
    low, high = get("gumbel").feasible_epsilon(MechanismParams(), geo)
    assert low == min_epsilon(geo.n, geo.delta_min) and high == math.inf
    create("gumbel", glove_small, low * (1 + 1e-6), {})
    with pytest.raises(InfeasibleEpsilonError):
        create("gumbel", glove_small, low, {})


def test_measure_splits_large_runs_without_changing_the_stream(glove_small, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import privtext.analysis.stats as stats_mod

    mech = create("gumbel", glove_small, 1e4, {})
    ids = np.arange(0, glove_small.n, 40)
    whole = measure(mech, ids, 16, chunk_rng(1, 1, 0))
    monkeypatch.setattr(stats_mod, "MAX_DRAWS_PER_CALL", 16 * 7)
    split = measure(mech, ids, 16, chunk_rng(1, 1, 0))
    # different call sizes consume the stream differently; the statistics stay in agreement
    assert abs(whole[0].mean() - split[0].mean()) < 0.08
    assert split[0].shape == (len(ids),)


def _cli(args: list[str], cache_root) -> object:  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [*args, "--vocab-size", "2000", "--cache-dir", str(cache_root), "-q"])


def test_cli_stats_json_csv_and_plot(glove_small, cache_root, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    csv_path, png = tmp_path / "s.csv", tmp_path / "s.png"
    res = _cli(["stats", "--mechanism", "laplace", "--epsilon", "5,10", "--sample", "40", "--draws",
                "10", "--seed", "1", "--json", "--csv", str(csv_path), "--plot", str(png)], cache_root)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    data = json.loads(res.output)  # type: ignore[attr-defined]
    assert [r["epsilon"] for r in data["results"]] == [5.0, 10.0]
    assert csv_path.read_text().startswith("mechanism,epsilon,band,statistic")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_stats_refuses_infeasible_gumbel_in_one_line(glove_small, cache_root) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run([sys.executable, "-m", "privtext", "stats", "--mechanism", "gumbel",
                           "--epsilon", "3", "--vocab-size", "2000", "--cache-dir", str(cache_root), "-q"],
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "ε_∞" in err and "Traceback" not in err
