"""Utility at a given privacy: train a text classifier on perturbed text, test it on clean text.

For each (mechanism, ε) the training texts are perturbed `repeats` times with independent
Generators, a TF-IDF + logistic-regression classifier (scikit-learn, the optional extra
`evaluate`) is trained on each perturbed copy and scored on the untouched test texts. Accuracy
and macro-F1 are reported as the mean over repeats with a Student-t 95 % interval (the spread of
the privacy noise), beside two references trained once:

- clean: the classifier on the original training text (the ceiling);
- vocabulary-only: out-of-vocabulary words handled by the OOV policy, every other word kept,
  i.e. the limit ε → ∞; the gap from clean is the cost of the vocabulary, not of the noise.

The test set is fixed, so its own sampling error (about sqrt(p(1 − p)/n_test)) is the same for
every row and is reported once as `test_se`.

Mechanisms are compared at the ε that `calibrate` finds for a median N_w (--match-unchanged),
because ε values of different mechanisms are not comparable. Each row also carries
`token_unchanged`, the share of in-vocabulary training tokens the perturbation left unchanged,
measured on the corpus itself (a token-weighted N_w).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from privtext.analysis.calibrate import (
    DEFAULT_DRAWS,
    DEFAULT_SAMPLE,
    Calibrator,
    UnreachableTargetError,
)
from privtext.analysis.stats import StatsSampler, _tqdm_disable, require_matplotlib, save_figure
from privtext.codecs import open_input, split_compression
from privtext.errors import InputFormatError, UsageError
from privtext.index import EmbeddingIndex
from privtext.mechanisms import create
from privtext.mechanisms.base import Mechanism
from privtext.randomness import chunk_rng, run_key, seed_commitment
from privtext.text import OovPolicy, TextPerturber

DEFAULT_REPEATS = 3
DEFAULT_TEST_FRACTION = 0.2
_DOCS_PER_CALL = 500  # bounds the per-call token arrays of a mechanism
_EVAL_STREAM_BASE = 1_000  # input ids of the perturbation streams (repeat r → base + r)


# --- data -------------------------------------------------------------------------------------


@dataclass
class Dataset:
    texts: list[str]
    labels: list[str]
    name: str = "data"

    def __len__(self) -> int:
        return len(self.texts)


def _record_format(path: str) -> str:
    base, _ = split_compression(path)
    suffix = Path(base).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".tab"):
        return "tsv" if suffix in (".tsv", ".tab") else "csv"
    raise UsageError(f"cannot tell the format of {Path(path).name}: use a .jsonl, .csv or .tsv file")


def load_dataset(path: str, text_field: str, label_field: str) -> Dataset:
    """Labelled records from JSONL (optionally .gz/.zst), CSV or TSV with a header row.

    Labels are compared as strings. Errors name the line and field, never the content.
    """
    fmt = _record_format(path)
    texts: list[str] = []
    labels: list[str] = []
    stream = open_input(path)
    try:
        if fmt == "jsonl":
            for line_no, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    raise InputFormatError(f"{Path(path).name} line {line_no}: not valid JSON") from None
                if not isinstance(record, dict):
                    raise InputFormatError(f"{Path(path).name} line {line_no}: not a JSON object")
                _append(texts, labels, record, text_field, label_field, path, line_no)
        else:
            import io

            reader_stream = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            reader = csv.DictReader(reader_stream, delimiter="\t" if fmt == "tsv" else ",")
            for line_no, record in enumerate(reader, start=2):
                _append(texts, labels, record, text_field, label_field, path, line_no)
    except UnicodeDecodeError:
        raise InputFormatError(f"{Path(path).name} is not valid UTF-8") from None
    finally:
        stream.close()
    if not texts:
        raise InputFormatError(f"{Path(path).name} holds no records")
    return Dataset(texts, labels, Path(split_compression(path)[0]).stem)


def _append(texts: list[str], labels: list[str], record: dict[str, Any], text_field: str,
            label_field: str, path: str, line_no: int) -> None:
    for name in (text_field, label_field):
        if record.get(name) is None:
            raise InputFormatError(f"{Path(path).name} line {line_no}: field {name!r} is missing; "
                                   "check --text-field/--label-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise InputFormatError(f"{Path(path).name} line {line_no}: field {text_field!r} is not a string")
    texts.append(text)
    labels.append(str(record[label_field]))


def stratified_split(data: Dataset, test_fraction: float, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
    """Train/test split keeping each label's share (every label keeps at least one train row)."""
    if not 0.0 < test_fraction < 1.0:
        raise UsageError("--test-fraction must be between 0 and 1")
    labels = np.asarray(data.labels)
    test_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        take = min(len(rows) - 1, round(test_fraction * len(rows)))
        test_mask[rows[:take]] = True
    pick = lambda mask: Dataset([data.texts[i] for i in np.flatnonzero(mask)],  # noqa: E731
                                [data.labels[i] for i in np.flatnonzero(mask)], data.name)
    return pick(~test_mask), pick(test_mask)


