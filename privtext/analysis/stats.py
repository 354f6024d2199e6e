"""Plausible-deniability statistics: what a given ε does to words, measured (mechanisms.md).

For a word w and R independent draws of the mechanism on w:

- N_w, the share of draws that return w itself ("unchanged"), and
- S_w, the number of distinct outputs among the R draws ("support").

ε values are not comparable across mechanisms or embeddings; these statistics are, which is why
`calibrate` and `evaluate --match-unchanged` match mechanisms on them.

The vocabulary sample is stratified by frequency band: rows are in frequency order, so the bands
are decades of rank (1–100, 101–1000, ...), each given an equal share of the sample (a band
smaller than its share is taken whole). The pooled ("all") summary therefore weighs each band
equally: between the vocabulary-wide distribution (dominated by rare words) and the
token-weighted one of running text (dominated by frequent words). Per-band rows show both ends.

All draws of one ε go through the mechanism as `np.repeat(sample_ids, R)` (a few vectorised calls
bounded in size, so memory stays flat), from one Generator derived from the run key; every ε of a
run replays the same stream (common random numbers), which makes curves over ε smooth and lets
`calibrate` bisect on a statistic that is monotone for the nearest-word mechanisms.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privtext.errors import UsageError
from privtext.index import EmbeddingIndex
from privtext.mechanisms import create
from privtext.mechanisms.base import Mechanism
from privtext.randomness import chunk_rng, run_key, seed_commitment

DEFAULT_SAMPLE = 1000
DEFAULT_DRAWS = 100
PERCENTILES = (5, 25, 50, 75, 95)
# Runs are split into calls of whole words of at most this many draws: it bounds memory (Gumbel
# materialises draws × table width float64 scores, 2^15 × 64 × 8 B = 16 MiB) and lets the
# progress bar move during a slow ε (Laplace at small ε on 100k words: ~3k draws/s), while calls
# stay large enough for FAISS's batched search (fastest from 4096 queries).
MAX_DRAWS_PER_CALL = 1 << 15
# Streams of a statistics run: (input id, chunk index) pairs under the run key.
_SAMPLE_STREAM = (0, 0)
_DRAW_STREAM = (1, 0)
STATISTICS = ("unchanged", "support")


@dataclass(frozen=True)
class Band:
    """Ranks [start, stop) of the frequency-ordered vocabulary."""

    start: int
    stop: int

    @property
    def label(self) -> str:
        return f"{self.start + 1}-{self.stop}"


def frequency_bands(n: int) -> list[Band]:
    """Decades of frequency rank: 1–100, 101–1000, 1001–10000, ... (the last one cut at n)."""
    edges = [0]
    edge = 100
    while edge < n:
        edges.append(edge)
        edge *= 10
    edges.append(n)
    return [Band(a, b) for a, b in itertools.pairwise(edges)]


def stratified_sample(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`size` distinct word ids (sorted) and their band numbers, equal allocation per band."""
    if size < 1:
        raise UsageError("--sample must be at least 1")
    bands = frequency_bands(n)
    quota = _allocate(size, [b.stop - b.start for b in bands])
    ids, band_of = [], []
    for number, (band, take) in enumerate(zip(bands, quota)):
        if take == 0:
            continue
        chosen = rng.choice(band.stop - band.start, size=take, replace=False) + band.start
        ids.append(np.sort(chosen))
        band_of.append(np.full(take, number))
    return np.concatenate(ids).astype(np.int64), np.concatenate(band_of).astype(np.int64)


def _allocate(size: int, capacities: list[int]) -> list[int]:
    """Split `size` as evenly as possible over bins, no bin above its capacity."""
    take = [0] * len(capacities)
    left = min(size, sum(capacities))
    open_bins = [i for i, c in enumerate(capacities) if c > 0]
    while left > 0 and open_bins:
        share, extra = divmod(left, len(open_bins))
        for rank, i in enumerate(open_bins):
            add = min(capacities[i] - take[i], share + (1 if rank < extra else 0))
            take[i] += add
            left -= add
        open_bins = [i for i in open_bins if take[i] < capacities[i]]
    return take


