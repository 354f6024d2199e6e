"""Streaming a corpus through a mechanism: chunking, the worker pool, keyed randomness, ordering.

Records are read in fixed-size chunks with a stable index. Each chunk's randomness is keyed by
(run key, input number, chunk index), so the output is byte-identical for any number of workers.
Workers are started with a forkserver/spawn context (FAISS in a forked child of a parent that
already searched can hang: faiss issue 5206), open the index cache by path with memory mapping,
and run single-threaded. At most a bounded number of chunks is in flight, so memory stays flat and
a pipe is processed as it arrives.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from privtext.errors import InputFormatError, UsageError
from privtext.index import EmbeddingIndex
from privtext.io import AtomicOutput, ParquetSource, infer_format, iter_line_chunks, open_input
from privtext.mechanisms import create
from privtext.mechanisms.base import Mechanism
from privtext.randomness import chunk_rng, run_key
from privtext.text import DEFAULT_MASK_TOKEN, ChunkCounters, OovPolicy, TextPerturber

ON_ERROR = ("fail", "skip", "keep")
DEFAULT_CHUNK_SIZE = 1000


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class PerturbSettings:
    mechanism: str
    epsilon: float
    params: dict[str, Any] = dc_field(default_factory=dict)
    field: str = "text"
    oov: str = OovPolicy.MASK.value
    mask_token: str = DEFAULT_MASK_TOKEN
    on_error: str = "fail"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int = dc_field(default_factory=default_workers)
    seed: str | None = None

    def validate(self) -> None:
        if self.on_error not in ON_ERROR:
            raise UsageError(f"--on-error must be one of {', '.join(ON_ERROR)}")
        if self.oov not in {p.value for p in OovPolicy}:
            raise UsageError("--oov must be one of mask, drop, keep")
        if self.chunk_size < 1:
            raise UsageError("--chunk-size must be at least 1")
        if self.workers < 1:
            raise UsageError("--workers must be at least 1")
        if not self.field or any(not part for part in self.field.split(".")):
            raise UsageError("--field must be a field name or a dotted path such as meta.text")


@dataclass(frozen=True)
class ChunkTask:
    input_id: int
    chunk_index: int
    first_line: int  # 1-based line number of the chunk's first record (0 for Parquet)
    fmt: str
    payload: list[Any]  # raw lines (bytes) for jsonl/text, column values for Parquet


@dataclass
class ChunkResult:
    chunk_index: int
    payload: Any  # bytes for jsonl/text, list[str | None] for Parquet
    counters: ChunkCounters
    error: tuple[int, str] | None = None  # (line number, reason) when --on-error fail stops


class ChunkProcessor:
    """Turns one chunk into its output. One instance per process (parent or worker)."""

    def __init__(self, index: EmbeddingIndex, mechanism: Mechanism, settings: PerturbSettings, key: int):
        self.settings = settings
        self.key = key
        self.perturber = TextPerturber(index, mechanism, settings.oov, settings.mask_token)
        self.path = settings.field.split(".")

    def process(self, task: ChunkTask) -> ChunkResult:
        rng = chunk_rng(self.key, task.input_id, task.chunk_index)
        if task.fmt == "parquet":
            return self._values(task, rng)
        return self._lines(task, rng)

    def _values(self, task: ChunkTask, rng: Any) -> ChunkResult:
        values: list[str | None] = task.payload
        slots = [i for i, v in enumerate(values) if v is not None]
        texts, counters = self.perturber.perturb_texts([values[i] for i in slots], rng)
        out = list(values)
        for i, text in zip(slots, texts):
            out[i] = text
        counters.null_values = len(values) - len(slots)
        return ChunkResult(task.chunk_index, out, counters)

    def _lines(self, task: ChunkTask, rng: Any) -> ChunkResult:
        out: list[bytes] = list(task.payload)
        texts: list[str] = []
        slots: list[tuple[int, Any, bytes]] = []  # (position, parsed record, line ending)
        skipped = kept = 0
        for pos, raw in enumerate(task.payload):
            body = raw.rstrip(b"\r\n")
            ending = raw[len(body):]
            if task.fmt == "jsonl" and not body.strip():
                continue  # blank lines pass through; they hold no record
            record, text, reason = self._parse(task.fmt, body)
            if reason is not None:
                policy = self.settings.on_error
                if policy == "fail":
                    return ChunkResult(task.chunk_index, b"", ChunkCounters(),
                                       error=(task.first_line + pos, reason))
                if policy == "skip":
                    out[pos] = b""
                    skipped += 1
                else:
                    kept += 1
                continue
            texts.append(text)  # type: ignore[arg-type]
            slots.append((pos, record, ending))
        new_texts, counters = self.perturber.perturb_texts(texts, rng)
        for (pos, record, ending), new_text in zip(slots, new_texts):
            if task.fmt == "jsonl":
                container = record
                for part in self.path[:-1]:
                    container = container[part]
                container[self.path[-1]] = new_text
                out[pos] = json.dumps(record, ensure_ascii=False).encode("utf-8") + ending
            else:
                out[pos] = new_text.encode("utf-8") + ending
        counters.errors_skipped, counters.errors_kept = skipped, kept
        return ChunkResult(task.chunk_index, b"".join(out), counters)

    def _parse(self, fmt: str, body: bytes) -> tuple[Any, str | None, str | None]:
        """(record, text, error reason). Reasons name positions and fields, never content."""
        if fmt == "text":
            try:
                return None, body.decode("utf-8"), None
            except UnicodeDecodeError:
                return None, None, "not valid UTF-8"
        try:
            record = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None, None, "not valid JSON"
        container = record
        for part in self.path[:-1]:
            if not isinstance(container, dict) or not isinstance(container.get(part), dict):
                return None, None, f"field {self.settings.field!r} is missing"
            container = container[part]
        if not isinstance(container, dict) or self.path[-1] not in container:
            return None, None, f"field {self.settings.field!r} is missing"
        value = container[self.path[-1]]
        if not isinstance(value, str):
            return None, None, f"field {self.settings.field!r} is not a string"
        return record, value, None


# --- worker processes -----------------------------------------------------------------------

_WORKER: ChunkProcessor | None = None


def _single_threaded_faiss() -> Callable[[], None]:
    """One FAISS thread per process: `--workers` is the parallelism. FAISS's OpenMP threads
    spin-wait, and on a busy machine two of them ran a flat search 3x slower than one (measured:
    1.7k vs 5.7k queries/s). Returns a function restoring the previous setting."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    return lambda: faiss.omp_set_num_threads(previous)


