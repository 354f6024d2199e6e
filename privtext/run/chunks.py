"""One chunk of records in, its output out: the per-process processor the executor runs.

A chunk's randomness is `chunk_rng(run key, input number, chunk index)`, never the worker's, so
the output is the same for any worker count and a resumed run reproduces it. The text work goes
through `TextPerturber.perturb_texts`, the one place that tokenizes and perturbs; the format work
through the codecs. A very long record is perturbed in pieces (`TextPerturber.perturb_documents`),
so memory follows a bounded piece, not the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privtext.codecs import jsonl as jsonl_codec
from privtext.codecs import text as text_codec
from privtext.codecs.compression import compress_piece
from privtext.settings import Format, PerturbSettings
from privtext.text import ChunkCounters

if TYPE_CHECKING:
    from privtext.api import Anonymizer


@dataclass(frozen=True)
class ChunkTask:
    input_id: int
    chunk_index: int
    first_line: int  # 1-based line number of the chunk's first record (0 for Parquet)
    fmt: Format
    payload: list[Any]  # raw lines (bytes) for jsonl/text, column values for Parquet
    compression: str | None = None  # line formats: compress the output piece (.gz / .zst)


@dataclass
class ChunkResult:
    chunk_index: int
    payload: Any  # bytes for jsonl/text, list[str | None] for Parquet
    counters: ChunkCounters
    error: tuple[int, str] | None = None  # (line number, reason) when --on-error fail stops


class ChunkProcessor:
    """Turns one chunk into its output. One instance per process (a worker, or the caller).

    The text work is the library's: chunk c of input i is `Anonymizer.perturb_batch` on stream
    (i, c), exactly what a library or engine caller gets for that stream id."""

    def __init__(self, anonymizer: Anonymizer, settings: PerturbSettings):
        self.settings = settings
        self.anonymizer = anonymizer
        self.path = settings.field_path
        self._json_plain = anonymizer.writes_json_plain()

    def process(self, task: ChunkTask) -> ChunkResult:
        stream = (task.input_id, task.chunk_index)

        def perturb(texts: list[str]) -> tuple[list[str], ChunkCounters]:
            return self.anonymizer.perturb_batch(texts, stream)  # type: ignore[return-value]

        if task.fmt is Format.PARQUET:
            new_values, counters = self.anonymizer.perturb_batch(task.payload, stream)
            return ChunkResult(task.chunk_index, new_values, counters)
        def perturb_spans(text: str, starts: Any, ends: Any) -> Any:
            return self.anonymizer.perturb_spans(text, starts, ends, stream)

        on_error = self.settings.on_error.value
        if task.fmt is Format.JSONL:
            out = jsonl_codec.transform(task.payload, task.first_line, self.path, on_error, perturb,
                                        perturb_spans if self._json_plain else None)
        else:
            out = text_codec.transform(task.payload, task.first_line, self.path, on_error, perturb, perturb_spans)
        return ChunkResult(task.chunk_index, compress_piece(out.payload, task.compression),
                           out.counters, out.error)


def build_processor(anonymizer_state: dict[str, Any], settings: PerturbSettings) -> ChunkProcessor:
    """The worker-side factory. It gets `Anonymizer.state()` (index path, manifest digest,
    mechanism spec, run key; never arrays) rather than a pickled Anonymizer, so that a missing or
    changed cache fails inside the factory, where the executor reports it as a one-line error,
    and not while the worker is still unpickling its arguments. Restoring opens the index by
    memory map (shared through the page cache) and checks its digest; the caller already
    prepared the mechanism's derived files."""
    from privtext.api import restore

    return ChunkProcessor(restore(anonymizer_state), settings)