# --- the classifier ---------------------------------------------------------------------------


def require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise UsageError("evaluate needs scikit-learn: pip install 'privtext[evaluate]'") from None


def train_and_score(train_texts: Sequence[str], train_labels: Sequence[str],
                    test_texts: Sequence[str], test_labels: Sequence[str]) -> tuple[float, float]:
    """(accuracy, macro-F1) of TF-IDF (sublinear tf) + logistic regression. Deterministic."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from threadpoolctl import threadpool_limits

    vectorizer = TfidfVectorizer(sublinear_tf=True)
    features = vectorizer.fit_transform(train_texts)
    # C = 10: TF-IDF rows are L2-normalised, so the default C = 1 over-regularises; this setting
    # reproduces the clean accuracies of design.md (SMS ≈ 0.98, 20NG ≈ 0.84, BBC ≈ 0.99).
    # newton-cg reaches the same convex optimum as lbfgs in a few iterations; one BLAS/OpenMP
    # thread because on a shared 2-core machine oversubscribed threads made fits ~9x slower.
    model = LogisticRegression(C=10.0, solver="newton-cg", max_iter=1000)
    with threadpool_limits(limits=1):
        model.fit(features, list(train_labels))
        predicted = model.predict(vectorizer.transform(test_texts))
    return (float(accuracy_score(test_labels, predicted)),
            float(f1_score(test_labels, predicted, average="macro")))


# --- settings and results ---------------------------------------------------------------------


@dataclass
class Setting:
    """One (mechanism, ε) to evaluate, with the privacy statistics measured at that ε."""

    mechanism: str
    epsilon: float
    params: dict[str, Any] = field(default_factory=dict)
    target_unchanged: float | None = None
    median_unchanged: float | None = None
    median_support: float | None = None
    target_risk: float | None = None
    attack_success: float | None = None  # at this ε, under the prior of the risk matching


@dataclass
class Row:
    dataset: str
    mechanism: str
    epsilon: float | None
    target_unchanged: float | None
    median_unchanged: float | None
    median_support: float | None
    token_unchanged: float | None
    repeats: int
    accuracy: float
    accuracy_ci_low: float | None
    accuracy_ci_high: float | None
    macro_f1: float
    macro_f1_ci_low: float | None
    macro_f1_ci_high: float | None
    delta_accuracy: float = 0.0
    delta_macro_f1: float = 0.0
    seconds: float = 0.0
    params: str = ""
    accuracy_runs: list[float] = field(default_factory=list)
    macro_f1_runs: list[float] = field(default_factory=list)
    target_risk: float | None = None
    attack_success: float | None = None

    def flat(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("accuracy_runs")
        d.pop("macro_f1_runs")
        return d


@dataclass
class Skipped:
    mechanism: str
    target_unchanged: float | None
    reason: str
    target_risk: float | None = None


@dataclass
class EvaluationResult:
    dataset: str
    train_size: int
    test_size: int
    test_se: float
    oov: str
    rows: list[Row] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seed_commitment: str | None = None
    index: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "train_size": self.train_size, "test_size": self.test_size,
                "test_se": self.test_se, "oov": self.oov, "seed_commitment": self.seed_commitment,
                "embedding": self.index,
                "rows": [r.__dict__ for r in self.rows],
                "skipped": [s.__dict__ for s in self.skipped]}

    def baseline(self, name: str = "clean") -> Row:
        return next(r for r in self.rows if r.mechanism == name)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and a Student-t interval over repeats (None for a single run)."""
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, None, None
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + level / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return mean, mean - half, mean + half


class _KeepVocabulary:
    """The ε → ∞ limit as a perturbation: every in-vocabulary id maps to itself."""

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64).copy()


def subkey(key: int, label: str) -> int:
    """An independent 256-bit key for one purpose of a run (calibration, perturbation, split)."""
    digest = hashlib.sha256(key.to_bytes(32, "big") + b"\x00" + label.encode()).digest()
    return int.from_bytes(digest, "big")


