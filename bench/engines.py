"""words/s for the same corpus through the CLI, Spark local mode and Ray local mode, 2 cores each.

Corpus: 20 Newsgroups train+test (as in bench/throughput.py), written as Parquet shards. Each
engine runs in a fresh process, so start-up (JVM + SparkSession, Ray cluster, index open and
mechanism preparation) is timed apart from throughput (the perturbation job itself, from the
report's timing). Embedding: the packaged GloVe 6B 50d at --vocab-size (default 100k).

    python bench/engines.py                           # gumbel ε=300, whole corpus, 4 shards
    python bench/engines.py --max-words 1000000 --mechanism custext --epsilon 3
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import newsgroups_jsonl

CORES = 2


def write_shards(jsonl: Path, target: Path, shards: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    target.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for n in range(shards):
        part = rows[n * per:(n + 1) * per]
        pq.write_table(pa.table({"label": [r["label"] for r in part], "text": [r["text"] for r in part]}),
                       target / f"shard-{n:03d}.parquet")
    return len(rows)


def run_cli(shards: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    report = out / "cli-report.json"
    files = sorted(str(p) for p in shards.glob("*.parquet"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "privtext", "perturb", *files, "-o", str(out / "cli.parquet"),
                    "--mechanism", args.mechanism, "--epsilon", str(args.epsilon), "--vocab-size",
                    str(args.vocab_size), "--workers", str(CORES), "--report", str(report), "-q"],
                   check=True)
    wall = time.perf_counter() - t0
    data = json.loads(report.read_text())
    seconds = data["timing"]["seconds"]
    return {"startup_s": wall - seconds, "perturb_s": seconds, "words": data["counts"]["word_tokens"],
            "wall_s": wall}


def child(engine: str, shards: str, out: str, mechanism: str, epsilon: float, vocab_size: int) -> None:
    """Runs in a fresh process: start the engine, open the index, perturb, write; print JSON."""
    t0 = time.perf_counter()
    import privtext

    files = sorted(str(p) for p in Path(shards).glob("*.parquet"))
    if engine == "spark":
        from privtext.engines.spark import perturb_dataframe, session

        spark = session(cores=CORES)
        t_engine = time.perf_counter()
        anon = privtext.Anonymizer(mechanism, epsilon=epsilon, vocab_size=vocab_size)
        df = spark.read.parquet(*files)
        t_ready = time.perf_counter()
        result, report = perturb_dataframe(df, "text", anon)
        t_done = time.perf_counter()
        result.write.parquet(out)
    else:
        from privtext.engines.ray import init, perturb_dataset

        ray = init(cores=CORES)
        t_engine = time.perf_counter()
        anon = privtext.Anonymizer(mechanism, epsilon=epsilon, vocab_size=vocab_size)
        from pyarrow.fs import LocalFileSystem

        ds = ray.data.read_parquet(files, filesystem=LocalFileSystem())
        t_ready = time.perf_counter()
        result, report = perturb_dataset(ds, "text", anon)
        t_done = time.perf_counter()
        result.write_parquet(out)
    t_written = time.perf_counter()
    print(json.dumps({
        "engine_start_s": t_engine - t0, "startup_s": t_ready - t0, "perturb_s": t_done - t_ready,
        "write_s": t_written - t_done, "words": report["counts"]["word_tokens"],
        "wall_s": t_written - t0, "partitions": report["engine"].get("partitions", report["engine"].get("blocks")),
    }))


def run_engine(engine: str, shards: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--child", engine, "--shard-dir", str(shards),
                           "--out", str(out / engine), "--mechanism", args.mechanism,
                           "--epsilon", str(args.epsilon), "--vocab-size", str(args.vocab_size)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanism", default="gumbel")
    parser.add_argument("--epsilon", type=float, default=300.0)
    parser.add_argument("--vocab-size", type=int, default=100_000)
    parser.add_argument("--max-words", type=int, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--engines", default="cli,spark,ray")
    parser.add_argument("--child", choices=["spark", "ray"], help=argparse.SUPPRESS)
    parser.add_argument("--shard-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.shard_dir, args.out, args.mechanism, args.epsilon, args.vocab_size)
        return
    with tempfile.TemporaryDirectory(prefix="privtext-bench-engines-") as tmp:
        work = Path(tmp)
        jsonl, records, words = newsgroups_jsonl(work / "corpus.jsonl", args.max_words)
        write_shards(jsonl, work / "shards", args.shards)
        # build (or reuse) the index outside the timings
        subprocess.run([sys.executable, "-m", "privtext", "index", "--vocab-size", str(args.vocab_size)],
                       check=True, capture_output=True)
        print(f"corpus: 20 Newsgroups, {records:,} records, ~{words:,} words in {args.shards} Parquet shards; "
              f"{args.mechanism} ε={args.epsilon:g}, vocabulary {args.vocab_size:,}, {CORES} cores each; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'engine':<8} {'start-up s':>10} {'perturb s':>10} {'words':>11} {'words/s':>11} "
              f"{'words/s incl. start-up':>23}")
        for engine in args.engines.split(","):
            result = (run_cli(work / "shards", work, args) if engine == "cli"
                      else run_engine(engine, work / "shards", work, args))
            rate = result["words"] / result["perturb_s"]
            overall = result["words"] / (result["startup_s"] + result["perturb_s"])
            print(f"{engine:<8} {result['startup_s']:>10.1f} {result['perturb_s']:>10.1f} "
                  f"{result['words']:>11,} {rate:>11,.0f} {overall:>23,.0f}", flush=True)


if __name__ == "__main__":
    main()