_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _single_threaded_blas_env() -> dict[str, str | None]:
    """Workers start from a fresh interpreter (forkserver/spawn) and size their BLAS thread pool
    from the environment at import: one thread each, since the workers are the parallelism
    (santext end to end went from 19k to 33.5k words/s). Returns what to restore."""
    saved = {name: os.environ.get(name) for name in _BLAS_THREAD_VARS}
    for name in _BLAS_THREAD_VARS:
        os.environ[name] = "1"
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _init_worker(index_path: str, settings: PerturbSettings, key: int) -> None:
    _single_threaded_faiss()
    global _WORKER
    index = EmbeddingIndex(Path(index_path))
    mechanism = create(settings.mechanism, index, settings.epsilon, settings.params)
    _WORKER = ChunkProcessor(index, mechanism, settings, key)


def _process_in_worker(task: ChunkTask) -> ChunkResult:
    assert _WORKER is not None, "worker initializer did not run"
    return _WORKER.process(task)


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver where available, else spawn. The fork server is started with SIGINT ignored, so
    it and every worker forked from it ignore Ctrl-C: the parent alone handles it (and stops the
    workers), instead of each child dying mid-start-up with its own traceback."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return multiprocessing.get_context("forkserver")


def _stop_workers(executor: ProcessPoolExecutor, interrupted: bool) -> None:
    if not interrupted:
        executor.shutdown(wait=True, cancel_futures=True)
        return
    # On an error or Ctrl-C, do not wait for chunks in flight: stop the workers now. The
    # executor has no public way to do that, hence its process table.
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


class _Done:
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _parallel_ordered(tasks: Iterator[ChunkTask], executor: ProcessPoolExecutor,
                      max_in_flight: int) -> Iterator[ChunkResult]:
    """Results in chunk order. A feeder thread reads and submits, so reading input (which may
    block on a pipe) never delays writing a finished chunk."""
    pending: queue.Queue[Future[ChunkResult] | _Done | _Failed] = queue.Queue(maxsize=max_in_flight)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                pending.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def feed() -> None:
        try:
            for task in tasks:
                if stop.is_set():
                    return
                put(executor.submit(_process_in_worker, task))
            put(_Done())
        except BaseException as exc:  # surfaced in the consuming thread
            put(_Failed(exc))

    feeder = threading.Thread(target=feed, name="privtext-reader", daemon=True)
    feeder.start()
    try:
        while True:
            item = pending.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item.result()
    finally:
        stop.set()


# --- the driver -----------------------------------------------------------------------------


@dataclass
class PerturbOutcome:
    counters: ChunkCounters
    seconds: float
    mechanism: Mechanism
    fmt: str
    inputs: int
    settings: PerturbSettings


def _line_tasks(path: str, fmt: str, input_id: int, chunk_size: int) -> Iterator[ChunkTask]:
    stream = open_input(path)
    try:
        line = 1
        for index, chunk in enumerate(iter_line_chunks(stream, chunk_size)):
            yield ChunkTask(input_id, index, line, fmt, chunk)
            line += len(chunk)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _parquet_tasks(source: ParquetSource, field_name: str, input_id: int,
                   chunk_size: int, batches_out: list[Any]) -> Iterator[ChunkTask]:
    for index, batch in enumerate(source.batches(chunk_size)):
        batches_out.append(batch)  # the parent keeps the batch to rebuild it around the new column
        yield ChunkTask(input_id, index, 0, "parquet", batch.column(field_name).to_pylist())