def perturb_corpus(index: EmbeddingIndex, mechanism: Mechanism | _KeepVocabulary, texts: Sequence[str],
                   key: int, stream: int, oov: str) -> tuple[list[str], float | None]:
    """Perturbed copies of `texts` and the share of in-vocabulary tokens left unchanged.

    A mechanism runs through the library's front door (`Anonymizer.perturb_batch`), batch b on
    stream (stream, b), exactly as the CLI keys chunk b of input `stream`. The vocabulary-only
    baseline draws no randomness: it is the text path alone, applying the OOV policy."""
    if isinstance(mechanism, _KeepVocabulary):
        perturber = TextPerturber(index, cast(Mechanism, mechanism), oov)
        unused = chunk_rng(key, stream, 0)  # the identity map never draws from it

        def batch(chunk: list[str], _: int) -> tuple[list[str], Any]:
            return perturber.perturb_documents(chunk, unused)
    else:
        from privtext.api import Anonymizer

        anonymizer = Anonymizer.from_mechanism(mechanism, oov=oov, key=key)

        def batch(chunk: list[str], number: int) -> tuple[list[str], Any]:
            return anonymizer.perturb_batch(chunk, stream=(stream, number))  # type: ignore[return-value]

    out: list[str] = []
    perturbed = unchanged = 0
    for number, start in enumerate(range(0, len(texts), _DOCS_PER_CALL)):
        new, counters = batch(list(texts[start : start + _DOCS_PER_CALL]), number)
        out.extend(new)
        perturbed += counters.perturbed
        unchanged += counters.unchanged
    return out, (unchanged / perturbed if perturbed else None)


# --- choosing ε -------------------------------------------------------------------------------


def matched_settings(index: EmbeddingIndex, mechanisms: Sequence[str], targets: Sequence[float],
                     params: dict[str, dict[str, Any]] | None = None, key: int = 0,
                     sample: int = DEFAULT_SAMPLE, draws: int = DEFAULT_DRAWS,
                     progress: bool | None = None,
                     cache: dict[Any, Setting | str] | None = None) -> tuple[list[Setting], list[Skipped]]:
    """Each mechanism's ε for each target median N_w (calibrate), or why it is unreachable.

    `cache` (optional, keyed by mechanism, params and target) lets a caller evaluating several
    datasets on one index calibrate once: the calibration depends only on the index.
    """
    params = params or {}
    settings: list[Setting] = []
    skipped: list[Skipped] = []
    for name in mechanisms:
        mech_params = params.get(name, {})
        calibrator: Calibrator | None = None
        for target in targets:
            cache_key = (name, json.dumps(mech_params, sort_keys=True, default=str), float(target))
            found = cache.get(cache_key) if cache is not None else None
            if found is None:
                if calibrator is None:
                    calibrator = Calibrator(index, name, mech_params, sample, draws,
                                            key=subkey(key, f"calibrate:{name}"), progress=progress)
                try:
                    res = calibrator.solve("unchanged", target)
                    found = Setting(name, res.epsilon, mech_params, float(target), res.achieved,
                                    res.stats.median("support"))
                except UnreachableTargetError as exc:
                    found = str(exc)
                if cache is not None:
                    cache[cache_key] = found
            if isinstance(found, str):
                skipped.append(Skipped(name, float(target), found))
            else:
                settings.append(found)
    return settings, skipped


def risk_matched_settings(index: EmbeddingIndex, mechanisms: Sequence[str], targets: Sequence[float],
                          params: dict[str, dict[str, Any]] | None = None, key: int = 0,
                          prior: str = "uniform", sample: int = DEFAULT_SAMPLE,
                          draws: int = DEFAULT_DRAWS, progress: bool | None = None,
                          cache: dict[Any, Setting | str] | None = None
                          ) -> tuple[list[Setting], list[Skipped]]:
    """Each mechanism's ε for each target attack success (mechanisms.md §10, `prior`), with the
    median N_w and S_w measured at that ε so rows compare with the N_w matching."""
    from privtext.analysis.calibrate import RiskCalibrator

    params = params or {}
    settings: list[Setting] = []
    skipped: list[Skipped] = []
    for name in mechanisms:
        mech_params = params.get(name, {})
        calibrator: RiskCalibrator | None = None
        for target in targets:
            cache_key = ("risk", prior, name, json.dumps(mech_params, sort_keys=True, default=str),
                         float(target))
            found = cache.get(cache_key) if cache is not None else None
            if found is None:
                if calibrator is None:
                    calibrator = RiskCalibrator(index, name, mech_params, prior,
                                                key=subkey(key, f"risk:{name}"), progress=progress)
                try:
                    res = calibrator.solve("risk", target)
                    stats = StatsSampler(index, name, mech_params, sample, draws,
                                         key=subkey(key, f"calibrate:{name}")).at(res.epsilon)
                    found = Setting(name, res.epsilon, mech_params, None, stats.median("unchanged"),
                                    stats.median("support"), float(target), res.achieved)
                except UnreachableTargetError as exc:
                    found = str(exc)
                if cache is not None:
                    cache[cache_key] = found
            if isinstance(found, str):
                skipped.append(Skipped(name, None, found, float(target)))
            else:
                settings.append(found)
    return settings, skipped


