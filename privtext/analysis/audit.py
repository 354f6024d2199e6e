"""Black-box privacy audit: sample a mechanism on word pairs and test its stated guarantee.

For a pair of inputs (x, x') and an event E (a set of outputs), the stated guarantee says
P[M(x) ∈ E] ≤ exp(B) · P[M(x') ∈ E] with B = rate · d(x, x') (metric DP) or B = rate (pure DP).
The audit draws S outputs for each input and, per pair and direction:

1. splits the draws in halves; the *selection* half ranks outputs by their smoothed empirical
   likelihood ratio and proposes a fixed number of events: the best single outputs and the top-k
   output sets (the Neyman–Pearson shape: the k outputs with the largest ratio);
2. on the *estimation* half, which played no part in choosing the events, it takes a one-sided
   Clopper–Pearson lower bound on P[M(x) ∈ E] and an upper bound on P[M(x') ∈ E]; the log of
   their quotient is a lower confidence bound on the privacy loss of the pair.

All events of all pairs share one Bonferroni-corrected level, so with probability at least
1 − α no reported lower bound exceeds the true loss: a bound above the stated B refutes the
guarantee at that confidence. The converse does not hold: a bound below B proves nothing, and
with S draws no lower bound can exceed about ln(S) (see `max_detectable_loss`), so loose stated
guarantees cannot be refuted by sampling. The exact checks in the test suite cover that side.

A second test checks randomness discipline from outside: the same word perturbed in different
chunks (generators from `privtext.randomness.chunk_rng`) must give independent outputs. A
mechanism that reuses a fixed seed gives identical outputs across chunks.

The audit names vocabulary words of the public embedding only; it never sees a user corpus.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from privtext.errors import UsageError
from privtext.index import EmbeddingIndex
from privtext.mechanisms.base import Mechanism
from privtext.randomness import chunk_rng

DEFAULT_SAMPLES = 20_000
DEFAULT_PAIRS = 12
DEFAULT_ALPHA = 0.05
SINGLE_EVENTS = 3  # best single outputs per direction
SET_SIZES = (2, 4, 8, 16, 32, 64)  # top-k output sets per direction
_BATCH = 65_536
_SUPPORT_MIN = 5  # an output seen this often for one input and never for the other is a "gap"


# --- statistics -----------------------------------------------------------------------------------


def cp_lower(count: np.ndarray | int, total: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound at level 1 − alpha (0 when count = 0)."""
    from scipy.stats import beta

    c = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = beta.ppf(alpha, c, total - c + 1)
    return np.where(c > 0, out, 0.0)


