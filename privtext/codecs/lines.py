"""The record loop shared by the line formats (JSONL, text): parse, perturb the chunk, render.

Every record's texts go to one `perturb` call for the whole chunk (the vectorised text path).
A record that cannot be read is handled by `--on-error`: fail (stop, naming the line), skip
(drop it) or keep (copy it unchanged). Reasons name lines and fields, never content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from privtext.text import ChunkCounters

# (text, span starts, span ends) -> (new text, new starts, new ends, counters): the text path's
# in-place perturbation of documents that sit in one buffer (TextPerturber.perturb_spans), which
# the columnar paths of the line formats use instead of one text per record.
# A chunk above this many bytes (a record longer than a chunk) takes the per-record path, which
# perturbs a long document in pieces without the columnar path's whole-chunk copies.
COLUMNAR_MAX_BYTES = 4 << 20

PerturbSpans = Callable[[str, np.ndarray, np.ndarray], tuple[str, np.ndarray, np.ndarray, ChunkCounters]]


class RecordError(ValueError):
    """One record cannot be processed; the message is a reason without content."""


class RecordCodec(Protocol):
    def parse(self, body: memoryview) -> tuple[Any, list[str]]: ...

    def render(self, state: Any, texts: list[str], ending: str) -> bytes: ...


@dataclass
class LinesOut:
    payload: bytes
    counters: ChunkCounters
    error: tuple[int, str] | None = None  # (line number, reason) when --on-error fail stops


def transform_lines(lines: list[bytes], first_line: int, codec: RecordCodec, on_error: str,
                    perturb: Callable[[list[str]], tuple[list[str], ChunkCounters]],
                    skip_blank: bool) -> LinesOut:
    out: list[bytes] = list(lines)
    texts: list[str] = []
    slots: list[tuple[int, Any, str, int]] = []  # (position, parse state, line ending, n texts)
    skipped = kept = nulls = 0
    for pos, raw in enumerate(lines):
        # A memoryview, not a slice: a 30 MB record is not copied just to drop its newline.
        cut = (2 if raw.endswith(b"\r\n") else 1) if raw.endswith(b"\n") else 0
        body = memoryview(raw)[: len(raw) - cut]
        if skip_blank and (len(raw) == cut or raw.isspace()):
            continue  # blank lines pass through; they hold no record
        try:
            state, values = codec.parse(body)
        except RecordError as exc:
            if on_error == "fail":
                return LinesOut(b"", ChunkCounters(), error=(first_line + pos, str(exc)))
            if on_error == "skip":
                out[pos] = b""
                skipped += 1
            else:
                kept += 1
            continue
        if not values:
            nulls += 1  # the field is null: the record passes through unchanged
        texts.extend(values)
        slots.append((pos, state, "\r\n"[2 - cut:] if cut else "", len(values)))
    new_texts, counters = perturb(texts)
    at = 0
    for pos, state, ending, count in slots:
        out[pos] = codec.render(state, new_texts[at : at + count], ending)
        at += count
    # A duplicated key yields several texts for one record: count records, not values.
    counters.records = len(slots)
    counters.errors_skipped, counters.errors_kept = skipped, kept
    counters.null_values += nulls
    return LinesOut(b"".join(out), counters)


def line_bounds(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of each line in b"".join(lines)."""
    lengths = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
    ends = np.cumsum(lengths)
    return ends - lengths, ends


def to_char_offsets(raw: np.ndarray, *offsets: np.ndarray) -> list[np.ndarray]:
    """Byte offsets into UTF-8 `raw` (at character boundaries) as offsets into its decoded str:
    each drops the continuation bytes before it."""
    continuation = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum((raw & 0xC0) == 0x80, out=continuation[1:])
    return [at - continuation[at] for at in offsets]
