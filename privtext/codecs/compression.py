"""Compression by file extension: .gz and .zst, in and out.

Reading: a decompressing binary stream that counts how far it got, and turns every way a
compressed file can be broken (truncated, corrupt, not compressed at all) into a data error that
names the input and the position reached, instead of EOFError/OSError tracebacks (or, as before,
a truncated .gz that looked like Ctrl-C).

Writing: each chunk is compressed as its own gzip member / zstd frame. Every decoder reads
concatenated members and frames as one stream, and it makes the output a sequence of independent
pieces: a resumed run can cut the file at a chunk boundary and append, and a seeded run produces
the same bytes whether or not it was interrupted (the gzip header carries mtime 0).
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import IO

from privtext.errors import InputFormatError

COMPRESSIONS = (".gz", ".zst")


def split_compression(path: str) -> tuple[str, str | None]:
    """('corpus.jsonl', '.gz') for 'corpus.jsonl.gz'; (path, None) when not compressed."""
    for ext in COMPRESSIONS:
        if path.lower().endswith(ext):
            return path[: -len(ext)], ext
    return path, None


class CountingReader(io.RawIOBase):
    """Wraps a decompressing stream: counts decompressed bytes and maps decoder errors to one
    InputFormatError naming the input and the offset reached."""

    def __init__(self, inner: IO[bytes], name: str, compression: str):
        self._inner = inner
        self.name_for_errors = name
        self.compression = compression
        self.offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            # Small reads: a decoder error loses the block it was decoding, so the offset
            # reported stays within 64 KiB of where the damage is.
            data = self._inner.read(min(len(buffer), 1 << 16))
        except EOFError:
            raise self._error("is truncated (the compressed stream ends early)") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise self._error(f"is not a valid gzip file ({_short(exc)})") from None
        except OSError as exc:
            raise self._error(f"cannot be decompressed ({_short(exc)})") from None
        except Exception as exc:  # zstandard.ZstdError and friends
            if type(exc).__module__.startswith("zstandard"):
                raise self._error(f"is not a valid zstd file ({_short(exc)})") from None
            raise
        n = len(data)
        buffer[:n] = data
        self.offset += n
        return n

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()

    def _error(self, what: str) -> InputFormatError:
        return InputFormatError(
            f"{self.name_for_errors} {what} after {self.offset} decompressed bytes; "
            f"re-create or re-download it, or rename it if it is not {self.compression}-compressed"
        )


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:80]


def open_decompressed(raw: IO[bytes], name: str, compression: str) -> IO[bytes]:
    """A buffered binary stream of the decompressed content of `raw` (which it then owns)."""
    inner: IO[bytes]
    if compression == ".gz":
        inner = _Owning(gzip.GzipFile(fileobj=raw, mode="rb"), raw)  # type: ignore[arg-type]
    else:
        inner = _ZstdFrames(raw)  # type: ignore[assignment]
    return io.BufferedReader(CountingReader(inner, name, compression), buffer_size=1 << 20)


class _Owning:
    """GzipFile does not close a file object it was given; this closes both."""

    def __init__(self, inner: IO[bytes], raw: IO[bytes]):
        self._inner, self._raw = inner, raw

    def read(self, n: int) -> bytes:
        return self._inner.read(n)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._raw.close()


class _ZstdFrames:
    """Concatenated zstd frames. zstandard's stream_reader returns a clean EOF when the last frame
    is cut short; a decompressobj tells us (its `eof` is False at the end of the input)."""

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self._raw = raw
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._obj = self._new()
        self._pending = b""
        self._in_frame = False  # bytes of the current frame consumed, frame not finished

    def read(self, n: int) -> bytes:
        while len(self._pending) < n:
            block = self._raw.read(1 << 20)
            if not block:
                if self._in_frame:
                    raise EOFError("zstd frame cut short")
                break
            while block:
                self._in_frame = True
                self._pending += self._obj.decompress(block)
                if self._obj.eof:
                    block = self._obj.unused_data
                    self._obj = self._new()
                    self._in_frame = False
                else:
                    block = b""
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def close(self) -> None:
        self._raw.close()


def compress_piece(data: bytes, compression: str | None) -> bytes:
    """One independent gzip member or zstd frame (deterministic: gzip mtime 0)."""
    if compression is None or not data:
        return data
    if compression == ".gz":
        return gzip.compress(data, compresslevel=6, mtime=0)
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