def cp_upper(count: np.ndarray | int, total: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound at level 1 − alpha (1 when count = total)."""
    from scipy.stats import beta

    c = np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = beta.ppf(1.0 - alpha, c + 1, total - c)
    return np.where(c < total, out, 1.0)


def max_detectable_loss(samples_half: int, alpha: float) -> float:
    """The largest lower bound any event can give: all draws of x in E, none of x'."""
    return float(math.log(cp_lower(samples_half, samples_half, alpha / 2)
                          / cp_upper(0, samples_half, alpha / 2)))


# --- pairs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPair:
    x: int
    x2: int
    kind: str  # near | far | beyond-table | given | all
    rank: int | None  # rank of x2 in x's neighbour table (0 = x itself), None if beyond it


def _table_rank(index: EmbeddingIndex, x: int, x2: int) -> int | None:
    hit = np.flatnonzero(np.asarray(index.neighbor_ids[x]) == x2)
    return int(hit[0]) if len(hit) else None


def select_pairs(index: EmbeddingIndex, count: int, rng: np.random.Generator) -> list[AuditPair]:
    """`count` pairs: a third near (ranks 1–3 in the neighbour table), a third beyond the table
    (the nearest word outside x's table: the pairs a truncated mechanism cannot relate), a third
    far (uniformly random)."""
    n, width = index.n, index.neighbors
    beyond_possible = n > width
    kinds = ["near", "beyond-table", "far"] if beyond_possible else ["near", "far"]
    pairs: list[AuditPair] = []
    seen: set[tuple[int, int]] = set()
    # Inputs come from the most frequent half: rare rows of an embedding are noisier words.
    pool = max(2, n // 2)
    attempts = 0
    while len(pairs) < count and attempts < 50 * count:
        attempts += 1
        kind = kinds[len(pairs) % len(kinds)]
        x = int(rng.integers(0, pool))
        if kind == "near":
            x2 = int(index.neighbor_ids[x, int(rng.integers(1, min(4, width)))])
        elif kind == "beyond-table":
            x2 = _first_beyond_table(index, x)
        else:
            x2 = int(rng.integers(0, n))
            if _table_rank(index, x, x2) is not None and beyond_possible:
                continue
        key = (min(x, x2), max(x, x2))
        if x2 == x or key in seen:
            continue
        seen.add(key)
        pairs.append(AuditPair(x, x2, kind, _table_rank(index, x, x2)))
    return pairs


def _first_beyond_table(index: EmbeddingIndex, x: int) -> int:
    width = index.neighbors
    _, found = index.faiss_index.search(
        np.ascontiguousarray(index.vectors[x : x + 1], dtype=np.float32), min(index.n, width + 16))
    row = set(np.asarray(index.neighbor_ids[x]).tolist())
    candidates = [int(i) for i in found[0] if i >= 0 and int(i) not in row]
    v = np.asarray(index.vectors, dtype=np.float64)
    return min(candidates, key=lambda i: float(np.linalg.norm(v[i] - v[x])))


def all_pairs(index: EmbeddingIndex) -> list[AuditPair]:
    """Every unordered pair (tiny vocabularies in tests)."""
    return [AuditPair(a, b, "all", _table_rank(index, a, b))
            for a in range(index.n) for b in range(a + 1, index.n)]


def pairs_from_words(index: EmbeddingIndex, words: Sequence[str]) -> list[AuditPair]:
    if len(words) != 2:
        raise UsageError("--words expects exactly two vocabulary words, as A,B")
    ids = []
    for position, word in enumerate(words, start=1):
        if word not in index.word_to_id:
            # The word is not echoed: it could come from a private text.
            raise UsageError(f"word {position} of --words is not in the vocabulary of this index")
        ids.append(index.word_to_id[word])
    if ids[0] == ids[1]:
        raise UsageError("--words needs two different vocabulary words")
    return [AuditPair(ids[0], ids[1], "given", _table_rank(index, ids[0], ids[1]))]


# --- what the guarantee says about a pair ---------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """The stated bound for a pair and which outputs it speaks about."""

    bound: float | None  # nats; None when the guarantee says nothing about this pair
    note: str
    outputs: np.ndarray | None = None  # boolean mask over the vocabulary; None = all outputs


def coverage(mechanism: Mechanism, pair: AuditPair) -> Coverage:
    """The stated bound for the pair, read from the mechanism's executable privacy map
    (`privacy_loss_on_outputs`): no guarantee text is parsed, no private attribute read, so a new
    mechanism is audited by declaring its map."""
    bounds, outputs = mechanism.privacy_loss_on_outputs(np.array([pair.x]), np.array([pair.x2]))
    bound = float(bounds[0])
    if not math.isfinite(bound):
        return Coverage(None, "no bound stated for this pair (e.g. disjoint supports)")
    note = f"stated {bound:.4g} nats"
    if outputs is not None:
        note += f" for outputs in a public set of {int(outputs.sum())} words"
    return Coverage(bound, note, outputs)


# --- sampling -------------------------------------------------------------------------------------


def sample_outputs(mechanism: Mechanism, words: Sequence[int], samples: int,
                   rng: np.random.Generator) -> dict[int, np.ndarray]:
    """`samples` independent outputs for each word (one batch of repeated ids at a time)."""
    out: dict[int, np.ndarray] = {}
    for w in words:
        parts = []
        left = samples
        while left:
            size = min(left, _BATCH)
            parts.append(np.asarray(mechanism.perturb_ids(np.full(size, w, dtype=np.int64), rng)))
            left -= size
        out[int(w)] = np.concatenate(parts)
    return out


# --- the loss test --------------------------------------------------------------------------------


@dataclass
class EventBound:
    direction: str  # "x>x'" means P[x ∈ E] / P[x' ∈ E]
    event: str  # "output <word>" or "top-k set"
    size: int
    count_num: int
    count_den: int
    lower_bound: float  # nats, −inf when nothing can be said
    point_estimate: float


@dataclass
class PairResult:
    x: str
    x2: str
    kind: str
    rank: int | None
    distance: float
    stated_bound: float | None
    stated_note: str
    lower_bound: float  # max over events and directions (nats)
    point_estimate: float
    best_event: EventBound | None
    support_gap: int  # outputs seen ≥ _SUPPORT_MIN times for one input, never for the other
    verdict: str  # ok | EXCEEDS | not covered

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("lower_bound", "point_estimate"):
            if not math.isfinite(d[key]):
                d[key] = None
        if d["best_event"] is not None:
            for key in ("lower_bound", "point_estimate"):
                if not math.isfinite(d["best_event"][key]):
                    d["best_event"][key] = None
        return d


@dataclass
class IndependenceResult:
    words: list[str]
    chunks: int
    cross_matches: int
    cross_trials: int
    within_matches: int
    within_trials: int
    verdict: str  # ok | EXCEEDS | inconclusive
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditResult:
    mechanism: str
    epsilon: float
    params: dict[str, Any]
    guarantee: dict[str, Any]
    vocab_size: int
    samples: int
    alpha: float
    tests: int
    max_detectable: float
    pairs: list[PairResult]
    independence: IndependenceResult | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(p.verdict == "EXCEEDS" for p in self.pairs) or (
            self.independence is not None and self.independence.verdict == "EXCEEDS")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "params": self.params,
            "guarantee": self.guarantee,
            "vocab_size": self.vocab_size,
            "samples_per_word": self.samples,
            "alpha": self.alpha,
            "tests": self.tests,
            "max_detectable_loss": self.max_detectable,
            "pairs": [p.to_dict() for p in self.pairs],
            "independence": None if self.independence is None else self.independence.to_dict(),
            "seconds": round(self.seconds, 3),
            "flagged": self.flagged,
            "notes": self.notes,
        }


def _propose_events(sel_num: np.ndarray, sel_den: np.ndarray, allowed: np.ndarray | None) -> list[np.ndarray]:
    """Events (arrays of output ids) from the selection half for the direction num over den."""
    cand = np.flatnonzero(sel_num > 0)
    if allowed is not None:
        cand = cand[allowed[cand]]
    if len(cand) == 0:
        return []
    # Smoothed ratio: an output never seen for den is promising but not infinitely so.
    ratio = (sel_num[cand] + 0.5) / (sel_den[cand] + 0.5)
    order = cand[np.lexsort((-sel_num[cand], -ratio))]
    events = [order[i : i + 1] for i in range(min(SINGLE_EVENTS, len(order)))]
    events += [order[:k] for k in SET_SIZES if k < len(order)]
    return events


def _log_ratio(a: float, b: float) -> float:
    if a <= 0:
        return -math.inf
    if b <= 0:
        return math.inf
    return math.log(a / b)


def run_audit(
    mechanism: Mechanism,
    pairs: Sequence[AuditPair],
    samples: int = DEFAULT_SAMPLES,
    rng: np.random.Generator | None = None,
    alpha: float = DEFAULT_ALPHA,
    independence: bool = True,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Audit `mechanism` on `pairs` with `samples` draws per word (half select, half estimate).

    With independence=True, half of α goes to the cross-chunk independence test."""
    if samples < 20:
        raise UsageError("--samples must be at least 20")
    if not pairs:
        raise UsageError("no pairs to audit")
    rng = rng if rng is not None else np.random.default_rng()
    t0 = time.perf_counter()
    index = mechanism.index
    n = index.n
    words = sorted({p.x for p in pairs} | {p.x2 for p in pairs})
    if progress:
        progress(f"sampling {samples} outputs for each of {len(words)} words")
    outs = sample_outputs(mechanism, words, samples, rng)
    half = samples // 2
    est_total = samples - half
    sel = {w: np.bincount(o[:half], minlength=n) for w, o in outs.items()}
    est = {w: np.bincount(o[half:], minlength=n) for w, o in outs.items()}

    # Stage 1: events per pair and direction, from the selection half only.
    plans = []
    for p in pairs:
        cov = coverage(mechanism, p)
        directions = []
        if cov.bound is not None:
            for label, a, b in (("x>x'", p.x, p.x2), ("x'>x", p.x2, p.x)):
                directions.append((label, a, b, _propose_events(sel[a], sel[b], cov.outputs)))
        plans.append((p, cov, directions))
    tests = sum(len(ev) for _, _, dirs in plans for *_, ev in dirs)
    loss_alpha = alpha / 2 if independence else alpha
    per_test = loss_alpha / max(tests, 1)

    # Stage 2: bounds on the estimation half at the Bonferroni level.
    results = []
    for p, cov, directions in plans:
        best: EventBound | None = None
        point = -math.inf
        for label, a, b, events in directions:
            for ev in events:
                c_num = int(est[a][ev].sum())
                c_den = int(est[b][ev].sum())
                lo = _log_ratio(float(cp_lower(c_num, est_total, per_test / 2)),
                                float(cp_upper(c_den, est_total, per_test / 2)))
                pe = _log_ratio((c_num + 0.5) / est_total, (c_den + 0.5) / est_total)
                point = max(point, pe)
                name = f"output {index.words[int(ev[0])]!r}" if len(ev) == 1 else f"top-{len(ev)} set"
                bound = EventBound(label, name, len(ev), c_num, c_den, lo, pe)
                if best is None or lo > best.lower_bound:
                    best = bound
        # Counted for uncovered pairs too: it shows why a map states no bound there.
        ca, cb = sel[p.x] + est[p.x], sel[p.x2] + est[p.x2]
        mask = np.ones(n, dtype=bool) if cov.outputs is None else cov.outputs
        gap = int((mask & (((ca >= _SUPPORT_MIN) & (cb == 0)) | ((cb >= _SUPPORT_MIN) & (ca == 0)))).sum())
        lower = best.lower_bound if best is not None else -math.inf
        if cov.bound is None:
            verdict = "not covered"
        elif lower > cov.bound:
            verdict = "EXCEEDS"
        else:
            verdict = "ok"
        results.append(PairResult(
            x=index.words[p.x], x2=index.words[p.x2], kind=p.kind, rank=p.rank,
            distance=float(np.linalg.norm(np.asarray(index.vectors[p.x], dtype=np.float64)
                                          - np.asarray(index.vectors[p.x2], dtype=np.float64))),
            stated_bound=cov.bound, stated_note=cov.note, lower_bound=lower, point_estimate=point,
            best_event=best, support_gap=gap, verdict=verdict))

    indep = None
    if independence:
        if progress:
            progress("independence across chunks")
        diverse = sorted(words, key=lambda w: float((sel[w] / max(half, 1)) @ (sel[w] / max(half, 1))))
        indep = audit_independence(mechanism, diverse[:3], rng=rng, alpha=alpha / 2)
    notes = []
    mdl = max_detectable_loss(est_total, per_test)
    if any(r.stated_bound is not None and r.stated_bound > mdl for r in results):
        notes.append(f"with {samples} draws per word no lower bound can exceed {mdl:.3g} nats; "
                     "pairs whose stated bound is larger cannot be refuted by this audit")
    if any(r.support_gap and r.stated_bound is not None for r in results):
        notes.append("support gap: some output was seen at least "
                     f"{_SUPPORT_MIN} times for one input of a pair and never for the other; a "
                     "probability of exactly zero would make the likelihood ratio unbounded")
    return AuditResult(
        mechanism=mechanism.name, epsilon=mechanism.epsilon, params=mechanism.params.to_dict(),
        guarantee=mechanism.guarantee.to_dict(), vocab_size=n, samples=samples, alpha=alpha,
        tests=tests, max_detectable=mdl, pairs=results, independence=indep,
        seconds=time.perf_counter() - t0, notes=notes)


# --- independence across chunks -------------------------------------------------------------------


def audit_independence(
    mechanism: Mechanism,
    words: Sequence[int],
    chunks: int = 16,
    per_word: int = 256,
    rng: np.random.Generator | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> IndependenceResult:
    """Perturb the same words in `chunks` chunks, each with its own `chunk_rng`, and compare how
    often two draws of one word coincide across chunks (same position) with how often they
    coincide within a chunk (different positions). Under independent per-token randomness both
    are Σ_y p(y)² and the disjoint comparisons are independent Bernoulli trials; a fixed seed
    reused by every chunk makes the cross-chunk matches certain."""
    rng = rng if rng is not None else np.random.default_rng()
    key = int(rng.integers(0, 2**63))
    words = [int(w) for w in words]
    ids = np.repeat(np.asarray(words, dtype=np.int64), per_word)
    chunks -= chunks % 2
    out = np.stack([np.asarray(mechanism.perturb_ids(ids.copy(), chunk_rng(key, 0, c)))
                    for c in range(chunks)])  # (chunks, words · per_word)
    out = out.reshape(chunks, len(words), per_word)
    first, second = out[:, :, : per_word // 2], out[:, :, per_word // 2 :]
    # Cross-chunk: chunk 2i against chunk 2i+1 at the same position (first half of positions).
    cross = first[0::2] == first[1::2]
    # Within-chunk: position 2j against 2j+1 of the same chunk (second half of positions).
    within = second[:, :, 0::2] == second[:, :, 1::2]
    cm, ct = int(cross.sum()), int(cross.size)
    wm, wt = int(within.sum()), int(within.size)
    a = alpha / 2  # two one-sided comparisons
    cross_lo, cross_hi = float(cp_lower(cm, ct, a / 2)), float(cp_upper(cm, ct, a / 2))
    within_lo, within_hi = float(cp_lower(wm, wt, a / 2)), float(cp_upper(wm, wt, a / 2))
    names = [mechanism.index.words[w] for w in words]
    if cross_lo > within_hi:
        return IndependenceResult(names, chunks, cm, ct, wm, wt, "EXCEEDS",
                                  "outputs repeat across chunks: randomness is reused between chunks")
    if within_lo > cross_hi:
        return IndependenceResult(names, chunks, cm, ct, wm, wt, "EXCEEDS",
                                  "outputs repeat within a chunk: randomness is reused between tokens")
    if wm == wt and cm == ct:
        return IndependenceResult(names, chunks, cm, ct, wm, wt, "inconclusive",
                                  "every draw of these words is the word itself")
    return IndependenceResult(names, chunks, cm, ct, wm, wt, "ok",
                              "cross-chunk and within-chunk match rates agree")


# --- presentation ---------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def format_table(result: AuditResult) -> str:
    g = result.guarantee
    lines = [
        f"audit of {result.mechanism} at ε = {result.epsilon:g} on {result.vocab_size} words: "
        f"{result.samples} draws per word, {len(result.pairs)} pairs, {result.tests} tests, "
        f"family-wise α = {result.alpha:g}",
        f"stated guarantee ({g['kind']}): {g['statement']}",
        "",
        f"{'x':>14} {'x′':>14} {'kind':>12} {'rank':>5} {'d':>7} {'stated':>9} {'lower':>8} "
        f"{'point':>8} {'gap':>4}  verdict   best event",
    ]
    for p in result.pairs:
        ev = p.best_event
        event = "-" if ev is None else f"{ev.direction} {ev.event} ({ev.count_num} vs {ev.count_den})"
        lines.append(
            f"{p.x[:14]:>14} {p.x2[:14]:>14} {p.kind:>12} {'-' if p.rank is None else p.rank:>5} "
            f"{p.distance:7.3f} {_fmt(p.stated_bound):>9} {_fmt(p.lower_bound):>8} "
            f"{_fmt(p.point_estimate):>8} {p.support_gap:>4}  {p.verdict:<9} {event}")
    if result.independence is not None:
        i = result.independence
        lines += ["", f"independence across {i.chunks} chunks: cross-chunk matches "
                      f"{i.cross_matches}/{i.cross_trials}, within-chunk {i.within_matches}/"
                      f"{i.within_trials}: {i.verdict} ({i.note})"]
    lines += ["", "lower = lower confidence bound on the privacy loss (nats); point = empirical "
                  "log ratio of the best event; stated = the guarantee's bound for the pair"]
    lines += [f"note: {note}" for note in result.notes]
    verdict = ("FLAGGED: the empirical loss exceeds the stated guarantee" if result.flagged
               else "no pair exceeds the stated guarantee")
    lines += [f"verdict: {verdict} ({result.seconds:.1f} s)"]
    return "\n".join(lines) + "\n"