def measure(mechanism: Mechanism, ids: np.ndarray, draws: int, rng: np.random.Generator,
            progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(N_w, S_w) for each id in `ids`: R = `draws` independent perturbations of each word.

    `progress`, if given, is a tqdm bar advanced by the number of draws done.
    """
    if draws < 1:
        raise UsageError("--draws must be at least 1")
    ids = np.asarray(ids, dtype=np.int64)
    words_per_call = max(1, MAX_DRAWS_PER_CALL // draws)
    unchanged = np.empty(len(ids), dtype=np.float64)
    support = np.empty(len(ids), dtype=np.int64)
    for start in range(0, len(ids), words_per_call):
        block = ids[start : start + words_per_call]
        out = mechanism.perturb_ids(np.repeat(block, draws), rng).reshape(len(block), draws)
        unchanged[start : start + len(block)] = (out == block[:, None]).mean(axis=1)
        ordered = np.sort(out, axis=1)
        support[start : start + len(block)] = 1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)
        if progress is not None:
            progress.update(len(block) * draws)
    return unchanged, support


def describe(values: np.ndarray) -> dict[str, float]:
    """Mean and the fixed percentiles of one statistic over words."""
    values = np.asarray(values, dtype=np.float64)
    out = {"mean": float(values.mean())}
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[f"p{p}"] = float(v)
    return out


@dataclass
class EpsilonStatistics:
    """Per-word N_w and S_w at one ε, with the sample they were measured on."""

    epsilon: float
    ids: np.ndarray
    bands: np.ndarray
    band_defs: list[Band]
    unchanged: np.ndarray
    support: np.ndarray
    draws: int

    def median(self, statistic: str) -> float:
        return float(np.median(self.values(statistic)))

    def values(self, statistic: str) -> np.ndarray:
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}")
        return self.unchanged if statistic == "unchanged" else self.support.astype(np.float64)

    def summary(self) -> dict[str, Any]:
        bands = []
        for number, band in enumerate(self.band_defs):
            mask = self.bands == number
            if not mask.any():
                continue
            bands.append({"band": band.label, "first_rank": band.start + 1, "last_rank": band.stop,
                          "words": int(mask.sum()),
                          "unchanged": describe(self.unchanged[mask]),
                          "support": describe(self.support[mask])})
        return {"epsilon": self.epsilon, "words": len(self.ids), "draws": self.draws,
                "unchanged": describe(self.unchanged), "support": describe(self.support),
                "bands": bands}


@dataclass
class StatsResult:
    mechanism: str
    params: dict[str, Any]
    index: dict[str, Any]
    sample: int
    draws: int
    seed_commitment: str | None
    results: list[EpsilonStatistics] = field(default_factory=list)
    guarantees: dict[float, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "params": self.params,
            "embedding": self.index,
            "sample": self.sample,
            "draws": self.draws,
            "bands": "decades of frequency rank, equal share of the sample per band",
            "seed_commitment": self.seed_commitment,
            "results": [dict(r.summary(), guarantee=self.guarantees.get(r.epsilon))
                        for r in self.results],
        }

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows: one per (ε, band or 'all', statistic)."""
        rows = []
        for r in self.results:
            s = r.summary()
            groups = [("all", s)] + [(b["band"], b) for b in s["bands"]]
            for band, group in groups:
                for statistic in STATISTICS:
                    rows.append({"mechanism": self.mechanism, "epsilon": r.epsilon, "band": band,
                                 "statistic": statistic, "words": group["words"],
                                 "draws": r.draws, **group[statistic]})
        return rows


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class StatsSampler:
    """A fixed word sample and random stream over which N_w, S_w are measured at any ε.

    Every `at(ε)` call replays the same Generator stream (common random numbers), so results for
    different ε differ only through ε, never through the sample or the noise draws.
    """

    def __init__(self, index: EmbeddingIndex, mechanism: str, params: dict[str, Any] | None = None,
                 sample: int = DEFAULT_SAMPLE, draws: int = DEFAULT_DRAWS, seed: str | None = None,
                 key: int | None = None):
        if draws < 1:
            raise UsageError("--draws must be at least 1")
        self.index = index
        self.mechanism = mechanism
        self.params = dict(params or {})
        self.draws = int(draws)
        self.key = key if key is not None else run_key(seed)
        self.band_defs = frequency_bands(index.n)
        self.ids, self.bands = stratified_sample(index.n, sample, chunk_rng(self.key, *_SAMPLE_STREAM))

    def build(self, epsilon: float) -> Mechanism:
        """The mechanism at ε (raises InfeasibleEpsilonError/ParameterError for bad values)."""
        mech = create(self.mechanism, self.index, epsilon, self.params)
        mech.prepare()
        return mech

    def at(self, epsilon: float, progress: Any = None, mechanism: Mechanism | None = None) -> EpsilonStatistics:
        mech = mechanism if mechanism is not None else self.build(epsilon)
        unchanged, support = measure(mech, self.ids, self.draws, chunk_rng(self.key, *_DRAW_STREAM), progress)
        return EpsilonStatistics(float(epsilon), self.ids, self.bands, self.band_defs,
                                 unchanged, support, self.draws)


def run_stats(index: EmbeddingIndex, mechanism: str, epsilons: Iterable[float],
              params: dict[str, Any] | None = None, sample: int = DEFAULT_SAMPLE,
              draws: int = DEFAULT_DRAWS, seed: str | None = None,
              progress: bool | None = None) -> StatsResult:
    """N_w and S_w over a stratified vocabulary sample for each ε (one progress bar in all)."""
    from tqdm import tqdm

    epsilons = [float(e) for e in epsilons]
    if not epsilons:
        raise UsageError("give at least one --epsilon value")
    sampler = StatsSampler(index, mechanism, params, sample, draws, seed)
    # Build every mechanism first: an infeasible ε fails before any sampling time is spent.
    mechs = [sampler.build(e) for e in epsilons]
    result = StatsResult(mechanism, sampler.params, index.identity(), len(sampler.ids), sampler.draws,
                         seed_commitment(seed))
    total = len(sampler.ids) * sampler.draws * len(epsilons)
    with tqdm(total=total, desc=f"stats {mechanism}", unit="draw", unit_scale=True,
              disable=_tqdm_disable(progress), leave=False) as bar:
        for eps, mech in zip(epsilons, mechs):
            bar.set_postfix_str(f"ε={eps:g}")
            result.results.append(sampler.at(eps, bar, mech))
            result.guarantees[eps] = mech.guarantee.statement
    return result


def _tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None = on only when stderr is a terminal; False = off; True = on."""
    if progress is None:
        return None
    return not progress


def format_table(result: StatsResult) -> str:
    """A plain-text summary: one line per ε (all words), then the medians by band."""
    lines = [f"{result.mechanism}: {result.sample} words × {result.draws} draws over "
             f"{result.index['vocab_size']} words ({result.index['source']})",
             f"{'epsilon':>12}  {'N_w p5':>7} {'p25':>6} {'median':>6} {'p75':>6} {'p95':>6}   "
             f"{'S_w p5':>7} {'p25':>6} {'median':>6} {'p75':>6} {'p95':>6}"]
    for r in result.results:
        s = r.summary()
        u, v = s["unchanged"], s["support"]
        lines.append(f"{_fmt_eps(r.epsilon):>12}  {u['p5']:7.3f} {u['p25']:6.3f} {u['p50']:6.3f} "
                     f"{u['p75']:6.3f} {u['p95']:6.3f}   {v['p5']:7.1f} {v['p25']:6.1f} "
                     f"{v['p50']:6.1f} {v['p75']:6.1f} {v['p95']:6.1f}")
    if result.results and len(result.results[0].summary()["bands"]) > 1:
        bands = [b["band"] for b in result.results[0].summary()["bands"]]
        lines.append("median N_w / median S_w by frequency rank band:")
        lines.append(f"{'epsilon':>12}  " + "  ".join(f"{b:>17}" for b in bands))
        for r in result.results:
            cells = [f"{b['unchanged']['p50']:7.3f} / {b['support']['p50']:6.1f}"
                     for b in r.summary()["bands"]]
            lines.append(f"{_fmt_eps(r.epsilon):>12}  " + "  ".join(f"{c:>17}" for c in cells))
    return "\n".join(lines) + "\n"


def _fmt_eps(eps: float) -> str:
    return f"{eps:.6g}" if math.isfinite(eps) else str(eps)


def plot_stats(result: StatsResult, path: str) -> None:
    """N_w and S_w against ε (log scale): median with 25–75 and 5–95 percentile bands, and the
    median of each frequency band."""
    plt = require_matplotlib()
    eps = np.array([r.epsilon for r in result.results])
    order = np.argsort(eps)
    summaries = [result.results[i].summary() for i in order]
    eps = eps[order]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, statistic, label in ((axes[0], "unchanged", "N_w (share of draws unchanged)"),
                                 (axes[1], "support", f"S_w (distinct outputs in {result.draws} draws)")):
        get = lambda key, st=statistic: np.array([s[st][key] for s in summaries])  # noqa: E731
        ax.fill_between(eps, get("p5"), get("p95"), alpha=0.15, color="C0", label="p5–p95")
        ax.fill_between(eps, get("p25"), get("p75"), alpha=0.3, color="C0", label="p25–p75")
        ax.plot(eps, get("p50"), "o-", color="C0", label="median (all)")
        bands = summaries[0]["bands"]
        for j, band in enumerate(bands if len(bands) > 1 else []):
            med = [next((b[statistic]["p50"] for b in s["bands"] if b["band"] == band["band"]), np.nan)
                   for s in summaries]
            ax.plot(eps, med, "--", color=f"C{j + 1}", lw=1, label=f"median, ranks {band['band']}")
        ax.set_xscale("log")
        ax.set_xlabel("ε")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result.mechanism}: plausible deniability over {result.sample} sampled words")
    save_figure(fig, path)


def require_matplotlib() -> Any:
    """pyplot with a non-interactive backend, or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'privtext[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    target = Path(path)
    if not target.parent.exists():
        raise UsageError(f"output directory does not exist: {target.parent}; create it first")
    fig.savefig(target, dpi=110)
    plt.close(fig)
