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
    """Runs in a fresh process: start the engine, open the index, perturb twice (cold: the
    engine's Python workers or actors start and open the index; warm: a second job on the same
    session), write the last result; print JSON."""
    t0 = time.perf_counter()
    import privtext

    files = sorted(str(p) for p in Path(shards).glob("*.parquet"))
    if engine == "spark":
        from privtext.engines.spark import perturb_dataframe, session

        spark = session(cores=CORES)

        def read() -> object:
            return spark.read.parquet(*files)

        def perturb(data: object, anon: object) -> tuple[object, dict]:  # type: ignore[type-arg]
            return perturb_dataframe(data, "text", anon)
    else:
        from pyarrow.fs import LocalFileSystem

        from privtext.engines.ray import init, perturb_dataset

        ray = init(cores=CORES)

        def read() -> object:
            return ray.data.read_parquet(files, filesystem=LocalFileSystem(), override_num_blocks=len(files))

        def perturb(data: object, anon: object) -> tuple[object, dict]:  # type: ignore[type-arg]
            return perturb_dataset(data, "text", anon)
    t_engine = time.perf_counter()
    anon = privtext.Anonymizer(mechanism, epsilon=epsilon, vocab_size=vocab_size)
    t_ready = time.perf_counter()
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        result, report = perturb(read(), privtext.Anonymizer(mechanism, epsilon=epsilon, index=anon.index))
        runs.append(time.perf_counter() - t)
        if engine == "spark":
            result.unpersist()  # type: ignore[attr-defined]
    t = time.perf_counter()
    if engine == "spark":
        result.write.parquet(out)  # type: ignore[attr-defined]
    else:
        result.write_parquet(out)  # type: ignore[attr-defined]
    print(json.dumps({
        "engine_start_s": t_engine - t0, "startup_s": t_ready - t0, "cold_s": runs[0], "perturb_s": runs[1],
        "write_s": time.perf_counter() - t, "words": report["counts"]["word_tokens"],
        "partitions": report["engine"].get("partitions", report["engine"].get("blocks")),
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
        print("start-up: process, engine and index open; cold: first job (engine workers/actors start); "
              "warm: a second job in the same session")
        print(f"{'engine':<8} {'parts':>5} {'start-up s':>10} {'cold s':>7} {'warm s':>7} {'words':>11} "
              f"{'words/s warm':>13} {'words/s cold':>13} {'incl. start-up':>15}")
        for engine in args.engines.split(","):
            result = (run_cli(work / "shards", work, args) if engine == "cli"
                      else run_engine(engine, work / "shards", work, args))
            cold = result.get("cold_s", result["perturb_s"])
            print(f"{engine:<8} {result.get('partitions', args.shards):>5} {result['startup_s']:>10.1f} "
                  f"{cold:>7.1f} {result['perturb_s']:>7.1f} {result['words']:>11,} "
                  f"{result['words'] / result['perturb_s']:>13,.0f} {result['words'] / cold:>13,.0f} "
                  f"{result['words'] / (result['startup_s'] + cold):>15,.0f}", flush=True)


if __name__ == "__main__":
    main()
