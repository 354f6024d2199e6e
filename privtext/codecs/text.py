"""Plain text: one document per line; line endings (LF or CRLF) and blank lines are kept.

A chunk that is valid UTF-8 is perturbed as one buffer, each line's text (without its ending) a
span of it (`perturb_spans`); otherwise line by line, so a bad line is named by --on-error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from privtext.codecs.lines import (
    COLUMNAR_MAX_BYTES,
    LinesOut,
    PerturbSpans,
    RecordError,
    line_bounds,
    to_char_offsets,
    transform_lines,
)

_LF, _CR = 10, 13


class TextRecords:
    def parse(self, body: memoryview) -> tuple[Any, list[str]]:
        try:
            return None, [str(body, "utf-8")]
        except UnicodeDecodeError:
            raise RecordError("not valid UTF-8") from None

    def render(self, state: Any, texts: list[str], ending: str) -> bytes:
        return (texts[0] + ending).encode("utf-8") if ending else texts[0].encode("utf-8")


def transform(lines: list[bytes], first_line: int, path: list[str], on_error: str,
              perturb: Callable[[list[str]], tuple[list[str], Any]],
              perturb_spans: PerturbSpans | None = None) -> LinesOut:
    if perturb_spans is not None and lines:
        done = _transform_columnar(lines, perturb_spans)
        if done is not None:
            return done
    return transform_lines(lines, first_line, TextRecords(), on_error, perturb, skip_blank=False)


def _transform_columnar(lines: list[bytes], perturb_spans: PerturbSpans) -> LinesOut | None:
    """The chunk as one buffer, each line's text a span; None when it is not valid UTF-8."""
    blob = b"".join(lines)
    if len(blob) > COLUMNAR_MAX_BYTES:
        return None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    raw = np.frombuffer(blob, dtype=np.uint8)
    starts, ends = line_bounds(lines)
    # The ending is LF or CRLF, as the per-line path cuts it. Only the last line may lack one
    # (lines are cut after LF): two spans then always have the LF between them.
    lf = (ends > starts) & (raw[np.maximum(ends - 1, 0)] == _LF)
    if not lf[:-1].all():
        return None
    crlf = lf & (ends - starts >= 2) & (raw[np.maximum(ends - 2, 0)] == _CR)
    ends = ends - lf - crlf
    if len(text) != len(blob):
        starts, ends = to_char_offsets(raw, starts, ends)
    new_text, _, _, counters = perturb_spans(text, starts, ends)
    counters.records = len(lines)
    return LinesOut(new_text.encode("utf-8"), counters)
