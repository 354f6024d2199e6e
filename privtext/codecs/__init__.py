"""Corpus formats: one module per format, compression by extension, inputs opened safely.

- `jsonl`: splices only the perturbed string value's bytes into the original line;
- `text`: one document per line, line endings kept;
- `parquet`: record batches per row group, schema, metadata, row groups and codec kept.

This module holds what they share: format inference from names, opening an input (a path or `-`)
as a decompressed binary stream, and cutting a line-based stream into chunks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from privtext.codecs.compression import open_decompressed, split_compression
from privtext.errors import InputFormatError, UsageError
from privtext.settings import CHUNK_BYTES, Format

STDIO = "-"
FORMATS = tuple(f.value for f in Format)
EXTENSIONS = {
    ".jsonl": Format.JSONL, ".ndjson": Format.JSONL, ".json": Format.JSONL,
    ".parquet": Format.PARQUET, ".pq": Format.PARQUET,
    ".txt": Format.TEXT, ".text": Format.TEXT,
}

__all__ = [
    "FORMATS",
    "STDIO",
    "Format",
    "LineChunk",
    "format_of_name",
    "infer_format",
    "iter_line_chunks",
    "open_input",
    "split_compression",
]


def format_of_name(path: str) -> Format | None:
    """The format an extension names ('x.jsonl.gz' -> jsonl), or None."""
    base, _ = split_compression(path)
    return EXTENSIONS.get(Path(base).suffix.lower())


def infer_format(path: str, explicit: Format | str | None) -> Format:
    if explicit:
        try:
            return Format(explicit)
        except ValueError:
            raise UsageError(f"unknown format {explicit!r}; use --format jsonl, parquet or text") from None
    if path == STDIO:
        raise UsageError("cannot infer the format of stdin; pass --format jsonl, parquet or text")
    fmt = format_of_name(path)
    if fmt is None:
        raise UsageError(
            f"cannot infer the format of {Path(path).name} from its extension; "
            "pass --format jsonl, parquet or text"
        )
    return fmt


def display_name(path: str) -> str:
    return "stdin" if path == STDIO else path


def open_input(path: str) -> IO[bytes]:
    """A binary stream of the (decompressed) input; the caller closes it (never stdin)."""
    if path == STDIO:
        return sys.stdin.buffer
    if not os.path.isfile(path):
        raise UsageError(f"input file not found: {path}; check the path or use - for stdin")
    try:
        raw = open(path, "rb", buffering=1 << 20)
    except PermissionError:
        raise UsageError(f"input file {path} is not readable; check its permissions") from None
    except OSError as exc:
        raise InputFormatError(f"cannot open input {path} ({exc.strerror})") from None
    _, comp = split_compression(path)
    if comp is None:
        return raw
    return open_decompressed(raw, path, comp)


@dataclass
class LineChunk:
    lines: list[bytes]  # raw lines, endings kept
    first_line: int  # 1-based number of the first line
    end_offset: int  # decompressed bytes of the input consumed through this chunk


def iter_line_chunks(stream: IO[bytes], chunk_size: int, *, max_bytes: int = CHUNK_BYTES,
                     first_line: int = 1, offset: int = 0) -> Iterator[LineChunk]:
    """Chunks of up to `chunk_size` raw lines that end early once they hold `max_bytes`.

    A chunk is yielded as soon as it is full, so a pipe fed line by line is processed before EOF
    (with --chunk-size 1). Boundaries depend only on the bytes from the chunk's start, so a
    resumed run that starts at a recorded boundary cuts the rest exactly as the first run did.
    """
    chunk: list[bytes] = []
    size = 0
    line_no = first_line
    readline = stream.readline
    while True:
        line = readline()
        if not line:
            break
        chunk.append(line)
        size += len(line)
        if len(chunk) >= chunk_size or size >= max_bytes:
            offset += size
            yield LineChunk(chunk, line_no, offset)
            line_no += len(chunk)
            chunk, size = [], 0
    if chunk:
        yield LineChunk(chunk, line_no, offset + size)


def skip_bytes(stream: IO[bytes], count: int, name: str) -> None:
    """Reads and drops `count` bytes (resume: the chunks already committed)."""
    left = count
    while left > 0:
        block = stream.read(min(left, 1 << 20))
        if not block:
            raise InputFormatError(f"{name} is shorter than when the run started; "
                                   "it changed: start again without --resume")
        left -= len(block)
