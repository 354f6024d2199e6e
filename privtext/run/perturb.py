"""A perturb run: validate everything, then stream chunks through the executor into a safe output.

    plan = plan_run(inputs, output, settings, report=..., resume=...)   # no index, no record read
    outcome = execute(plan, index)                                      # the work

Everything a user can get wrong (formats, paths, an output or report that is an input, an output
extension naming another format, unwritable directories, a resume that cannot work) fails in
`plan_run`, before the index is built or a record is read. `execute` writes a regular-file output
through a partial file and a journal (`--resume` continues a killed run), and publishes it with an
atomic rename only when every chunk succeeded; a stream output (stdout, FIFO, device) is written as
it goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from privtext.codecs import (
    STDIO,
    LineChunk,
    format_of_name,
    infer_format,
    iter_line_chunks,
    open_input,
    skip_bytes,
    split_compression,
)
from privtext.codecs.parquet import (
    ParquetSink,
    ParquetSource,
    column_values,
    rebuild,
    segment_groups,
)
from privtext.errors import InputFormatError, ResumeError, UsageError
from privtext.index import EmbeddingIndex
from privtext.mechanisms.base import Mechanism
from privtext.randomness import seed_commitment
from privtext.run.chunks import ChunkProcessor, ChunkTask, build_processor
from privtext.run.executor import ChunkExecutor, signals_held
from privtext.run.journal import Journal, WorkPaths, counters_to_dict, input_identity
from privtext.run.outputs import (
    AtomicFile,
    OutputKind,
    OutputTarget,
    StreamOutput,
    refuse_inputs,
    remove_stale_temporaries,
    resolve_output,
)
from privtext.settings import CHUNK_BYTES, Format, PerturbSettings
from privtext.text import ChunkCounters
from privtext.threads import limit_threads

Notify = Callable[[str], None]


@dataclass
class RunPlan:
    inputs: list[str]
    fmt: Format
    target: OutputTarget
    compression: str | None  # of the output (line formats)
    settings: PerturbSettings
    resume: bool
    report: OutputTarget | None = None
    input_base: int = 0  # shards: the randomness of input i is keyed as input input_base + i


@dataclass
class PerturbOutcome:
    counters: ChunkCounters
    seconds: float
    mechanism: Mechanism
    fmt: str
    inputs: int
    settings: PerturbSettings
    workers: int = 1
    resumed: dict[str, Any] | None = None  # {"times", "chunks_reused", "records_reused", "seeded"}
    notes: list[str] = field(default_factory=list)
    shards: list[dict[str, Any]] | None = None  # sharded runs: per-shard counts


class RunSession:
    """What several plans of one run share (shards): the mechanism, the run key, the workers."""

    def __init__(self, index: EmbeddingIndex, settings: PerturbSettings, workers: int | None = None):
        self.index = index
        self.settings = settings
        from privtext.api import Anonymizer

        # The library's front door does the work: it creates the mechanism and prepares its
        # derived files here, once, before any worker reads them; workers get it pickled.
        self.anonymizer = Anonymizer(settings.mechanism, epsilon=settings.epsilon,
                                     params=settings.params, oov=settings.oov.value,
                                     mask_token=settings.mask_token, seed=settings.seed, index=index)
        self.mechanism = self.anonymizer.mechanism
        self.workers = workers or settings.effective_workers()
        local = ChunkProcessor(self.anonymizer, settings) if self.workers == 1 else None
        self.executor = ChunkExecutor(partial(build_processor, self.anonymizer.state(), settings),
                                      self.workers, local)

    def close(self, interrupted: bool = False) -> None:
        self.executor.close(interrupted=interrupted)


def plan_run(inputs: list[str], output: str, settings: PerturbSettings, *,
             report: str | None = None, resume: bool = False) -> RunPlan:
    """Every check that needs neither the index nor a record."""
    inputs = list(inputs) or [STDIO]
    if inputs.count(STDIO) > 1 or (STDIO in inputs and len(inputs) > 1):
        raise UsageError("stdin (-) can only be the single input")
    fmts = {infer_format(p, settings.format) for p in inputs}
    if len(fmts) != 1:
        raise UsageError("all inputs must have the same format; pass --format or convert them")
    fmt = fmts.pop()
    for path in inputs:
        if path == STDIO:
            continue
        if not os.path.isfile(path):
            if os.path.isdir(path):
                raise UsageError(f"input {path} is a directory; pass the files in it "
                                 f"(for example {path}/*.jsonl)")
            raise UsageError(f"input file not found: {path}; check the path or use - for stdin")
        if not os.access(path, os.R_OK):
            raise UsageError(f"input file {path} is not readable; check its permissions")
        if fmt is Format.PARQUET and split_compression(path)[1]:
            raise UsageError(f"{path}: Parquet compresses inside the file; pass it uncompressed")
    target = resolve_output(output)
    refuse_inputs(target, inputs)
    compression = None
    if target.kind is not OutputKind.STDOUT:
        named = format_of_name(output)
        if named is not None and named is not fmt and settings.format is None:
            raise UsageError(f"output {output} names the {named.value} format but {fmt.value} is being "
                             f"written; name it .{fmt.value if fmt is not Format.TEXT else 'txt'} "
                             f"or pass --format {fmt.value} to write it anyway")
        compression = split_compression(output)[1]
        if compression and fmt is Format.PARQUET:
            raise UsageError(f"output {output}: Parquet compresses inside the file; drop the "
                             f"{compression} extension")
    if settings.max_rows_per_file is not None:
        if fmt is not Format.PARQUET or target.kind is not OutputKind.FILE:
            raise UsageError("--max-rows-per-file splits Parquet written to files; the output here "
                             "is not a Parquet file")
        assert target.path is not None
        for src in inputs:
            for n in range(2):  # the split names must not be inputs either
                refuse_inputs(resolve_output(str(split_name(target.path, n))), [src])
    report_target = None
    if report is not None:
        report_target = resolve_output(report, "report")
        refuse_inputs(report_target, inputs, "report")
        if report_target.path is not None and report_target.path == target.path:
            raise UsageError("--report and -o name the same file; choose two paths")
    if resume:
        if not target.resumable:
            raise UsageError("--resume needs -o naming a regular file (stdout, pipes and devices "
                             "cannot be resumed)")
        if STDIO in inputs:
            raise UsageError("--resume needs input files, not stdin")
    if fmt is Format.PARQUET:
        for path in inputs:
            ParquetSource.open(path).check_field(settings.field)
    return RunPlan(inputs, fmt, target, compression, settings, resume, report_target)


def single_chunk(plan: RunPlan) -> bool:
    """True when the whole input is one chunk: then one process does it, with no pool to start."""
    if len(plan.inputs) != 1 or plan.inputs[0] == STDIO:
        return False
    path = plan.inputs[0]
    if plan.fmt is Format.PARQUET:
        meta = ParquetSource.open(path).metadata
        return meta.num_row_groups <= 1 and meta.num_rows <= plan.settings.chunk_size
    if split_compression(path)[1] or os.path.getsize(path) > CHUNK_BYTES:
        return False
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    return lines <= plan.settings.chunk_size


def _journal_header(plan: RunPlan, index: EmbeddingIndex) -> dict[str, Any]:
    identity = {k: v for k, v in index.identity().items() if k != "cache"}
    return {
        "format": plan.fmt.value,
        "output": {"compression": plan.compression},
        "inputs": [input_identity(p) for p in plan.inputs],
        "contract": plan.settings.output_contract(),
        "index": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        "seed_sha256": seed_commitment(plan.settings.seed),
    }


@dataclass
class _Resume:
    """Where each input starts again."""

    done_inputs: set[int] = field(default_factory=set)
    next_chunk: dict[int, int] = field(default_factory=dict)
    in_offset: dict[int, int] = field(default_factory=dict)
    next_line: dict[int, int] = field(default_factory=dict)
    next_group: dict[int, int] = field(default_factory=dict)
    out_bytes: int = 0
    segments: list[str] = field(default_factory=list)

    @classmethod
    def from_entries(cls, entries: list[dict[str, Any]]) -> _Resume:
        state = cls()
        for e in entries:
            i = int(e["i"])
            if e.get("done"):
                state.done_inputs.add(i)
            else:
                state.next_chunk[i] = int(e["c"]) + 1
                if "g" in e:
                    state.next_group[i] = int(e["g"]) + 1
                    state.segments.append(e["seg"])
                else:
                    state.in_offset[i] = int(e["in"])
                    state.next_line[i] = int(e["line"])
            if "out" in e:
                state.out_bytes = int(e["out"])
        return state


def execute(plan: RunPlan, index: EmbeddingIndex, *, progress: bool | None = None,
            on_chunk: Callable[[ChunkCounters], None] | None = None,
            notify: Notify | None = None, session: RunSession | None = None) -> PerturbOutcome:
    """Runs a validated plan. On any error or interruption nothing is published (a stream output
    may have received earlier chunks); with --resume the partial work is kept to continue.
    A shared `session` (shards) is left open on success; the caller closes it."""
    settings = plan.settings
    say = notify or (lambda _msg: None)
    start = time.perf_counter()
    own = session is None
    if session is None:
        session = RunSession(index, settings, 1 if single_chunk(plan) else None)
    mechanism, executor, workers = session.mechanism, session.executor, session.workers

    journal: Journal | None = None
    work: WorkPaths | None = None
    resume_state = _Resume()
    resumed: dict[str, Any] | None = None
    counters = ChunkCounters()
    bar: Any = _NoProgressBar()
    completed = False
    sink: AtomicFile | StreamOutput | None = None
    try:
        executor.start()  # workers boot while the output and the inputs are opened
        if progress or (progress is None and sys.stderr.isatty()):
            from tqdm import tqdm  # after the workers' start: ~25 ms of imports a quiet run skips

            bar = tqdm(desc="perturb", unit=" rec", disable=None, file=sys.stderr)
        with signals_held():  # the work files exist only once `work` says they are ours
            if plan.target.kind is OutputKind.FILE:
                assert plan.target.path is not None
                remove_stale_temporaries(plan.target.path)
                paths = WorkPaths.for_target(plan.target.path)
                header = _journal_header(plan, index)
                if plan.resume and paths.journal.exists():
                    journal = Journal.reopen(paths.journal, header)
                    work = paths  # ours only once its journal is locked
                    resume_state = _Resume.from_entries(journal.entries)
                    counters = journal.total_counters()
                    resumed = {"times": journal.resumes, "chunks_reused": len(journal.entries),
                               "records_reused": counters.records, "seeded": settings.seed is not None}
                    say(f"resuming: {counters.records} records from {len(journal.entries)} committed "
                        "pieces are kept" + ("" if settings.seed is not None else
                                             "; the rest gets fresh randomness (no --seed)"))
                else:
                    if plan.resume:
                        say("nothing to resume for this output; starting from the beginning")
                    stale = paths.exist()
                    journal = Journal.create(paths.journal, header)  # locks: a live run is never disturbed
                    work = paths
                    with contextlib.suppress(FileNotFoundError):
                        work.part.unlink()
                    shutil.rmtree(work.segments, ignore_errors=True)
                    if stale:
                        say("removed the unfinished work of an earlier run (pass --resume to continue "
                            "such a run instead)")
        with contextlib.ExitStack() as stack:
            if workers == 1:
                stack.callback(limit_threads(1))  # this process runs the chunks: one thread

            def account(result_counters: ChunkCounters) -> None:
                counters.merge(result_counters)
                if on_chunk is not None:
                    on_chunk(result_counters)
                bar.update(result_counters.records)
                bar.set_postfix(words=counters.word_tokens, refresh=False)

            if plan.target.kind is not OutputKind.FILE:
                sink = StreamOutput(plan.target)
            elif plan.fmt is not Format.PARQUET:
                sink = _open_part(plan, work, resume_state)
            if plan.fmt is Format.PARQUET:
                sink = _run_parquet(plan, executor, journal, work, resume_state, account, sink)
            else:
                assert sink is not None
                _run_lines(plan, executor, journal, resume_state, account, sink)
            if counters.records == 0 and (counters.errors_skipped + counters.errors_kept) > 0:
                raise InputFormatError(
                    f"no record holds a readable string field {settings.field!r} "
                    f"({counters.errors_skipped + counters.errors_kept} records were unreadable); "
                    "check --field; nothing was written")
            if own:
                executor.close()
            with signals_held():  # published and cleaned up, or neither
                if journal is not None:
                    journal.close()
                sink.commit()
                if work is not None:
                    work.remove()
                completed = True
    except BaseException as exc:
        executor.close(interrupted=True)
        keep = plan.resume and work is not None and not isinstance(exc, (UsageError, ResumeError))
        if journal is not None:
            journal.close()
        if sink is not None:
            if keep and isinstance(sink, AtomicFile) and sink.tmp == getattr(work, "part", None):
                sink.detach()
            else:
                sink.abort()
        if work is not None:
            if keep:
                say("the finished part of this run is kept; rerun the same command with --resume "
                    "to continue")
            else:
                work.remove()
        raise
    finally:
        bar.close()
        if not completed or own:
            executor.close(interrupted=not completed)
    return PerturbOutcome(counters, time.perf_counter() - start, mechanism, plan.fmt.value,
                          len(plan.inputs), settings, workers, resumed)


class _NoProgressBar:
    """What a run without a progress bar updates (tqdm's disabled bar, without importing it)."""

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _record_error(input_id: int, line: int, reason: str) -> InputFormatError:
    return InputFormatError(
        f"input {input_id + 1}, line {line}: {reason}; fix the record, or pass "
        "--on-error skip (drop it) or --on-error keep (copy it unchanged)"
    )


def _open_part(plan: RunPlan, work: WorkPaths | None, state: _Resume) -> AtomicFile:
    """The partial output file, cut back to the last committed chunk when resuming."""
    assert work is not None
    resuming = bool(state.out_bytes or state.done_inputs or state.next_chunk)
    keep = state.out_bytes if resuming else None
    if keep is not None and (not work.part.exists() or work.part.stat().st_size < keep):
        raise ResumeError(f"cannot resume: the partial output {work.part} is missing or shorter "
                          "than its journal; start again without --resume")
    return AtomicFile(plan.target, tmp=work.part, keep_bytes=keep)


def _run_lines(plan: RunPlan, executor: ChunkExecutor, journal: Journal | None, state: _Resume,
               account: Callable[[ChunkCounters], None], sink: AtomicFile | StreamOutput) -> None:
    settings = plan.settings
    streaming = plan.target.kind is not OutputKind.FILE
    for input_id, path in enumerate(plan.inputs):
        if input_id in state.done_inputs:
            continue
        stream = open_input(path)
        try:
            offset = state.in_offset.get(input_id, 0)
            if offset:
                skip_bytes(stream, offset, path)
            chunks = iter_line_chunks(stream, settings.chunk_size,
                                      first_line=state.next_line.get(input_id, 1), offset=offset)
            items = _line_items(chunks, input_id, state.next_chunk.get(input_id, 0), plan)
            for chunk, result in executor.map(items):
                if result.error is not None:
                    raise _record_error(input_id, *result.error)
                sink.write(result.payload)
                if streaming:
                    sink.flush()
                account(result.counters)
                if journal is not None:
                    sink.flush()  # the bytes are in the file before the journal claims them
                    journal.commit({"i": input_id, "c": result.chunk_index, "in": chunk.end_offset,
                                    "line": chunk.next_line, "out": sink.tell(),
                                    "n": counters_to_dict(result.counters)}, sink)
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
        if journal is not None:
            sink.flush()
            journal.commit({"i": input_id, "done": True, "out": sink.tell()}, sink)


@dataclass(frozen=True)
class _LineMeta:
    """What the writer needs of a chunk (not its lines: they travel to the worker only)."""

    end_offset: int
    next_line: int


def _line_items(chunks: Iterator[LineChunk], input_id: int, first: int,
                plan: RunPlan) -> Iterator[tuple[_LineMeta, ChunkTask]]:
    for n, chunk in enumerate(chunks, start=first):
        meta = _LineMeta(chunk.end_offset, chunk.first_line + len(chunk.lines))
        yield meta, ChunkTask(plan.input_base + input_id, n, chunk.first_line, plan.fmt, chunk.lines,
                              plan.compression)


def _run_parquet(plan: RunPlan, executor: ChunkExecutor, journal: Journal | None,
                 work: WorkPaths | None, state: _Resume,
                 account: Callable[[ChunkCounters], None],
                 stream_sink: StreamOutput | AtomicFile | None) -> AtomicFile | StreamOutput:
    settings = plan.settings
    field_name = settings.field
    sources = [ParquetSource.open(p) for p in plan.inputs]
    schema = sources[0].schema
    for source in sources[1:]:
        if not source.schema.equals(schema):
            raise UsageError("Parquet inputs have different schemas; perturb them separately")
    compression = sources[0].compression()
    direct: ParquetSink | None = None
    if stream_sink is not None:
        direct = ParquetSink(stream_sink.stream, schema, compression)
    else:
        assert work is not None
        work.segments.mkdir(exist_ok=True)
        keep = set(state.segments)
        for stray in work.segments.iterdir():  # written by a dying run after its last commit
            if stray.name not in keep:
                stray.unlink()
    segments = list(state.segments)
    for input_id, source in enumerate(sources):
        if input_id in state.done_inputs:
            continue
        first = state.next_chunk.get(input_id, 0)
        chunks = source.chunks(settings.chunk_size, state.next_group.get(input_id, 0))
        items = ((chunk, ChunkTask(plan.input_base + input_id, n, 0, Format.PARQUET,
                                   column_values(chunk.batch, field_name)))
                 for n, chunk in enumerate(chunks, start=first))
        group: list[Any] = []
        group_counters = ChunkCounters()
        for chunk, result in executor.map(items):
            group.append(rebuild(chunk.batch, field_name, result.payload))
            account(result.counters)
            group_counters.merge(result.counters)
            if not chunk.last_in_group:
                continue
            if direct is not None:
                direct.write_group(group)
            else:
                assert work is not None and journal is not None
                name = f"{input_id:05d}-{chunk.row_group:06d}.parquet"
                _write_segment(work.segments / name, schema, compression, group)
                segments.append(name)
                journal.commit({"i": input_id, "g": chunk.row_group, "c": result.chunk_index,
                                "seg": name, "n": counters_to_dict(group_counters)})
            group, group_counters = [], ChunkCounters()
        if journal is not None:
            journal.commit({"i": input_id, "done": True})
    if direct is not None:
        direct.close()
        assert stream_sink is not None
        return stream_sink
    # Every row group is in a finished segment: copy them, in order, into the output.
    assert work is not None
    if settings.max_rows_per_file:
        return _split_parquet(plan, [work.segments / n for n in segments], schema, compression,
                              settings.max_rows_per_file)
    sink = AtomicFile(plan.target)
    try:
        out = ParquetSink(sink.stream, schema, compression)
        for name in segments:
            out.copy_groups_from(work.segments / name)
        out.close()
    except BaseException:
        sink.abort()
        raise
    return sink


class _Files:
    """Several atomic files published together (commit) or not at all (abort)."""

    def __init__(self) -> None:
        self.files: list[AtomicFile] = []

    def commit(self) -> None:
        for f in self.files:
            f.commit()

    def abort(self) -> None:
        for f in self.files:
            f.abort()

    detach = abort


def split_name(target: Path, number: int) -> Path:
    """out.parquet -> out-00000.parquet, the name of part `number` of a split output."""
    return target.with_name(f"{target.stem}-{number:05d}{target.suffix}")


def _split_parquet(plan: RunPlan, segments: list[Path], schema: Any, compression: Any,
                   limit: int) -> _Files:
    """The output as files of at most `limit` rows; a row group larger than that is cut."""
    assert plan.target.path is not None
    files = _Files()
    writer: ParquetSink | None = None
    rows = 0
    try:
        for path in segments:
            for table in segment_groups(path):
                while table.num_rows:
                    if writer is None or rows == limit:
                        if writer is not None:
                            writer.close()
                        part = split_name(plan.target.path, len(files.files))
                        files.files.append(AtomicFile(resolve_output(str(part))))
                        writer = ParquetSink(files.files[-1].stream, schema, compression)
                        rows = 0
                    take = min(table.num_rows, limit - rows)
                    writer.write_table(table.slice(0, take))
                    table = table.slice(take)
                    rows += take
        if writer is None:  # an empty input still gets one (empty) file
            files.files.append(AtomicFile(resolve_output(str(split_name(plan.target.path, 0)))))
            writer = ParquetSink(files.files[-1].stream, schema, compression)
        writer.close()
    except BaseException:
        files.abort()
        raise
    return files


def _write_segment(path: Path, schema: Any, compression: Any, batches: list[Any]) -> None:
    tmp = path.with_suffix(".tmp")
    writer = ParquetSink(str(tmp), schema, compression)
    writer.write_group(batches)
    writer.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_perturb(inputs: list[str], output: str, settings: PerturbSettings, index: EmbeddingIndex,
                fmt: str | None = None, progress: bool | None = None,
                on_chunk: Callable[[ChunkCounters], None] | None = None, *,
                resume: bool = False, notify: Notify | None = None) -> PerturbOutcome:
    """Plan and execute in one call (the library entry point of the old pipeline module)."""
    if fmt is not None:
        settings = settings.with_(format=Format(fmt))
    return execute(plan_run(inputs, output, settings, resume=resume), index,
                   progress=progress, on_chunk=on_chunk, notify=notify)
