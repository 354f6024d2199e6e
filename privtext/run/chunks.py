"""One chunk of records in, its output out: the per-process processor the executor runs.

A chunk's randomness is `chunk_rng(run key, input number, chunk index)`, never the worker's, so
the output is the same for any worker count and a resumed run reproduces it. The text work goes
through `TextPerturber.perturb_texts`, the one place that tokenizes and perturbs; the format work
through the codecs. A very long record is perturbed in pieces (`TextPerturber.perturb_documents`),
so memory follows a bounded piece, not the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtext.codecs import jsonl as jsonl_codec
from privtext.codecs import text as text_codec
from privtext.codecs.compression import compress_piece
from privtext.index import EmbeddingIndex
from privtext.mechanisms import create
from privtext.mechanisms.base import Mechanism
from privtext.randomness import chunk_rng
from privtext.settings import Format, PerturbSettings
from privtext.text import ChunkCounters, TextPerturber


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
    """Turns one chunk into its output. One instance per process (a worker, or the caller)."""

    def __init__(self, index: EmbeddingIndex, mechanism: Mechanism, settings: PerturbSettings, key: int):
        self.settings = settings
        self.key = key
        self.perturber = TextPerturber(index, mechanism, settings.oov, settings.mask_token)
        self.path = settings.field_path

    def process(self, task: ChunkTask) -> ChunkResult:
        rng = chunk_rng(self.key, task.input_id, task.chunk_index)

        def perturb(texts: list[str]) -> tuple[list[str], ChunkCounters]:
            return self.perturber.perturb_documents(texts, rng)

        if task.fmt is Format.PARQUET:
            values: list[str | None] = task.payload
            slots = [i for i, v in enumerate(values) if v is not None]
            texts, counters = perturb([values[i] for i in slots])  # type: ignore[misc]
            new_values = list(values)
            for i, text in zip(slots, texts):
                new_values[i] = text
            counters.null_values = len(values) - len(slots)
            return ChunkResult(task.chunk_index, new_values, counters)
        codec = jsonl_codec if task.fmt is Format.JSONL else text_codec
        out = codec.transform(task.payload, task.first_line, self.path, self.settings.on_error.value, perturb)
        return ChunkResult(task.chunk_index, compress_piece(out.payload, task.compression),
                           out.counters, out.error)


def build_processor(index_path: str, settings: PerturbSettings, key: int) -> ChunkProcessor:
    """The worker-side factory: opens the index cache by path (memory-mapped, shared through the
    page cache) and creates the mechanism, whose derived files the caller already prepared."""
    index = EmbeddingIndex(Path(index_path))
    mechanism = create(settings.mechanism, index, settings.epsilon, settings.params)
    return ChunkProcessor(index, mechanism, settings, key)
