"""Readers and writers: JSONL (optionally .gz/.zst), Parquet, plain text; stdin/stdout as `-`.

Output files are written atomically: into a temporary file beside the target, renamed into place
only when the run succeeded, removed on any error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from privtext.errors import UsageError

STDIO = "-"
FORMATS = ("jsonl", "parquet", "text")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text",
}
_COMPRESSIONS = (".gz", ".zst")


def split_compression(path: str) -> tuple[str, str | None]:
    for ext in _COMPRESSIONS:
        if path.lower().endswith(ext):
            return path[: -len(ext)], ext
    return path, None


def infer_format(path: str, explicit: str | None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise UsageError(f"unknown format {explicit!r}; use --format jsonl, parquet or text")
        return explicit
    if path == STDIO:
        raise UsageError("cannot infer the format of stdin; pass --format jsonl, parquet or text")
    base, _ = split_compression(path)
    fmt = _EXTENSIONS.get(Path(base).suffix.lower())
    if fmt is None:
        raise UsageError(
            f"cannot infer the format of {Path(path).name} from its extension; "
            "pass --format jsonl, parquet or text"
        )
    return fmt


def open_input(path: str) -> IO[bytes]:
    """A binary stream of the (decompressed) input; the caller closes it."""
    if path == STDIO:
        return sys.stdin.buffer
    if not os.path.isfile(path):
        raise UsageError(f"input file not found: {path}; check the path or use - for stdin")
    _, comp = split_compression(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb", buffering=1 << 20)


def iter_line_chunks(stream: IO[bytes], chunk_size: int) -> Iterator[list[bytes]]:
    """Chunks of up to `chunk_size` raw lines (endings kept). A chunk is yielded as soon as it
    is full, so a pipe fed line by line is processed before EOF (with --chunk-size 1)."""
    chunk: list[bytes] = []
    while True:
        line = stream.readline()
        if not line:
            break
        chunk.append(line)
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class ParquetSource:
    file: Any  # pyarrow.parquet.ParquetFile
    schema: Any  # pyarrow.Schema with its metadata

    @classmethod
    def open(cls, path: str) -> ParquetSource:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if path == STDIO:  # Parquet needs random access: read stdin into memory first
                source = pq.ParquetFile(pa.BufferReader(sys.stdin.buffer.read()))
            else:
                if not os.path.isfile(path):
                    raise UsageError(f"input file not found: {path}; check the path or use - for stdin")
                source = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UsageError(
                f"cannot read {'stdin' if path == STDIO else Path(path).name} as Parquet; "
                "check --format"
            ) from exc
        return cls(file=source, schema=source.schema_arrow)

    def batches(self, chunk_size: int) -> Iterator[Any]:
        yield from self.file.iter_batches(batch_size=chunk_size)


class AtomicOutput:
    """A binary sink: stdout, or a file that appears only if the `with` block succeeds."""

    def __init__(self, path: str):
        self.path = path
        self._tmp: str | None = None
        self._raw: IO[bytes] | None = None
        self.stream: IO[bytes] | None = None

    def __enter__(self) -> AtomicOutput:
        if self.path == STDIO:
            self.stream = sys.stdout.buffer
            return self
        target = Path(self.path)
        if not target.parent.exists():
            raise UsageError(f"output directory does not exist: {target.parent}; create it first")
        fd, self._tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        self._raw = os.fdopen(fd, "wb", buffering=1 << 20)
        _, comp = split_compression(self.path)
        if comp == ".gz":
            self.stream = gzip.GzipFile(fileobj=self._raw, mode="wb")  # type: ignore[assignment]
        elif comp == ".zst":
            import zstandard

            self.stream = zstandard.ZstdCompressor().stream_writer(self._raw, closefd=False)  # type: ignore[assignment]
        else:
            self.stream = self._raw
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.path == STDIO:
            if exc_type is None:
                self.stream.flush()  # type: ignore[union-attr]
            return
        try:
            if self.stream is not self._raw:
                self.stream.close()  # type: ignore[union-attr]
            self._raw.close()  # type: ignore[union-attr]
        finally:
            if exc_type is None:
                os.replace(self._tmp, self.path)  # type: ignore[arg-type]
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp)  # type: ignore[arg-type]


def write_text_atomic(path: str, text: str) -> None:
    with AtomicOutput(path) as out:
        out.stream.write(text.encode("utf-8"))  # type: ignore[union-attr]