def epsilon_settings(index: EmbeddingIndex, epsilons: dict[str, list[float]],
                     params: dict[str, dict[str, Any]] | None = None, key: int = 0,
                     sample: int = DEFAULT_SAMPLE, draws: int = DEFAULT_DRAWS,
                     progress: bool | None = None) -> list[Setting]:
    """Settings for explicit ε values, each with its median N_w and S_w measured (for the plot)."""
    params = params or {}
    settings = []
    for name, values in epsilons.items():
        sampler = StatsSampler(index, name, params.get(name, {}), sample, draws,
                               key=subkey(key, f"calibrate:{name}"))
        for eps in values:
            stats = sampler.at(eps)
            settings.append(Setting(name, float(eps), params.get(name, {}), None,
                                    stats.median("unchanged"), stats.median("support")))
    return settings


# --- the evaluation ---------------------------------------------------------------------------


def evaluate(index: EmbeddingIndex, train: Dataset, test: Dataset, settings: Sequence[Setting],
             repeats: int = DEFAULT_REPEATS, seed: str | None = None, key: int | None = None,
             oov: str = OovPolicy.MASK.value, progress: bool | None = None,
             skipped: Iterable[Skipped] = ()) -> EvaluationResult:
    """Accuracy and macro-F1 of classifiers trained on perturbed `train`, tested on clean `test`."""
    from tqdm import tqdm

    require_sklearn()
    if repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if len(set(train.labels)) < 2:
        raise UsageError("the training data holds a single label; a classifier needs at least two")
    key = key if key is not None else run_key(seed)
    perturb_key = subkey(key, "perturb")
    result = EvaluationResult(train.name, len(train), len(test), 0.0, oov, skipped=list(skipped),
                              seed_commitment=seed_commitment(seed), index=index.identity())
    total = 2 + len(settings) * repeats
    with tqdm(total=total, desc=f"evaluate {train.name}", unit="fit", leave=False,
              disable=_tqdm_disable(progress)) as bar:
        t0 = time.perf_counter()
        acc, f1 = train_and_score(train.texts, train.labels, test.texts, test.labels)
        result.test_se = math.sqrt(acc * (1 - acc) / len(test))
        result.rows.append(Row(train.name, "clean", None, None, None, None, None, 1, acc, None, None,
                               f1, None, None, seconds=time.perf_counter() - t0))
        bar.update(1)
        t0 = time.perf_counter()
        kept, share = perturb_corpus(index, _KeepVocabulary(), train.texts, perturb_key, 0, oov)
        acc_v, f1_v = train_and_score(kept, train.labels, test.texts, test.labels)
        result.rows.append(Row(train.name, "vocabulary-only", None, None, 1.0, 1.0, share, 1,
                               acc_v, None, None, f1_v, None, None, acc_v - acc, f1_v - f1,
                               time.perf_counter() - t0))
        bar.update(1)
        for setting in settings:
            t0 = time.perf_counter()
            mechanism = create(setting.mechanism, index, setting.epsilon, setting.params)
            mechanism.prepare()
            accs, f1s, shares = [], [], []
            for r in range(repeats):
                bar.set_postfix_str(f"{setting.mechanism} ε={setting.epsilon:.4g} run {r + 1}")
                texts, share = perturb_corpus(index, mechanism, train.texts, perturb_key,
                                              _EVAL_STREAM_BASE + r, oov)
                a, f = train_and_score(texts, train.labels, test.texts, test.labels)
                accs.append(a)
                f1s.append(f)
                shares.append(share)
                bar.update(1)
            a_mean, a_lo, a_hi = mean_ci(accs)
            f_mean, f_lo, f_hi = mean_ci(f1s)
            result.rows.append(Row(
                train.name, setting.mechanism, setting.epsilon, setting.target_unchanged,
                setting.median_unchanged, setting.median_support,
                float(np.mean(shares)) if None not in shares else None, repeats,
                a_mean, a_lo, a_hi, f_mean, f_lo, f_hi, a_mean - acc, f_mean - f1,
                time.perf_counter() - t0,
                json.dumps(setting.params, sort_keys=True) if setting.params else "", accs, f1s,
                setting.target_risk, setting.attack_success))
    return result


