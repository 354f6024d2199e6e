"""privtext on Apache Spark: `perturb_dataframe(df, column, anonymizer) -> (out_df, report)`.

Each task runs `mapInArrow` over one partition: it restores the Anonymizer (by index path and
manifest digest), limits FAISS/BLAS to one thread, and perturbs Arrow batch n of partition p with
``stream=(p, n)``. Batches are cut by ``spark.sql.execution.arrow.maxRecordsPerBatch``, so with a
seed, the same partitioning and the same batch size, output is identical run after run.

Counters travel back through an accumulator holding {partition id: counters}: a task retried or a
cached partition recomputed writes the same entry again instead of adding it twice. The output is
persisted (memory and disk) and counted once, so the report is complete when this function returns
and writing `out_df` afterwards reads the persisted rows instead of perturbing them again. Call
``out_df.unpersist()`` when done.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtext.engines import executor_errors, merge_keyed, require
from privtext.errors import InputTypeError, UsageError

if TYPE_CHECKING:
    from privtext.api import Anonymizer

STREAMS = "(Spark partition id, Arrow batch number within the partition)"


def _keyed_param() -> Any:
    from pyspark.accumulators import AccumulatorParam

    class KeyedCounters(AccumulatorParam):  # type: ignore[misc]
        """A dict {partition id: counters dict}; merging keeps one entry per partition."""

        def zero(self, value: dict[int, Any]) -> dict[int, Any]:
            return {}

        def addInPlace(self, a: dict[int, Any], b: dict[int, Any]) -> dict[int, Any]:
            a.update(b)
            return a

    return KeyedCounters()


def _perturb_partitions(state: dict[str, Any], column: str, shipped: str | None, acc: Any) -> Any:
    def run(batches: Any) -> Any:
        from pyspark import SparkFiles, TaskContext

        from privtext.api import restore
        from privtext.threads import limit_threads

        limit_threads(1)  # the executor's cores are Spark's tasks, not FAISS's threads
        partition = TaskContext.get().partitionId()
        anon = restore(state, SparkFiles.get(shipped) if shipped else None)
        for number, batch in enumerate(batches):
            yield anon.perturb_arrow(batch, column, stream=(partition, number))
        acc.add({partition: anon.counters.to_dict()})

    return run


def session(address: str | None = None, cores: int = 2, app_name: str = "privtext") -> Any:
    """A SparkSession: local mode on `cores` cores, or the cluster at `address` (spark://...).

    In local mode the Python workers run this interpreter (where privtext is installed), not
    whatever `python3` is first on PATH."""
    require("pyspark", "spark")
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.appName(app_name).config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    if address:
        builder = builder.master(address)
    else:
        # PySpark picks its worker interpreter from PYSPARK_PYTHON when the context starts
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (builder.master(f"local[{cores}]")
                   .config("spark.pyspark.python", sys.executable)
                   .config("spark.pyspark.driver.python", sys.executable))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def perturb_dataframe(df: Any, column: str = "text", anonymizer: Anonymizer | None = None, *,
                      ship_index: bool = False) -> tuple[Any, dict[str, Any]]:
    """Perturb `column` of a Spark DataFrame; returns (persisted output DataFrame, epsilon report).

    ship_index=False: every executor reads the index cache at the driver's path (a shared
    filesystem, or the same path prepared on every node). ship_index=True: the cache directory is
    sent with ``SparkContext.addFile(path, recursive=True)`` and opened from the executor's copy.
    """
    require("pyspark", "spark")
    from pyspark import StorageLevel
    from pyspark.sql.types import StringType

    if anonymizer is None:
        raise UsageError("perturb_dataframe needs anonymizer=privtext.Anonymizer(...)")
    if column not in df.columns:
        raise UsageError(f"column {column!r} is not in the DataFrame; pass column= with one of: "
                         f"{', '.join(df.columns)}")
    if not isinstance(df.schema[column].dataType, StringType):
        raise InputTypeError(f"column {column!r} has type {df.schema[column].dataType.simpleString()}, "
                             "not string; pass column= with a text column")
    spark = df.sparkSession
    sc = spark.sparkContext
    shipped = None
    if ship_index:
        sc.addFile(anonymizer.spec.index_path, recursive=True)
        shipped = Path(anonymizer.spec.index_path).name
    acc = sc.accumulator({}, _keyed_param())
    start = time.perf_counter()
    out = df.mapInArrow(_perturb_partitions(anonymizer.state(), column, shipped, acc), df.schema)
    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    with executor_errors():
        out.count()  # runs the job once; later actions read the persisted rows
    seconds = time.perf_counter() - start
    partitions = out.rdd.getNumPartitions()
    counters = merge_keyed(acc.value, expected=partitions)
    run_info = {
        "seconds": seconds,
        "keyed_by": f"run key, stream {STREAMS}",
        "engine": {
            "name": "spark",
            "version": spark.version,
            "master": sc.master,
            "partitions": partitions,
            "max_records_per_batch": int(spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")),
            "streams": STREAMS,
            "index": "shipped with SparkContext.addFile" if ship_index else "shared path",
            "counters": "accumulator keyed by partition id, merged on the driver",
        },
        "input": {"column": column, "partitions": partitions},
    }
    from privtext.report import build_report

    return out, build_report(anonymizer.spec, counters, run_info)
