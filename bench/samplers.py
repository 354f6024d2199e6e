"""Throughput of the whole-vocabulary samplers and the nearest-word searches, before and after.

    python bench/samplers.py                               # every case, mechanism alone + end to end
    python bench/samplers.py --only santext laplace-hnsw --skip-e2e
    python bench/samplers.py --in-process --chunks 4 --repeat 3   # one core, words per CPU-second
    python bench/samplers.py --in-process --chunks 4 --chunk-tokens 47000   # the same in the CLI's chunk size

For each case it prints words/s of

* the mechanism call alone: `perturb_ids` over 20 Newsgroups ids in chunks of 1000 documents,
  2 spawned workers with one BLAS/FAISS thread each (bench/mechanisms.py's harness);
* end to end: `privtext perturb` on a 20 Newsgroups JSONL slice with `--workers 2`, wall time of
  the whole command (process start, index open, pool, tokenising, I/O), words from its report.

Cases: the exact envelope sampler (santext, density exact, tem with a wide threshold) and, for
comparison, the same mechanisms with the former exact scan (`method=scan`, mechanism call only);
laplace, mahalanobis, vickrey at ε = 10 with certified exact search and with `search=hnsw`.
The HNSW graph and the density prior are built first (excluded; their time is printed).

`--in-process` measures instead, in this process on one thread, words per CPU-second
(time.process_time) of santext / density / tem `perturb_ids` on the first `--chunks` real
20 Newsgroups chunks (after one warm-up pass over them, so the per-process caches are as warm as
in a long run; the warm-up's first chunk, what a fresh worker pays once, is printed apart), best
and median of `--repeat` passes, and the proposals per token of each exact sampler: a figure
that the machine's load disturbs much less than wall-clock words/s.
The development machine is a shared 2-core box: figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mechanisms as harness  # bench/mechanisms.py
import throughput  # bench/throughput.py: the 20 Newsgroups JSONL

# (label, mechanism, ε, params, token budget for the mechanism call, words for end to end)
CASES: list[tuple[str, str, float, dict[str, Any], int, int]] = [
    ("santext", "santext", 3.0, {}, 1_000_000, 1_500_000),
    ("density", "density", 3.0, {}, 1_000_000, 1_500_000),
    ("tem-wide", "tem", 2.0, {}, 1_000_000, 1_500_000),
    ("santext-scan", "santext", 3.0, {"method": "scan"}, 250_000, 0),
    ("density-scan", "density", 3.0, {"method": "scan"}, 250_000, 0),
    ("tem-wide-scan", "tem", 2.0, {"method": "scan"}, 250_000, 0),
    ("laplace", "laplace", 10.0, {}, 250_000, 600_000),
    ("mahalanobis", "mahalanobis", 10.0, {}, 250_000, 600_000),
    ("vickrey", "vickrey", 10.0, {}, 250_000, 600_000),
    ("laplace-hnsw", "laplace", 10.0, {"search": "hnsw"}, 1_000_000, 1_500_000),
    ("mahalanobis-hnsw", "mahalanobis", 10.0, {"search": "hnsw"}, 1_000_000, 1_500_000),
    ("vickrey-hnsw", "vickrey", 10.0, {"search": "hnsw"}, 1_000_000, 1_500_000),
]


def _scan_patch() -> None:
    """`method=scan` is not a mechanism parameter: it selects the former sampler in the worker."""
    from privtext.mechanisms import fullvocab

    original = fullvocab.FullVocabularySampler.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["method"] = "scan"
        original(self, *args, **kwargs)

    fullvocab.FullVocabularySampler.__init__ = init  # type: ignore[method-assign]


def _worker(*args: Any) -> None:
    if os.environ.get("PRIVTEXT_BENCH_SCAN") == "1":
        _scan_patch()
    harness._worker(*args)


def mechanism_alone(index: Any, label: str, name: str, epsilon: float, params: dict[str, Any],
                    budget: int, workers: int, tmp: Path) -> harness.Result:
    scan = params.pop("method", None) == "scan"
    os.environ["PRIVTEXT_BENCH_SCAN"] = "1" if scan else "0"
    if scan:
        _scan_patch()
    harness._worker = _worker  # type: ignore[assignment]
    ids, bounds, _ = harness.corpus_ids(index)
    return harness.run_case(index, label, name, epsilon, params, ids, bounds, budget, workers, tmp)


def end_to_end(name: str, epsilon: float, params: dict[str, Any], words: int, workers: int,
               vocab: int, out: Path) -> tuple[float, int, float]:
    corpus = out / f"20ng-{words}.jsonl"
    if not corpus.exists():
        throughput.write_jsonl(corpus, throughput.take_words(throughput.newsgroups_texts(), words))
    report = out / f"report-{name}.json"
    cmd = [sys.executable, "-m", "privtext", "perturb", "--no-risk", str(corpus), "-o", os.devnull, "--format", "jsonl",
           "--mechanism", name, "--epsilon", str(epsilon), "--vocab-size", str(vocab),
           "--workers", str(workers), "--report", str(report), "-q"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    data = json.loads(report.read_text())
    recall = data["mechanism"]["derived"].get("hnsw_recall", {}).get("recall_at_1_zipf", float("nan"))
    return seconds, int(data["counts"]["word_tokens"]), recall


IN_PROCESS_CASES = [("santext", "santext", 3.0), ("density", "density", 3.0), ("tem-wide", "tem", 2.0)]


def in_process(index: Any, chunks: int, repeat: int, only: list[str] | None, chunk_tokens: int = 0) -> None:
    import numpy as np

    from privtext.mechanisms import create
    from privtext.randomness import chunk_rng

    ids, bounds, corpus = harness.corpus_ids(index)
    chunks = min(chunks, len(bounds) - 1)
    parts = [np.asarray(ids[bounds[c] : bounds[c + 1]]) for c in range(chunks)]
    words = sum(len(p) for p in parts)
    shape = f"{chunks} chunks of {harness.DOCS_PER_CHUNK} documents"
    if chunk_tokens:  # the same tokens in chunks of the CLI's size (256 KiB of 20NG: ~47k tokens)
        flat = np.concatenate(parts)
        parts = [flat[a : a + chunk_tokens] for a in range(0, len(flat), chunk_tokens)]
        shape = f"{len(parts)} chunks of {chunk_tokens:,} tokens"
    print(f"corpus: {corpus}; {shape}, {words:,} tokens")
    header = (f"{'case':<10}{'eps':>5}{'best words/CPU-s':>18}{'median':>11}{'envelope tokens':>17}"
              f"{'proposals/token':>17}{'sorted-row tokens':>19}{'proposals/token':>17}{'fallbacks':>11}")
    print(header)
    print("-" * len(header))
    for label, name, epsilon in IN_PROCESS_CASES:
        if only and label not in only:
            continue
        mech = create(name, index, epsilon, {})
        mech.prepare()
        sampler = mech.wide if name == "tem" else mech.sampler  # type: ignore[attr-defined]
        env = sampler.envelope
        # Warm-up pass: a fresh process's first chunk (lazily mapped files, per-process caches)
        # is timed apart, as a worker pays it once per run.
        first_pass = []
        for c, part in enumerate(parts):
            start = time.process_time()
            mech.perturb_ids(part, chunk_rng(1, 0, c))
            first_pass.append(time.process_time() - start)
        later = sum(len(p) for p in parts[1:]) / max(sum(first_pass[1:]), 1e-9)
        print(f"{label:<10}first chunk of a fresh process: {first_pass[0] * 1e3:,.0f} ms "
              f"({len(parts[0]) / first_pass[0]:,.0f} words/CPU-s); the pass's later chunks "
              f"{later:,.0f} words/CPU-s", flush=True)
        rows = getattr(sampler, "sorted", None)
        clustered = getattr(sampler, "clustered", None)
        clustered_table = getattr(sampler, "clustered_table", None)
        rates = []
        for _ in range(repeat):
            env.proposals = env.tokens = 0  # diagnostic counters (absent before this change)
            if rows is not None:
                rows.proposals = rows.tokens = 0
            if clustered is not None:
                clustered.proposals = clustered.tokens = 0
            if clustered_table is not None:
                clustered_table.proposals = clustered_table.tokens = 0
            start = time.process_time()
            for c, part in enumerate(parts):
                mech.perturb_ids(part, chunk_rng(12345, 0, c))
            rates.append(words / (time.process_time() - start))
        per_token = env.proposals / env.tokens if getattr(env, "tokens", 0) else float("nan")
        if clustered is not None:
            print(f"{'':<10}cluster-bounded words: {clustered.tokens:,} tokens, "
                  f"{clustered.proposals / max(clustered.tokens, 1):.2f} proposals/token")
        if clustered_table is not None:
            print(f"{'':<10}cluster-bounded words with table rows: {clustered_table.tokens:,} tokens, "
                  f"{clustered_table.proposals / max(clustered_table.tokens, 1):.2f} proposals/token")
        row_tokens = rows.tokens if rows is not None else 0
        row_rate = rows.proposals / rows.tokens if row_tokens else float("nan")
        print(f"{label:<10}{epsilon:>5g}{max(rates):>18,.0f}{float(np.median(rates)):>11,.0f}"
              f"{env.tokens:>17,}{per_token:>17.2f}{row_tokens:>19,}{row_rate:>17.2f}{sampler.fallbacks:>11}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="labels: " + ", ".join(c[0] for c in CASES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--skip-e2e", action="store_true", help="mechanism call only")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every token budget (e.g. 0.3 on a busy machine)")
    parser.add_argument("--in-process", action="store_true",
                        help="one core in this process: words per CPU-second of santext, density "
                             "and tem perturb_ids, with proposals per token")
    parser.add_argument("--chunks", type=int, default=4, help="--in-process: 20NG chunks per pass")
    parser.add_argument("--repeat", type=int, default=3, help="--in-process: timed passes")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="--in-process: re-cut the tokens into chunks of this many (47000: the CLI's "
                             "256 KiB chunks of 20 Newsgroups); default: chunks of 1000 documents")
    args = parser.parse_args(argv)
    os.environ.update(harness.SINGLE_THREAD_ENV)

    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index
    from privtext.mechanisms import create

    index = ensure_index(IndexSpec(EmbeddingSource(), args.vocab, 64)).index
    if args.in_process:
        import privtext

        print(f"privtext imported from {Path(privtext.__file__).parent}")
        threadpool_limits = None
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        print(f"index: {index.path} (n = {index.n}, K = {index.neighbors}); one process, one thread; "
              f"load average at start {', '.join(f'{a:.1f}' for a in os.getloadavg())} on {os.cpu_count()} cpus")
        if threadpool_limits is not None:
            with threadpool_limits(1):
                in_process(index, args.chunks, args.repeat, args.only, args.chunk_tokens)
        else:
            in_process(index, args.chunks, args.repeat, args.only, args.chunk_tokens)
        print(f"load average at end {', '.join(f'{a:.1f}' for a in os.getloadavg())}")
        return 0
    print(f"index: {index.path} (n = {index.n}, K = {index.neighbors}); workers: {args.workers}; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    header = (f"{'case':<18}{'eps':>5}  {'mechanism call words/s':>23}{'end to end words/s':>20}"
              f"{'recall@1 (zipf)':>17}{'prep s':>8}")
    print(header)
    print("-" * len(header))
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, epsilon, params, budget, e2e_words in CASES:
            if args.only and label not in args.only:
                continue
            params = dict(params)
            t0 = time.perf_counter()
            prep_params = {k: v for k, v in params.items() if k != "method"}
            create(name, index, epsilon, prep_params).prepare()  # graph / prior built once
            prep = time.perf_counter() - t0
            budget, e2e_words = int(budget * args.scale), int(e2e_words * args.scale)
            res = mechanism_alone(index, label, name, epsilon, params, budget, args.workers, Path(tmp))
            e2e = "-"
            recall = "-"
            if e2e_words and not args.skip_e2e:
                seconds, words, r = end_to_end(name, epsilon, prep_params, e2e_words, args.workers,
                                               args.vocab, out)
                e2e = f"{words / seconds:,.0f}"
                recall = "-" if r != r else f"{r:.3f}"
            print(f"{label:<18}{epsilon:>5g}  {res.words_per_second:>23,.0f}{e2e:>20}{recall:>17}"
                  f"{prep:>8.1f}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