def rows_csv(rows: Sequence[Row]) -> str:
    from privtext.analysis.stats import rows_to_csv

    return rows_to_csv([r.flat() for r in rows])


def format_result(result: EvaluationResult) -> str:
    lines = [f"{result.dataset}: train {result.train_size}, test {result.test_size} (clean), "
             f"OOV policy {result.oov}; test-set SE ≈ {result.test_se:.3f}",
             f"{'mechanism':<16} {'epsilon':>10} {'target':>6} {'N_w':>5} {'risk':>6} {'tok.unch':>8} "
             f"{'accuracy (95% CI)':>24} {'Δacc':>7} {'macro-F1 (95% CI)':>24} {'ΔF1':>7}"]
    for r in result.rows:
        target = (f"r{r.target_risk:.2f}" if r.target_risk is not None
                  else _num(r.target_unchanged, '.2f'))
        lines.append(
            f"{r.mechanism:<16} {_num(r.epsilon, '.4g'):>10} {target:>6} "
            f"{_num(r.median_unchanged, '.2f'):>5} {_num(r.attack_success, '.3f'):>6} "
            f"{_num(r.token_unchanged, '.3f'):>8} "
            f"{_ci(r.accuracy, r.accuracy_ci_low, r.accuracy_ci_high):>24} {r.delta_accuracy:+7.3f} "
            f"{_ci(r.macro_f1, r.macro_f1_ci_low, r.macro_f1_ci_high):>24} {r.delta_macro_f1:+7.3f}")
    for s in result.skipped:
        what = (f"attack success {s.target_risk:g}" if s.target_risk is not None
                else f"N_w {s.target_unchanged:g}")
        lines.append(f"skipped {s.mechanism} at target {what}: {s.reason}")
    if any(r.target_risk is not None for r in result.rows):
        lines.append("target rNN = matched at attack success NN (column risk: the measured value, "
                     "mechanisms.md §10)")
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _ci(mean: float, lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None:
        return f"{mean:.4f}"
    return f"{mean:.4f} [{lo:.3f}, {hi:.3f}]"


def plot_tradeoff(results: Sequence[EvaluationResult], path: str, metric: str = "accuracy") -> None:
    """Accuracy (or macro-F1) against the median N_w, one line per mechanism and a panel per
    dataset, with 95 % intervals and the clean and vocabulary-only references."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False,
                             constrained_layout=True)
    names = sorted({r.mechanism for res in results for r in res.rows} - {"clean", "vocabulary-only"})
    for ax, res in zip(axes[0], results):
        for j, name in enumerate(names):
            rows = sorted((r for r in res.rows if r.mechanism == name and r.median_unchanged is not None),
                          key=lambda r: r.median_unchanged or 0.0)
            if not rows:
                continue
            x = np.array([r.median_unchanged for r in rows], dtype=float)
            y = np.array([getattr(r, metric) for r in rows])
            lo = np.array([getattr(r, f"{metric}_ci_low") if getattr(r, f"{metric}_ci_low") is not None
                           else getattr(r, metric) for r in rows])
            hi = np.array([getattr(r, f"{metric}_ci_high") if getattr(r, f"{metric}_ci_high") is not None
                           else getattr(r, metric) for r in rows])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", capsize=3, color=f"C{j % 10}",
                        label=name, lw=1.2, ms=4)
        for ref, style in (("clean", "k--"), ("vocabulary-only", "k:")):
            row = next((r for r in res.rows if r.mechanism == ref), None)
            if row is not None:
                ax.axhline(getattr(row, metric), color="k", ls=style[1:], lw=1, label=ref)
        ax.set_xlabel("median N_w (share of draws unchanged)")
        ax.set_ylabel(metric.replace("_", "-"))
        ax.set_title(f"{res.dataset} (train {res.train_size}, test {res.test_size})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
