"""Spark and Ray Data in local mode: same counts as the local path, reproducible with a seed and fixed
partitioning, keyed streams, index shipping, one merged report. Marked `engine` (CI always runs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from privtext.api import Anonymizer
from privtext.counters import Counters
from privtext.errors import IndexCacheError, InputTypeError, UsageError

pytestmark = pytest.mark.engine

WORDS = ["government", "president", "company", "police", "team", "city", "market", "report"]
TEXTS = [None if i % 9 == 4 else
         f"The {WORDS[i % 8]} said the {WORDS[(i * 3) % 8]} was new, and it fell {i} times. Zqxv!"
         for i in range(240)]
TABLE = pa.table({"id": pa.array(range(len(TEXTS)), pa.int64()), "text": TEXTS,
                  "tag": [f"t{i % 5}" for i in range(len(TEXTS))]})
# Everything but `unchanged` is fixed by the data alone (tokens, OOV, nulls, the histogram).
DATA_COUNTS = ("records", "word_tokens", "other_tokens", "perturbed", "oov", "null_values", "doc_hist")


def _need(engine: str) -> None:
    """Skip when an engine (or Spark's Java) is missing on a developer machine; in CI
    (PRIVTEXT_REQUIRE_ENGINES=1, set by .ci/run) that is a failure instead."""
    module = "pyspark" if engine == "spark" else "ray"
    missing = importlib.util.find_spec(module) is None
    reason = f"{module} is not installed (pip install 'privtext[{engine}]')"
    if engine == "spark" and not missing and shutil.which("java") is None:
        missing, reason = True, "no Java runtime for Spark (apt-get install default-jre-headless)"
    if missing:
        if os.environ.get("PRIVTEXT_REQUIRE_ENGINES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _local_counts(glove_small) -> dict:  # type: ignore[no-untyped-def, type-arg]
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small)
    anon.perturb(TEXTS)
    return {k: v for k, v in anon.counters.to_dict().items() if k in DATA_COUNTS}


def _report_counts(report: dict) -> dict:  # type: ignore[type-arg]
    c = report["counts"]
    hist = report["per_document"]
    return {"records": c["records"], "word_tokens": c["word_tokens"], "other_tokens": c["other_tokens"],
            "perturbed": c["perturbed"], "oov": c["oov"]["count"], "null_values": c["null_values"],
            "documents": hist["documents"]}


def _expected_report_counts(local: dict) -> dict:  # type: ignore[type-arg]
    return {**{k: local[k] for k in DATA_COUNTS if k != "doc_hist"}, "documents": sum(local["doc_hist"])}


# --- Spark ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spark():  # type: ignore[no-untyped-def]
    _need("spark")
    from privtext.engines.spark import session

    s = session(cores=2, app_name="privtext-tests")
    yield s
    s.stop()


def _spark_rows(df) -> list[tuple]:  # type: ignore[no-untyped-def, type-arg]
    return [tuple(r) for r in df.orderBy("id").collect()]


def test_spark_counts_match_the_local_path_and_report_states_the_engine(spark, glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.spark import perturb_dataframe

    df = spark.createDataFrame(TABLE.to_pandas()).repartition(3)
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=11)
    out, report = perturb_dataframe(df, "text", anon)
    assert _report_counts(report) == _expected_report_counts(_local_counts(glove_small))
    engine = report["engine"]
    assert engine["name"] == "spark" and engine["partitions"] == 3
    assert "partition id" in engine["streams"] and report["randomness"]["mode"] == "seeded"
    rows = _spark_rows(out)
    assert [r[0] for r in rows] == list(range(len(TEXTS)))
    assert [r[2] for r in rows] == TABLE.column("tag").to_pylist()  # other columns untouched
    assert all((r[1] is None) == (t is None) for r, t in zip(rows, TEXTS))
    assert sum(r[1] != t for r, t in zip(rows, TEXTS) if t) > 100  # the text really changed
    assert "Zqxv" not in json.dumps(report) and "president" not in json.dumps(report)
    out.unpersist()


def test_spark_is_reproducible_with_a_seed_and_fixed_partitioning(spark, glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.spark import perturb_dataframe

    df = spark.createDataFrame(TABLE.to_pandas()).repartition(2)
    runs = []
    for seed in (5, 5, 6):
        out, _ = perturb_dataframe(df, "text", Anonymizer("gumbel", epsilon=300, index=glove_small, seed=seed))
        runs.append(_spark_rows(out))
        out.unpersist()
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_spark_batch_is_the_library_stream_and_shipping_gives_the_same_output(spark, glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.spark import perturb_dataframe

    df = spark.createDataFrame(TABLE.to_pandas()).coalesce(1)  # one partition, one Arrow batch
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=21)
    out, _ = perturb_dataframe(df, "text", anon)
    shipped, _ = perturb_dataframe(df, "text", anon, ship_index=True)
    expected = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=21).perturb(TEXTS, stream=(0, 0))
    assert [r[1] for r in _spark_rows(out)] == expected
    assert _spark_rows(shipped) == _spark_rows(out)
    out.unpersist()
    shipped.unpersist()


def test_spark_refuses_a_missing_or_non_text_column(spark, glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.spark import perturb_dataframe

    df = spark.createDataFrame(TABLE.to_pandas())
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small)
    with pytest.raises(UsageError, match="pass column= with one of: id, text, tag"):
        perturb_dataframe(df, "body", anon)
    with pytest.raises(InputTypeError, match="not string"):
        perturb_dataframe(df, "id", anon)


def _moved_cache_anonymizer(glove_small, tmp_path: Path) -> Anonymizer:  # type: ignore[no-untyped-def]
    """An Anonymizer whose cache left the driver's path after it was opened (as on an executor
    that has no shared filesystem)."""
    cache = tmp_path / "cache"
    shutil.copytree(glove_small.path, cache)
    anon = Anonymizer("gumbel", epsilon=300, index=cache)
    cache.rename(tmp_path / "gone")
    return anon


def test_spark_executor_without_the_cache_fails_in_one_line_naming_the_fix(spark, glove_small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.spark import perturb_dataframe

    df = spark.createDataFrame(TABLE.to_pandas()).coalesce(1)
    with pytest.raises(IndexCacheError, match=r"is not on this machine.*ship_index=True") as info:
        perturb_dataframe(df, "text", _moved_cache_anonymizer(glove_small, tmp_path))
    assert "\n" not in str(info.value)


# --- Ray ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():  # type: ignore[no-untyped-def]
    _need("ray")
    from privtext.engines.ray import init

    ray = init(cores=2)
    yield ray
    ray.shutdown()


def _ray_table(ds) -> pa.Table:  # type: ignore[no-untyped-def]
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def test_ray_counts_match_the_local_path_and_order_is_kept(ray_local, glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.ray import perturb_dataset

    ds = ray_local.data.from_arrow(TABLE).repartition(4)
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=11)
    out, report = perturb_dataset(ds, "text", anon)
    assert _report_counts(report) == _expected_report_counts(_local_counts(glove_small))
    assert report["engine"]["name"] == "ray" and report["engine"]["blocks"] == 4
    assert "block number" in report["engine"]["streams"]
    table = _ray_table(out)
    assert table.column("id").to_pylist() == list(range(len(TEXTS)))
    assert table.column("tag").equals(TABLE.column("tag"))
    texts = table.column("text").to_pylist()
    assert all((a is None) == (t is None) for a, t in zip(texts, TEXTS))
    assert sum(a != t for a, t in zip(texts, TEXTS) if t) > 100


def test_ray_is_reproducible_keyed_by_block_and_shipping_gives_the_same_output(ray_local, glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.ray import perturb_dataset

    ds = ray_local.data.from_arrow(TABLE).repartition(3).materialize()
    outputs = []
    for seed, ship in ((5, False), (5, True), (6, False)):
        out, _ = perturb_dataset(ds, "text", Anonymizer("gumbel", epsilon=300, index=glove_small, seed=seed),
                                 ship_index=ship)
        outputs.append(_ray_table(out))
    assert outputs[0].equals(outputs[1]) and not outputs[0].equals(outputs[2])
    # block b is stream (b, 0) of the library: the same noise as a local call
    first_block = pa.concat_tables(ray_local.get(ds.to_arrow_refs())[:1])
    local = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=5).perturb_arrow(first_block, stream=(0, 0))
    assert outputs[0].column("text").to_pylist()[: first_block.num_rows] == local.column("text").to_pylist()


def test_ray_actor_without_the_cache_fails_in_one_line_naming_the_fix(ray_local, glove_small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from privtext.engines.ray import perturb_dataset

    ds = ray_local.data.from_arrow(TABLE)
    with pytest.raises(IndexCacheError, match=r"is not on this machine.*ship_index=True") as info:
        perturb_dataset(ds, "text", _moved_cache_anonymizer(glove_small, tmp_path))
    assert "\n" not in str(info.value)


# --- the CLI over a directory of shards ------------------------------------------------------------


def _shards(tmp_path: Path) -> tuple[Path, Path]:
    jsonl, parquet = tmp_path / "jsonl", tmp_path / "parquet"
    (jsonl / "part").mkdir(parents=True)
    parquet.mkdir()
    for n, start in enumerate(range(0, len(TEXTS), 80)):
        rows = TABLE.slice(start, 80)
        target = jsonl / ("part" if n else "") / f"shard-{n}.jsonl"
        target.write_text("".join(json.dumps(r) + "\n" for r in rows.to_pylist()))
        pq.write_table(rows, parquet / f"shard-{n}.parquet")
    (jsonl / "_SUCCESS").write_text("")  # engine markers are not shards
    return jsonl, parquet


def _cli(cache_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PRIVTEXT_CACHE": str(cache_root)}
    return subprocess.run([sys.executable, "-m", "privtext", "perturb", *args, "--epsilon", "300",
                           "--vocab-size", "2000", "--workers", "2", "-q"],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("engine", "fmt"), [("spark", "jsonl"), ("ray", "parquet"), ("ray", "jsonl")])
def test_cli_engine_reads_shard_directories_and_counts_like_the_local_path(
        tmp_path: Path, glove_small, cache_root: Path, engine: str, fmt: str) -> None:  # type: ignore[no-untyped-def]
    _need(engine)
    jsonl, parquet = _shards(tmp_path)
    src = jsonl if fmt == "jsonl" else parquet
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    proc = _cli(cache_root, str(src), "-o", str(out), "--engine", engine, "--seed", "9",
                "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert _report_counts(report) == _expected_report_counts(_local_counts(glove_small))
    assert report["engine"]["name"] == engine and report["input"]["shards"] == 3
    assert report["randomness"]["mode"] == "seeded"
    assert "uniform" in report["attack_success"]  # the CLI's risk section, as on the local path
    if fmt == "parquet":
        rows = pq.read_table(out).sort_by("id")
        texts, tags = rows.column("text").to_pylist(), rows.column("tag").to_pylist()
    else:
        records = sorted((json.loads(line) for p in sorted(out.rglob("*.json")) for line in p.read_text().splitlines()),
                         key=lambda r: r["id"])
        texts, tags = [r["text"] for r in records], [r["tag"] for r in records]
    assert len(texts) == len(TEXTS) and all((a is None) == (t is None) for a, t in zip(texts, TEXTS))
    assert tags == TABLE.column("tag").to_pylist()
    assert not any("Zqxv" in t for t in texts if t)  # OOV masked through the engine too
    assert sum(a != t for a, t in zip(texts, TEXTS) if t) > 100
    # the output directory must be new: never written over
    again = _cli(cache_root, str(src), "-o", str(out), "--engine", engine)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_cli_engine_usage_errors_come_before_any_work(tmp_path: Path, cache_root: Path) -> None:
    jsonl, _ = _shards(tmp_path)
    proc = _cli(cache_root, str(jsonl), "-o", str(jsonl / "out"), "--engine", "spark")
    assert proc.returncode == 2 and "inside the input directory" in proc.stderr
    proc = _cli(cache_root, str(jsonl), "-o", str(tmp_path / "o"), "--engine", "ray", "--field", "meta.text")
    assert proc.returncode == 2 and "top-level field" in proc.stderr
    proc = _cli(cache_root, str(tmp_path / "none"), "-o", str(tmp_path / "o"), "--engine", "ray")
    assert proc.returncode == 2 and "input not found" in proc.stderr


def test_merge_keyed_refuses_a_missing_partition() -> None:
    from privtext.engines import merge_keyed

    part = Counters(records=2).to_dict()
    assert merge_keyed({0: part, 1: part}, expected=2).records == 4
    with pytest.raises(UsageError, match="1 of 2 partitions"):
        merge_keyed({0: part}, expected=2)


def test_a_shipped_index_copy_whose_process_is_gone_is_removed(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Ray kills its actors, so an actor's unpacked copy outlives it: the next unpack removes it.
    import tempfile

    from privtext.engines import ray as ray_engine

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f"privtext-index-{dead}-abc"
    alive = tmp_path / f"privtext-index-{os.getppid()}-def"
    for copy in (orphan, alive):
        (copy / "sub").mkdir(parents=True)
        (copy / "sub" / "f").write_bytes(b"x")
    monkeypatch.setattr(ray_engine, "_UNPACKED", {})
    root = Path(ray_engine.unpack_index({"manifest.json": b"{}"}, "digest"))
    assert not orphan.exists() and alive.exists()
    assert root.parent == tmp_path and root.name.startswith(f"privtext-index-{os.getpid()}-")
    assert (root / "manifest.json").read_bytes() == b"{}"
