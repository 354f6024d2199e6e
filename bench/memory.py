"""Peak memory of `privtext perturb` against input size and record size (docs/reliability.md).

    .venv/bin/python bench/memory.py                 # 5 MB, 50 MB, 500 MB inputs and one 30 MB record
    .venv/bin/python bench/memory.py --sizes 5,50    # skip the 500 MB one

Inputs are generated on the fly in a temporary directory (short, tweet-like JSONL records; one
record of ~30 MB for the long-record case) and deleted afterwards. The run is a subprocess with
2 workers on the default index; a sampler sums the resident memory (VmRSS) of every process of the
run (found by a marker in their environment: main process, fork server, workers) every 50 ms and
keeps the peak. Prints one line per case.
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
import uuid
from pathlib import Path

WORDS = ("the government said report was new and market fell times people city team police "
         "president company week year world first").split()


def make_jsonl(path: Path, megabytes: float) -> int:
    target = int(megabytes * 1e6)
    written = i = 0
    with open(path, "w") as fh:
        while written < target:
            text = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(24)) + f" {i}."
            line = json.dumps({"id": i, "user": {"name": f"u{i % 977}"}, "text": text}) + "\n"
            fh.write(line)
            written += len(line)
            i += 1
    return written


def make_long_record(path: Path, megabytes: float) -> int:
    n = int(megabytes * 1e6 / 6)
    line = json.dumps({"id": 1, "text": " ".join(WORDS[k % len(WORDS)] for k in range(n))}) + "\n"
    path.write_text(line)
    return len(line)


def tree_rss_kib(marker: str) -> int:
    total = 0
    needle = f"PRIVTEXT_BENCH_MARK={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def measure(src: Path, out: Path, workers: int) -> tuple[float, int, float]:
    marker = uuid.uuid4().hex
    env = {**os.environ, "PRIVTEXT_BENCH_MARK": marker}
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_kib(marker))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    sampler.start()
    proc = subprocess.run([sys.executable, "-m", "privtext", "perturb", "--no-risk", str(src), "-o", str(out),
                           "--epsilon", "300", "--workers", str(workers), "-q"], env=env,
                          capture_output=True)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.decode())
    return time.monotonic() - start, peak, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,50,500", help="input sizes in MB")
    parser.add_argument("--long-record-mb", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="privtext-memory-") as tmp:
        work = Path(tmp)
        cases = [(f"{mb} MB input (short records)", float(mb), False) for mb in args.sizes.split(",") if mb]
        if args.long_record_mb:
            cases.append((f"one {args.long_record_mb:g} MB record", args.long_record_mb, True))
        print(f"{'case':32s} {'bytes':>12s} {'seconds':>8s} {'peak tree RSS':>14s}")
        for label, mb, long in cases:
            src = work / "in.jsonl"
            size = make_long_record(src, mb) if long else make_jsonl(src, mb)
            seconds, peak, _ = measure(src, work / "out.jsonl", args.workers)
            print(f"{label:32s} {size:12,d} {seconds:8.1f} {peak / 1024:11.0f} MiB", flush=True)
            src.unlink()
            (work / "out.jsonl").unlink()


if __name__ == "__main__":
    main()
