"""Attack success: what a Bayes-optimal adversary recovers from one perturbed word (mechanisms.md §10).

The adversary knows the mechanism, the index and a public prior π over the vocabulary, sees one
output y and guesses the input. Its success probability is

    V(π) = Σ_y max_x π(x)·P[y|x],     baseline κ = max_x π(x) (a guess without the output),

and any pure per-token bound ε₀ of the mechanism's map caps it: V ≤ min(1, e^ε₀·κ), and for the
uniform prior the tight V ≤ e^ε₀/(e^ε₀ + n − 1) (the guessing probability of an ε₀-DP
mechanism on n inputs; randomized response attains it). Priors: `uniform` (1/n) and `zipf`
(π_i ∝ 1/(i + 1) over vocabulary row i, which is frequency order). Both are public: no prior is
ever derived from a corpus being anonymised.

How V is computed:

* exact (`method: "exact"`) where the mechanism declares a closed form (`Mechanism.closed_form`):
  santext, tem, density exact (an `ExponentialForm`: rows ∝ exp(log prior − scale·min(d, clamp)))
  and custext (a `GroupForm`). Rows of P are built in float64 blocks of a few dozen inputs (one
  matrix product for the squared distances, then sqrt and exp), normalised by their own sum,
  weighted by π(x) and reduced into a running column maximum; an n × n matrix is never held.
  Blocks run on `threads` threads (numpy releases the GIL; BLAS is kept to one thread each).
* Monte-Carlo (`method: "monte-carlo"`) otherwise (laplace, mahalanobis, vickrey, gumbel): a
  held-out guesser. `draws_per_word` outputs of every vocabulary word estimate P̂[y|x] and give
  the MAP guesser g(y) = argmax_x π(x)·P̂[y|x] (an output never seen in training guessed as
  itself, or as the likeliest word); with the identity and the constant guess argmax π (which
  attains the baseline) these are the candidates. Half of `test_draws` fresh draws with x ~ π
  pick the best candidate; `test_draws` further draws measure it: k successes in N trials
  estimate V_g ≤ V without bias (neither the guesser nor the pick saw them), with a
  Clopper–Pearson 95 % interval. It is a lower bound on V (any fixed guesser is), not an
  estimate of V itself: the plug-in Σ_y max_x π(x)·P̂[y|x] on the training draws would be biased
  upwards and is not reported.

Context-aware attackers (a language model reading the whole document) do better than this
single-word figure: report it as a lower bound on real-world risk.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import UsageError
from privtext.index import EmbeddingIndex
from privtext.mechanisms.base import ExponentialForm, GroupForm, Mechanism

PRIORS = ("uniform", "zipf")
DEFAULT_DRAWS_PER_WORD = 2
DEFAULT_TEST_DRAWS = 50_000
DEFAULT_THREADS = 2
CONFIDENCE = 0.95
RISK_VERSION = 1
_ROWS_PER_BLOCK = 32
_PERTURB_BATCH = 65_536


def prior_weights(n: int, prior: str) -> np.ndarray:
    """π over vocabulary rows, float64, summing to 1."""
    if prior == "uniform":
        return np.full(n, 1.0 / n)
    if prior == "zipf":
        w = 1.0 / np.arange(1, n + 1, dtype=np.float64)
        return w / w.sum()
    raise UsageError(f"unknown prior {prior!r}; choose uniform or zipf")


def success_bound(per_token_pure_bound: float | None, pi: np.ndarray, prior: str) -> float | None:
    """The cap on V from a pure per-token bound ε₀ (None when the map states none)."""
    if per_token_pure_bound is None or not math.isfinite(per_token_pure_bound):
        return None
    eps0 = per_token_pure_bound
    n = len(pi)
    if prior == "uniform":
        return 1.0 / (1.0 + (n - 1) * math.exp(-eps0)) if eps0 < 745 else 1.0
    return min(1.0, math.exp(min(eps0, 709.0)) * float(pi.max()))


@dataclass
class RiskResult:
    mechanism: str
    epsilon: float
    params: dict[str, Any]
    prior: str
    attack_success: float
    baseline: float
    bound: float | None
    method: str  # "exact" | "monte-carlo"
    interval: tuple[float, float]
    draws: int
    seconds: float
    vocab_size: int

    @property
    def estimate(self) -> str:
        if self.method == "exact":
            return "exact Bayes-optimal success Σ_y max_x π(x)·P[y|x] in float64"
        return ("held-out MAP guesser: a lower bound on the Bayes-optimal success, with a "
                f"Clopper–Pearson {CONFIDENCE:.0%} interval")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "params": self.params,
            "prior": self.prior,
            "attack_success": self.attack_success,
            "baseline": self.baseline,
            "bound": self.bound,
            "method": self.method,
            "interval": list(self.interval),
            "draws": self.draws,
            "seconds": round(self.seconds, 3),
            "vocab_size": self.vocab_size,
            "estimate": self.estimate,
        }


# --- exact: closed forms --------------------------------------------------------------------------


def _blas_one_thread() -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own setting
        return nullcontext()
    return threadpool_limits(limits=1)


def exact_exponential(index: EmbeddingIndex, form: ExponentialForm, priors: dict[str, np.ndarray],
                      threads: int = DEFAULT_THREADS) -> dict[str, float]:
    """V(π) for each prior, exactly, for an ExponentialForm (blocked float64, no n × n array)."""
    from privtext.mechanisms.fullvocab import augmented_vectors, squared_distances

    n, lo = index.n, form.lo
    aug = augmented_vectors(index)
    width = n - lo
    log_prior = None if form.log_prior is None else np.asarray(form.log_prior, dtype=np.float64)
    if log_prior is not None and len(log_prior) == n and lo > 0:
        log_prior = log_prior[lo:]
    # Shifting the prior by its maximum once keeps every row's largest weight in [e^−range, 1]
    # when the row holds its own word (distance 0), so no per-row shift pass is needed; rows
    # without their own word (SanText+ non-sensitive inputs) or a prior of huge range are
    # shifted row by row.
    prior_range = 0.0
    if log_prior is not None:
        prior_range = float(log_prior.max() - log_prior.min())
        log_prior = log_prior - log_prior.max()
    names = list(priors)
    alpha = float(form.floor)

    def run(blocks: Sequence[int]) -> np.ndarray:
        colmax = np.zeros((len(names), width))
        buf = np.empty((_ROWS_PER_BLOCK, width))
        tmp = np.empty((_ROWS_PER_BLOCK, width))
        for start in blocks:
            words = np.arange(start, min(start + _ROWS_PER_BLOCK, n))
            b = len(words)
            d = buf[:b]
            # scale² inside the product: sqrt gives scale·d directly
            squared_distances(aug, words, lo, n, out=d, factor=form.scale**2)
            np.sqrt(d, out=d)
            if form.clamp is not None:
                np.minimum(d, form.scale * form.clamp, out=d)
            if log_prior is not None:
                np.subtract(log_prior, d, out=d)
            else:
                np.negative(d, out=d)
            if words[0] < lo or prior_range > 600.0:
                d -= d.max(axis=1, keepdims=True)  # each row's own shift: exp never overflows
            np.exp(d, out=d)
            row_mass = 1.0 - np.where(words < lo, form.keep, 0.0)  # SanText+: kept words
            d *= ((1.0 - alpha) * row_mass / d.sum(axis=1))[:, None]  # P[y|x] without the floor
            for j, name in enumerate(names):
                pi = priors[name][words]
                if alpha == 0.0 and pi.min() == pi.max():  # a flat prior scales the column max
                    np.maximum(colmax[j], d.max(axis=0) * pi[0], out=colmax[j])
                    continue
                t = tmp[:b]
                np.multiply(d, pi[:, None], out=t)
                if alpha:
                    t += (pi * alpha / n)[:, None]
                np.maximum(colmax[j], t.max(axis=0), out=colmax[j])
        return colmax

    starts = list(range(0, n, _ROWS_PER_BLOCK))
    parts = [starts[i::threads] for i in range(max(1, threads))]
    with _blas_one_thread(), ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(run, parts))
    colmax = np.max(np.stack(results), axis=0)
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        pi = priors[name]
        total = float(colmax[j].sum())
        if lo > 0:
            # Columns below lo (SanText+ non-sensitive words): only a kept input reaches them.
            kept = pi[:lo] * ((1.0 - alpha) * form.keep + alpha / n)
            total += float(np.maximum(kept, pi.max() * alpha / n).sum())
        out[name] = total
    return out


def exact_groups(form: GroupForm, priors: dict[str, np.ndarray]) -> dict[str, float]:
    """V(π) for a GroupForm: each column's maximum over the inputs whose group holds it, or the
    floor's π(x)·α/n from any other input (the largest π gives it)."""
    members = np.asarray(form.members)
    probs = np.asarray(form.probabilities, dtype=np.float64)
    n = len(members)
    alpha = float(form.floor)
    valid = members >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], members.shape)[valid]
    cols = members[valid]
    out: dict[str, float] = {}
    for name, pi in priors.items():
        values = pi[rows] * ((1.0 - alpha) * probs[valid] + alpha / n)
        colmax = np.full(n, pi.max() * alpha / n)
        np.maximum.at(colmax, cols, values)
        out[name] = float(colmax.sum())
    return out


