"""Directories and globs of shards: one output shard per input shard, resumable, one report."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

VOCAB = ["--vocab-size", "2000"]


@pytest.fixture
def env(glove_small, cache_root: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root)}


def privtext(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "privtext", *args], env=env, capture_output=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.decode()}")
    return proc


def make_shards(root: Path, records: int = 300) -> Path:
    for k, name in enumerate(["a/part-0.jsonl.gz", "a/part-1.jsonl.gz", "b/x.jsonl"]):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps({"id": i, "text": f"the market fell {i + k} times"}) + "\n"
                       for i in range(records)).encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (root / "README.md").write_text("not a shard\n")
    return root


def test_directory_mirrors_names_and_reports_per_shard(tmp_path: Path, env: dict[str, str]) -> None:
    src = make_shards(tmp_path / "in")
    out, report = tmp_path / "out", tmp_path / "r.json"
    privtext(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--seed", "1",
             "--report", str(report), "-q", *VOCAB)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files == ["a/part-0.jsonl.gz", "a/part-1.jsonl.gz", "b/x.jsonl"]
    assert len(gzip.decompress((out / "a/part-1.jsonl.gz").read_bytes()).splitlines()) == 300
    data = json.loads(report.read_text())
    assert data["counts"]["records"] == 900 and data["input"]["inputs"] == 3
    assert [s["records"] for s in data["input"]["shards"]] == [300, 300, 300]
    # a glob of the same shards: the same shard keys the same randomness
    privtext(env, "perturb", f"{src}/a/*.jsonl.gz", "-o", str(tmp_path / "glob"), "--epsilon", "300",
             "--seed", "1", "-q", *VOCAB)
    assert (tmp_path / "glob/part-1.jsonl.gz").read_bytes() == (out / "a/part-1.jsonl.gz").read_bytes()


def test_resume_skips_finished_shards_and_matches_an_uninterrupted_run(tmp_path: Path, env: dict[str, str]) -> None:
    src = make_shards(tmp_path / "in", records=30_000)
    args = ["--epsilon", "300", "--seed", "4", "--workers", "2", "--chunk-size", "200", "-q", *VOCAB]
    privtext(env, "perturb", str(src), "-o", str(tmp_path / "ref"), *args)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "privtext", "perturb", str(src), "-o", str(out), *args],
                            env=env, stderr=subprocess.PIPE)
    manifest = out / ".privtext-shards.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (manifest.exists() and "part-0" in manifest.read_text()):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    again = privtext(env, "perturb", str(src), "-o", str(out), "--resume",
                     *[a for a in args if a != "-q"])
    assert "shard 0: already finished, skipped" in again.stderr.decode()
    for name in ("a/part-0.jsonl.gz", "a/part-1.jsonl.gz", "b/x.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert [p.name for p in out.rglob("*") if ".privtext-" in p.name] == [".privtext-shards.json"]


def test_shard_outputs_must_go_to_a_directory_outside_the_inputs(tmp_path: Path, env: dict[str, str]) -> None:
    src = make_shards(tmp_path / "in")
    for output, needle in (("-", "needs -o OUT_DIR"), (str(src / "out"), "inside the input shards")):
        proc = privtext(env, "perturb", str(src), "-o", output, "--epsilon", "300", *VOCAB, check=False)
        assert proc.returncode == 2 and needle in proc.stderr.decode()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = privtext(env, "perturb", str(empty), "-o", str(tmp_path / "o"), "--epsilon", "300", *VOCAB, check=False)
    assert proc.returncode == 2 and "no input shards found" in proc.stderr.decode()


def test_parquet_shards_split_by_max_rows_per_file(tmp_path: Path, env: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    (src / "p").mkdir(parents=True)
    for k in range(2):
        table = pa.table({"id": list(range(2500)), "text": [f"the market fell {i + k} times" for i in range(2500)]})
        pq.write_table(table, src / "p" / f"s{k}.parquet", row_group_size=1000, compression="gzip")
    out, report = tmp_path / "out", tmp_path / "r.json"
    privtext(env, "perturb", str(src), "-o", str(out), "--max-rows-per-file", "700", "--epsilon", "300",
             "--report", str(report), "-q", *VOCAB)
    for k in range(2):
        parts = sorted((out / "p").glob(f"s{k}-*.parquet"))
        assert [p.name for p in parts] == [f"s{k}-0000{i}.parquet" for i in range(4)]
        rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
        assert rows == [700, 700, 700, 400]
        assert pq.ParquetFile(parts[1]).metadata.row_group(0).column(1).compression == "GZIP"
        ids = [i for p in parts for i in pq.read_table(p).column("id").to_pylist()]
        assert ids == list(range(2500))
    assert json.loads(report.read_text())["counts"]["records"] == 5000
    stdout = privtext(env, "perturb", str(src / "p" / "s0.parquet"), "--max-rows-per-file", "5",
                      "--epsilon", "300", *VOCAB, check=False)
    assert stdout.returncode == 2 and "--max-rows-per-file" in stdout.stderr.decode()