def _check_parquet_field(source: ParquetSource, field_name: str) -> None:
    import pyarrow as pa

    if "." in field_name or field_name not in source.schema.names:
        raise UsageError(
            f"field {field_name!r} is not a top-level column of the Parquet input; "
            f"pass --field with one of: {', '.join(source.schema.names)}"
        )
    col_type = source.schema.field(field_name).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise UsageError(f"column {field_name!r} has type {col_type}, not string; pass --field with a text column")


def run_perturb(
    inputs: list[str],
    output: str,
    settings: PerturbSettings,
    index: EmbeddingIndex,
    fmt: str | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[ChunkCounters], None] | None = None,
) -> PerturbOutcome:
    """Perturb `inputs` (paths or '-') into `output`; returns counters for the report.

    On any error the output file is not created (stdout may have received earlier chunks).
    """
    from tqdm import tqdm

    settings.validate()
    fmts = {infer_format(p, fmt) for p in inputs}
    if len(fmts) != 1:
        raise UsageError("all inputs must have the same format; pass --format or convert them")
    fmt = fmts.pop()
    for path in inputs:
        if path != "-" and not os.path.isfile(path):
            raise UsageError(f"input file not found: {path}; check the path or use - for stdin")
    mechanism = create(settings.mechanism, index, settings.epsilon, settings.params)
    mechanism.prepare()
    key = run_key(settings.seed)
    counters = ChunkCounters()
    start = time.perf_counter()

    executor: ProcessPoolExecutor | None = None
    local: ChunkProcessor | None = None
    restore_threads = _single_threaded_faiss()
    saved_env = _single_threaded_blas_env() if settings.workers > 1 else {}
    if settings.workers > 1:
        executor = ProcessPoolExecutor(
            max_workers=settings.workers,
            mp_context=_mp_context(),
            initializer=_init_worker,
            initargs=(str(index.path), settings, key),
        )
    else:
        local = ChunkProcessor(index, mechanism, settings, key)

    def results(tasks: Iterator[ChunkTask]) -> Iterator[ChunkResult]:
        if executor is None:
            return (local.process(t) for t in tasks)  # type: ignore[union-attr]
        return _parallel_ordered(tasks, executor, max_in_flight=2 * settings.workers)

    bar = tqdm(desc="perturb", unit=" rec", disable=True if progress is False else None, file=sys.stderr)
    completed = False
    try:
        with AtomicOutput(output) as sink:
            writer = None
            for input_id, path in enumerate(inputs):
                if fmt == "parquet":
                    source = ParquetSource.open(path)
                    _check_parquet_field(source, settings.field)
                    if writer is None:
                        writer = _ParquetSink(sink.stream, source.schema)  # type: ignore[arg-type]
                    elif not source.schema.equals(writer.schema):
                        raise UsageError("Parquet inputs have different schemas; perturb them separately")
                    batches: list[Any] = []
                    tasks = _parquet_tasks(source, settings.field, input_id, settings.chunk_size, batches)
                else:
                    tasks = _line_tasks(path, fmt, input_id, settings.chunk_size)
                for result in results(tasks):
                    if result.error is not None:
                        line, reason = result.error
                        raise InputFormatError(
                            f"input {input_id + 1}, line {line}: {reason}; fix the record, or pass "
                            "--on-error skip (drop it) or --on-error keep (copy it unchanged)"
                        )
                    if fmt == "parquet":
                        writer.write(batches.pop(0), settings.field, result.payload)  # type: ignore[union-attr]
                    else:
                        sink.stream.write(result.payload)  # type: ignore[union-attr]
                        if output == "-":
                            sink.stream.flush()  # type: ignore[union-attr]
                    counters.merge(result.counters)
                    if on_chunk is not None:
                        on_chunk(result.counters)
                    bar.update(result.counters.records)
                    bar.set_postfix(words=counters.word_tokens, refresh=False)
            if writer is not None:
                writer.close()
        completed = True
    finally:
        bar.close()
        if executor is not None:
            _stop_workers(executor, interrupted=not completed)
        restore_threads()
        _restore_env(saved_env)
    return PerturbOutcome(counters, time.perf_counter() - start, mechanism, fmt, len(inputs), settings)


class _ParquetSink:
    """Writes batches with the perturbed column swapped in; schema and metadata unchanged."""

    def __init__(self, stream: Any, schema: Any):
        import pyarrow.parquet as pq

        self.schema = schema
        self._writer = pq.ParquetWriter(stream, schema)

    def write(self, batch: Any, field_name: str, values: list[str | None]) -> None:
        import pyarrow as pa

        position = batch.schema.get_field_index(field_name)
        column = pa.array(values, type=batch.schema.field(position).type)
        arrays = [column if i == position else batch.column(i) for i in range(batch.num_columns)]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self._writer.close()
