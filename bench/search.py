"""Nearest-word queries per CPU-second of laplace, mahalanobis and vickrey, before and after.

    python bench/search.py                      # every case, ε = 10, default 100k index
    python bench/search.py --tokens 50000 --repeat 5 --epsilon 10 3

For each mechanism it times `perturb_ids` (noise, search, and vickrey's choice: the whole
mechanism call) in one process with one BLAS/FAISS thread, by `time.process_time`, on word ids
drawn by a Zipf law over the frequency order (close to running text), in calls of `--chunk` ids
like a worker's chunk. Each figure is the best of `--repeat` runs (the machine is shared), in
queries per CPU-second, with the load average printed first. Methods:

* exact, `amx (bf16)`: the threshold search's collection in bf16 on AMX tiles (amx_search.py, the
  default where the compiled kernel runs);
* exact, `threshold`: the certified float32-tile threshold search (nearest.py, the fallback);
* exact, `faiss`: the former path, FAISS flat top-(k + 1) with its certificate (still the
  fallback), selected through `nearest.EXACT_METHOD`;
* hnsw: the default graph search (with the kernel: entry word among the most frequent words,
  bottom layer searched in C); `hnsw-faiss`: FAISS's own search, points sorted by anchor (the
  former default and the fallback); `hnsw-unsorted`: FAISS's, in the former call order; the
  measured recall@1 (`measure_recall`, the report's figure) is printed for the first two.

The end-to-end figure is bench/throughput.py's:
`python bench/throughput.py --mechanisms laplace,mahalanobis,vickrey --workers 2 --corpora 20ng
--skip-limits --skip-startup`.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np


def _timed(mechanism: Any, ids: np.ndarray, chunk: int, repeat: int) -> float:
    """Best CPU-seconds over `repeat` runs of perturb_ids over `ids` in calls of `chunk`."""
    best = float("inf")
    for r in range(repeat):
        rng = np.random.default_rng(r)
        start = time.process_time()
        for lo in range(0, len(ids), chunk):
            mechanism.perturb_ids(ids[lo : lo + chunk], rng)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", default="laplace,mahalanobis,vickrey")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[10.0])
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=40_000, help="exact search; hnsw gets 5x")
    parser.add_argument("--chunk", type=int, default=20_000, help="ids per perturb_ids call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-old", action="store_true", help="only the current methods")
    args = parser.parse_args()

    from privtext.threads import limit_threads

    limit_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index
    from privtext.mechanisms import amx_search, create, nearest

    index = ensure_index(IndexSpec(EmbeddingSource(), args.vocab_size, 64), None, progress=False).index
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{index.n:,} words; one thread; best of {args.repeat}", flush=True)
    rng = np.random.default_rng(2026)
    weights = 1.0 / np.arange(1, index.n + 1)
    exact_ids = rng.choice(index.n, size=args.tokens, p=weights / weights.sum())
    hnsw_ids = rng.choice(index.n, size=5 * args.tokens, p=weights / weights.sum())
    original_nearest = nearest.nearest_words

    def unsorted_hnsw(index_: Any, noisy: np.ndarray, anchors: np.ndarray, k: int = 1,
                      search: str = "exact", ef: int = nearest.HNSW_EF_SEARCH) -> Any:
        if search == "hnsw":
            return nearest._hnsw_search(index_, noisy, k, ef)
        return original_nearest(index_, noisy, anchors, k, search, ef)

    print(f"\n{'mechanism':<12} {'ε':>5} {'method':<14} {'queries/CPU-s':>14}  notes", flush=True)
    for epsilon in args.epsilon:
        for name in args.mechanisms.split(","):
            cases: list[tuple[str, dict[str, Any], str, np.ndarray]] = []
            if amx_search.available():
                cases.append(("amx (bf16)", {}, "amx", exact_ids))
            cases.append(("threshold", {}, "threshold", exact_ids))
            if not args.skip_old:
                cases.append(("faiss (old)", {}, "faiss", exact_ids))
            cases.append(("hnsw", {"search": "hnsw"}, "sorted", hnsw_ids))
            if not args.skip_old and nearest.hnsw_method() == "entry":
                cases.append(("hnsw-faiss", {"search": "hnsw"}, "faiss-graph", hnsw_ids))
            if not args.skip_old:
                cases.append(("hnsw-unsorted", {"search": "hnsw"}, "unsorted", hnsw_ids))
            for label, params, method, ids in cases:
                # FAISS's own graph search for the former hnsw rows (their recall is measured
                # by prepare() with the same search).
                nearest.HNSW_METHOD = "faiss" if method in ("faiss-graph", "unsorted") else "auto"
                mechanism = create(name, index, epsilon, dict(params))
                mechanism.prepare()
                nearest.EXACT_METHOD = method if method in ("amx", "faiss") else "threshold"
                module = __import__(f"privtext.mechanisms.{name}", fromlist=["nearest_words"])
                module.nearest_words = unsorted_hnsw if method == "unsorted" else original_nearest
                try:
                    mechanism.perturb_ids(ids[:2000], np.random.default_rng(99))  # warm caches
                    seconds = _timed(mechanism, ids, args.chunk, args.repeat)
                finally:
                    nearest.EXACT_METHOD = "auto"
                    nearest.HNSW_METHOD = "auto"
                    module.nearest_words = original_nearest
                note = ""
                if params.get("search") == "hnsw" and method in ("sorted", "faiss-graph"):
                    rec = mechanism.derived()["hnsw_recall"]
                    note = (f"recall@1 zipf {rec['recall_at_1_zipf']:.3f}, uniform "
                            f"{rec['recall_at_1_uniform']:.3f} (efSearch {rec['efSearch']}, M {rec['M']})")
                print(f"{name:<12} {epsilon:>5g} {label:<14} {len(ids) / seconds:>14,.0f}  {note}", flush=True)


if __name__ == "__main__":
    main()