# --- Monte-Carlo: a held-out MAP guesser ----------------------------------------------------------


def _perturb_many(mechanism: Mechanism, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(len(ids), dtype=np.int64)
    for start in range(0, len(ids), _PERTURB_BATCH):
        part = ids[start : start + _PERTURB_BATCH]
        out[start : start + len(part)] = mechanism.perturb_ids(part, rng)
    return out


def _map_guesser(n: int, train_x: np.ndarray, train_y: np.ndarray, pi: np.ndarray,
                 unseen: np.ndarray) -> np.ndarray:
    """g[y] = argmax_x π(x)·count(x → y) over the training draws (every word drew equally often;
    ties prefer x = y); an output never seen in training gets unseen[y]."""
    keys, counts = np.unique(train_y * n + train_x, return_counts=True)
    y, x = keys // n, keys % n
    score = pi[x] * counts * (1.0 + 1e-9 * (x == y))
    order = np.lexsort((-score, y))  # by y, best score first
    first = np.ones(len(order), dtype=bool)
    first[1:] = y[order][1:] != y[order][:-1]
    guess = np.asarray(unseen, dtype=np.int64).copy()
    guess[y[order][first]] = x[order][first]
    return guess


def candidate_guessers(n: int, train_x: np.ndarray, train_y: np.ndarray,
                       pi: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed guessers (output → guessed input) built from the training draws and the prior only:
    the trained MAP guesser with two fallbacks for unseen outputs, the identity, and the constant
    guess argmax π (which alone attains the baseline)."""
    identity = np.arange(n, dtype=np.int64)
    constant = np.full(n, int(np.argmax(pi)), dtype=np.int64)
    return {
        "map (unseen: itself)": _map_guesser(n, train_x, train_y, pi, identity),
        "map (unseen: most likely word)": _map_guesser(n, train_x, train_y, pi, constant),
        "identity": identity,
        "most likely word": constant,
    }


def clopper_pearson(k: int, trials: int, level: float = CONFIDENCE) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1.0 - level) / 2.0
    lo = float(beta.ppf(a, k, trials - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1.0 - a, k + 1, trials - k)) if k < trials else 1.0
    return lo, hi


def _draw_inputs(pi: np.ndarray, prior: str, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(pi)
    if prior == "uniform":
        return rng.integers(0, n, size=size, dtype=np.int64)
    return np.minimum(np.searchsorted(np.cumsum(pi), rng.random(size), side="right"), n - 1)


def monte_carlo(mechanism: Mechanism, priors: dict[str, np.ndarray], rng: np.random.Generator,
                draws_per_word: int = DEFAULT_DRAWS_PER_WORD,
                test_draws: int = DEFAULT_TEST_DRAWS) -> dict[str, tuple[float, tuple[float, float], int]]:
    """{prior: (k/N, Clopper–Pearson interval, draws used)} for a held-out guesser.

    Three independent sets of draws: training (every word `draws_per_word` times) builds the
    candidate guessers; a validation set (x ~ π, half of `test_draws`) picks the best of them;
    the test set (x ~ π, `test_draws`) measures the pick. Neither choice saw the test draws, so
    k/N estimates the pick's success, a lower bound on V, without bias."""
    if draws_per_word < 1 or test_draws < 1:
        raise UsageError("--draws-per-word and --test-draws must be at least 1")
    n = mechanism.index.n
    train_x = np.repeat(np.arange(n, dtype=np.int64), draws_per_word)
    train_y = _perturb_many(mechanism, train_x, rng)
    validation_draws = max(1, test_draws // 2)
    out = {}
    for name, pi in priors.items():
        guessers = candidate_guessers(n, train_x, train_y, pi)
        val_x = _draw_inputs(pi, name, validation_draws, rng)
        val_y = _perturb_many(mechanism, val_x, rng)
        best = max(guessers.values(), key=lambda g: int((g[val_y] == val_x).sum()))
        test_x = _draw_inputs(pi, name, test_draws, rng)
        test_y = _perturb_many(mechanism, test_x, rng)
        k = int((best[test_y] == test_x).sum())
        out[name] = (k / test_draws, clopper_pearson(k, test_draws),
                     len(train_x) + validation_draws + test_draws)
    return out


# --- the figure -----------------------------------------------------------------------------------


def attack_success(mechanism: Mechanism, priors: Sequence[str] = ("uniform",),
                   rng: np.random.Generator | None = None,
                   draws_per_word: int = DEFAULT_DRAWS_PER_WORD,
                   test_draws: int = DEFAULT_TEST_DRAWS,
                   threads: int = DEFAULT_THREADS) -> dict[str, RiskResult]:
    """V(π) for each named prior, exact where the mechanism has a closed form, else the held-out
    Monte-Carlo lower bound."""
    index = mechanism.index
    n = index.n
    weights = {name: prior_weights(n, name) for name in priors}
    t0 = time.perf_counter()
    mechanism.prepare()
    form = mechanism.closed_form()
    if isinstance(form, ExponentialForm):
        values = exact_exponential(index, form, weights, threads)
        found = {k: (v, (v, v), 0) for k, v in values.items()}
        method = "exact"
    elif isinstance(form, GroupForm):
        values = exact_groups(form, weights)
        found = {k: (v, (v, v), 0) for k, v in values.items()}
        method = "exact"
    else:
        found = monte_carlo(mechanism, weights, rng if rng is not None else np.random.default_rng(),
                            draws_per_word, test_draws)
        method = "monte-carlo"
    seconds = time.perf_counter() - t0
    pure = mechanism.guarantee.per_token_pure_bound
    return {
        name: RiskResult(
            mechanism=mechanism.name, epsilon=mechanism.epsilon, params=mechanism.params.to_dict(),
            prior=name, attack_success=value, baseline=float(weights[name].max()),
            bound=success_bound(pure, weights[name], name), method=method, interval=interval,
            draws=draws, seconds=seconds, vocab_size=n)
        for name, (value, interval, draws) in found.items()
    }


def cache_key(mechanism: Mechanism, priors: Sequence[str], draws_per_word: int,
              test_draws: int) -> dict[str, Any]:
    return {"mechanism": mechanism.name, "epsilon": repr(float(mechanism.epsilon)),
            "params": json.loads(json.dumps(mechanism.params.to_dict(), default=str)),
            "priors": list(priors), "draws_per_word": draws_per_word, "test_draws": test_draws,
            "version": RISK_VERSION}


def cached_attack_success(mechanism: Mechanism, priors: Sequence[str] = PRIORS,
                          draws_per_word: int = DEFAULT_DRAWS_PER_WORD,
                          test_draws: int = DEFAULT_TEST_DRAWS,
                          on_compute: Callable[[], None] | None = None) -> dict[str, RiskResult]:
    """`attack_success`, computed once per (index, mechanism, ε, params, draws) and cached with
    the index as a derived artifact. The Monte-Carlo stream is seeded from that key (public data
    only: vocabulary words of the public embedding), so the cached figure is well defined."""
    key = cache_key(mechanism, priors, draws_per_word, test_draws)
    seed = int.from_bytes(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest()[:16], "big")
    fresh: dict[str, RiskResult] = {}

    def build(_: EmbeddingIndex) -> np.ndarray:
        if on_compute is not None:  # e.g. a one-line notice: the first time can take a minute
            on_compute()
        fresh.update(attack_success(mechanism, priors, np.random.default_rng(seed),
                                    draws_per_word, test_draws))
        return np.array([[r.attack_success, r.interval[0], r.interval[1], r.draws, r.seconds,
                          1.0 if r.method == "exact" else 0.0] for r in (fresh[p] for p in priors)])

    # A read-only shared cache still reports the figure: computed in memory, not kept.
    table = np.asarray(mechanism.index.derived_artifact("attack-success", key, build,
                                                        uncached_if_read_only=True))
    if fresh:
        return fresh
    n = mechanism.index.n
    pure = mechanism.guarantee.per_token_pure_bound
    out = {}
    for name, row in zip(priors, table):
        pi = prior_weights(n, name)
        out[name] = RiskResult(
            mechanism=mechanism.name, epsilon=mechanism.epsilon, params=mechanism.params.to_dict(),
            prior=name, attack_success=float(row[0]), baseline=float(pi.max()),
            bound=success_bound(pure, pi, name), method="exact" if row[5] else "monte-carlo",
            interval=(float(row[1]), float(row[2])), draws=int(row[3]), seconds=float(row[4]),
            vocab_size=n)
    return out


def format_result(result: RiskResult) -> str:
    interval = ("" if result.method == "exact"
                else f" (95% interval {result.interval[0]:.4g} – {result.interval[1]:.4g}, "
                     f"{result.draws} draws)")
    bound = "none stated" if result.bound is None else f"{result.bound:.4g}"
    return (f"attack success {result.attack_success:.4g}{interval}\n"
            f"  {result.mechanism} ε={result.epsilon:g}, {result.prior} prior over "
            f"{result.vocab_size} words: baseline (no output seen) {result.baseline:.4g}, bound "
            f"from the pure per-token bound {bound}\n"
            f"  method: {result.method}: {result.estimate}; {result.seconds:.1f} s\n"
            "  a single-word, context-free adversary: a lower bound on real-world risk\n")
