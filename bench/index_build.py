"""Index build time and peak memory at 100k and 400k words of the default GloVe 6B 50d, K = 64.

Each size runs in a fresh child process (so peak RSS is that build's alone) and prints wall
seconds, CPU seconds (user + system of the child: on a shared machine wall time hides how much
work was done), peak RSS, and how many candidates per word the float32 scan left for the exact
re-rank. The neighbour table is timed alone and as part of a full `privtext index` build
(loading, cleaning, table, FAISS index, digests, fsync).

    .venv/bin/python bench/index_build.py                 # 100k and 400k
    .venv/bin/python bench/index_build.py --sizes 100000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, resource, sys, time
from pathlib import Path
size, threads, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import numpy as np
from privtext.embeddings import EmbeddingSource, load_vocabulary
from privtext.neighbors import exact_neighbor_table
vectors = load_vocabulary(EmbeddingSource(), size).vectors
t0, c0 = time.perf_counter(), time.process_time()
_ids, _dist, stats = exact_neighbor_table(vectors, 64, threads=threads or None, progress=False)
table = (time.perf_counter() - t0, time.process_time() - c0)
del _ids, _dist
from privtext.index import IndexSpec, ensure_index
t0, c0 = time.perf_counter(), time.process_time()
result = ensure_index(IndexSpec(EmbeddingSource(), size, 64), Path(cache), force=True, progress=False)
full = (time.perf_counter() - t0, time.process_time() - c0)
print(json.dumps({"words": result.index.n, "table_wall_s": table[0], "table_cpu_s": table[1],
                  "build_wall_s": full[0], "build_cpu_s": full[1],
                  "candidates_per_word": stats.candidates_per_row,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--threads", type=int, default=0, help="0: every core this process may use")
    args = parser.parse_args()
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"load average at start: {' '.join(load)} (figures taken on a busy machine are upper bounds)")
    print(f"{'vocab':>8} {'words':>7} {'table s':>8} {'table cpu':>9} {'build s':>8} {'build cpu':>9} "
          f"{'cand/word':>9} {'peak RSS MiB':>12}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as cache:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _CHILD, str(size), str(args.threads), cache],
                                 capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"{size:>8} {r['words']:>7} {r['table_wall_s']:>8.1f} {r['table_cpu_s']:>9.1f} "
              f"{r['build_wall_s']:>8.1f} {r['build_cpu_s']:>9.1f} {r['candidates_per_word']:>9.1f} "
              f"{r['peak_rss_mib']:>12.0f}   (child total: {wall:.1f} s wall, {child_cpu:.1f} s CPU)")


if __name__ == "__main__":
    main()
