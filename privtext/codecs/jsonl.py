"""JSON Lines: only the bytes of the perturbed string value change.

A chunk whose records are all plain (see `_transform_columnar`) is handled as one buffer: msgspec
validates every line at once, numpy finds each record's value, and the text path perturbs the
values in place (`perturb_spans`), with no Python per record. Any other chunk, and any record
the columnar path cannot place, takes the per-record path below, which gives the same bytes.

A record is never re-serialised. The line is decoded once, its object walked with the standard
library's C scanner (`scanstring` and `make_scanner` return the end index of each key and value),
so Python runs once per key, not once per character; the new value, JSON-escaped, is spliced
between the old value's start and end. Numbers of any size, `1e400`, escapes, spacing, key order
and duplicate keys are kept byte for byte. A duplicated key has every occurrence perturbed (a
reader may take either one). An invalid string (a lone surrogate, a bad escape) is a record
error that `--on-error` decides, like a missing field.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import msgspec
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

# parse_int/parse_float=str: values are only skipped, never used, so no int-digit limit and
# no float rounding can make a valid record fail.
_SCAN = json.scanner.make_scanner(json.decoder.JSONDecoder(parse_int=str, parse_float=str))
# A second scanner whose objects are dicts (the fast path reads the field from one).
_SCAN_OBJECTS = _SCAN
_scanstring = json.decoder.scanstring
_escape = json.encoder.encode_basestring  # type: ignore[attr-defined]  # C-accelerated


def _encode(text: str) -> str:
    """`text` as a JSON string, byte for byte what the standard library writes (ensure_ascii
    off). It escapes only quotes, backslashes and characters below U+0020, and a printable
    string holds none of the latter: such a string needs only its quotes (3x faster here)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return _escape(text)
_WS = re.compile(r"[ \t\n\r]*")
_ws = _WS.match
_SPACE = " \t\n\r"
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def locate(line: str, path: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, value) of every string at `path` in the JSON object `line` (a null there is
    present but holds no text: no span, as a null Parquet value).

    Raises RecordError for invalid JSON, a missing field, a non-string value or an invalid
    string. The reasons name the field, never content."""
    if len(path) == 1:
        hit = _fast_locate(line, path[0])
        if hit is not None:
            return hit
    found: list[tuple[int, int, str | None]] = []
    try:
        end = _walk(line, 0, path, 0, found)
        if end < len(line) and line[end] in _SPACE:
            end = _ws(line, end).end()
        if end != len(line):
            raise RecordError("not valid JSON")
    except RecordError:
        raise
    except (ValueError, IndexError, RecursionError, StopIteration):
        raise RecordError("not valid JSON") from None
    if not found:
        raise RecordError(f"field {'.'.join(path)!r} is missing")
    return [span for span in found if span[2] is not None]  # nulls: present, nothing to perturb


@lru_cache(maxsize=64)
def _quoted(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _fast_locate(line: str, key: str) -> list[tuple[int, int, str]] | None:
    """The common case in C-speed steps, or None to take the walk.

    The C scanner parses the whole line (validating it). If the object has `key` as a string and
    the line holds no \\u escape, the key is written literally (no other escape yields a
    letter), so `"key"` occurs in the line; if it occurs exactly once, that occurrence is the
    key: no duplicate and no nested object repeats it, and a string holding it would add a
    second one. Anything else: None."""
    if "\\u" in line:
        return None
    try:
        record, end = _SCAN_OBJECTS(line, 0 if line[:1] == "{" else _ws(line, 0).end())
    except (ValueError, StopIteration, RecursionError):
        return None
    if type(record) is not dict:
        return None
    value = record.get(key)
    if type(value) is not str:
        return None
    if end != len(line) and _ws(line, end).end() != len(line):
        return None
    quoted = _quoted(key)
    at = line.find(quoted)
    if at < 0 or line.find(quoted, at + 1) >= 0:
        return None
    start = at + len(quoted)
    if line[start] != ":":
        start = _ws(line, start).end()
        if line[start] != ":":
            return None
    start += 1
    if line[start] != '"':
        start = _ws(line, start).end()
        if line[start] != '"':
            return None
    text, stop = _scanstring(line, start + 1)
    if text != value:
        return None
    return [(start, stop, text)]


def _walk(s: str, i: int, path: list[str], depth: int, found: list[tuple[int, int, str | None]]) -> int:
    """Walks the object starting at (or after whitespace from) `i`; returns the index after it."""
    if s[i] in _SPACE:
        i = _ws(s, i).end()
    if s[i] != "{":
        if depth == 0:
            _SCAN(s, i)  # invalid JSON is reported as such before "not an object"
            raise RecordError("not a JSON object")
        return _SCAN(s, i)[1]  # an intermediate path element that is not an object: skipped
    want = path[depth]
    last = depth == len(path) - 1
    i += 1
    if s[i] in _SPACE:
        i = _ws(s, i).end()
    if s[i] == "}":
        return i + 1
    while True:
        if s[i] != '"':
            raise ValueError("key expected")
        key, i = _scanstring(s, i + 1)
        if s[i] in _SPACE:
            i = _ws(s, i).end()
        if s[i] != ":":
            raise ValueError("colon expected")
        i += 1
        if s[i] in _SPACE:
            i = _ws(s, i).end()
        if key != want:
            end = _SCAN(s, i)[1]
        elif not last:
            end = _walk(s, i, path, depth + 1, found)  # no match inside: missing, said by locate
        elif s[i] == '"':
            value, end = _scanstring(s, i + 1)  # bad escapes raise ValueError -> invalid JSON
            if _SURROGATE.search(s, i, end) is not None and _has_lone_surrogate(value):
                raise RecordError(f"field {'.'.join(path)!r} holds an invalid string (lone surrogate)")
            found.append((i, end, value))
        else:
            value, end = _SCAN(s, i)  # validate the value before calling it the wrong type
            if value is not None:
                raise RecordError(f"field {'.'.join(path)!r} is not a string")
            found.append((i, end, None))  # a JSON null holds no text: it passes through
        i = end
        if s[i] in _SPACE:
            i = _ws(s, i).end()
        c = s[i]
        if c == ",":
            i += 1
            if s[i] in _SPACE:
                i = _ws(s, i).end()
            continue
        if c == "}":
            return i + 1
        raise ValueError("comma expected")


def _has_lone_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class JsonlRecords:
    """Parses one line into the texts to perturb and splices the replacements back."""

    def __init__(self, path: list[str]):
        self.path = path

    def parse(self, body: memoryview) -> tuple[Any, list[str]]:
        try:
            line = str(body, "utf-8")
        except UnicodeDecodeError:
            raise RecordError("not valid UTF-8") from None
        spans = locate(line, self.path)
        return (line, spans), [value for _, _, value in spans]

    def render(self, state: Any, texts: list[str], ending: str) -> bytes:
        line, spans = state
        pieces: list[str] = []
        pos = 0
        for (start, end, _), text in zip(spans, texts):
            pieces.append(line[pos:start])
            pieces.append(_encode(text))
            pos = end
        pieces.append(line[pos:])
        pieces.append(ending)
        return "".join(pieces).encode("utf-8")


def transform(lines: list[bytes], first_line: int, path: list[str], on_error: str,
              perturb: Callable[[list[str]], tuple[list[str], Any]],
              perturb_spans: PerturbSpans | None = None) -> LinesOut:
    """The chunk's output. With `perturb_spans` (given only when no replacement the text path
    can write needs JSON escaping), a chunk of plain records takes the columnar path."""
    if perturb_spans is not None and len(path) == 1:
        done = _transform_columnar(lines, path[0], perturb_spans)
        if done is not None:
            return done
    return transform_lines(lines, first_line, JsonlRecords(path), on_error, perturb, skip_blank=True)


_QUOTE, _BACKSLASH, _COLON, _BLANK, _LETTER_U = 34, 92, 58, 32, 117


@lru_cache(maxsize=16)
def _record_decoder(key: str) -> msgspec.json.Decoder:
    """Decodes a JSON array of objects that hold `key` as a string or null; other members are
    validated and skipped without being built."""
    record = msgspec.defstruct("Record", [("value", str | None)], rename={"value": key})
    return msgspec.json.Decoder(list[record])  # type: ignore[valid-type]


def _columnar_key(key: str) -> bool:
    """Whether `key` can be found by its literal spelling: a key whose characters JSON can only
    write as themselves or as a \\u escape (not '/', which may be written \\/, nor a character
    that must be escaped)."""
    return not any(c in '"\\/' or c < " " for c in key)


def _transform_columnar(lines: list[bytes], key: str, perturb_spans: PerturbSpans) -> LinesOut | None:
    """The chunk's output with every record's value perturbed in one `perturb_spans` call, or
    None (the per-record path then handles the chunk: blank lines, invalid records, or a key
    spelled in a way this path does not look for).

    Why the values found are the ones the per-record path perturbs, in the same order:
    - msgspec decodes the lines as one JSON array, so every line is exactly one valid JSON
      object (a blank line or two values on a line break the array or its length) whose `key`
      holds a string or null; the whole chunk is valid UTF-8.
    - A line is *direct* when the quoted key occurs in it exactly once, followed by `:` or `: `
      and a string, and every `\\u` of the line lies inside that string. The object's own key
      holds no `\\u` then (a key is not inside a string value), so it is written literally
      (`_columnar_key`: no other escape can spell its characters) and that one occurrence is
      it, with no duplicate. The string ends at the first quote after it that an even run of
      backslashes precedes. Its value is msgspec's; without a backslash the raw text is the
      value itself.
    - Other lines go through `locate`, the per-record path's parser, one by one.
    A value whose raw text differs from it (escapes) is put into the buffer decoded, perturbed
    there, and written back escaped exactly as the per-record path writes it (`_encode`). A raw
    value holds no quote, backslash or control character, and the caller guarantees no
    replacement does, so the perturbed text of the others needs no escaping.
    """
    if not lines or not _columnar_key(key):
        return None
    blob = b"".join(lines)
    if len(blob) > COLUMNAR_MAX_BYTES:
        return None
    try:
        text = blob.decode("utf-8")
        body = blob[:-1] if blob.endswith(b"\n") else blob
        records = _record_decoder(key).decode(b"[" + body.replace(b"\n", b",") + b"]")
    except (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    n = len(lines)
    if len(records) != n:
        return None

    raw = np.frombuffer(blob, dtype=np.uint8)
    last = len(raw) - 1
    line_start, line_end = line_bounds(lines)
    quotes = np.flatnonzero(raw == _QUOTE)
    backslashes = np.flatnonzero(raw == _BACKSLASH)
    if backslashes.size:
        quotes = quotes[~_escaped(quotes, backslashes)]

    quoted = _quoted(key).encode("utf-8")
    found = quotes[quotes + len(quoted) <= len(raw)]
    for j in range(1, len(quoted)):
        found = found[raw[found + j] == quoted[j]]
    found_line = np.searchsorted(line_end, found, side="right")
    direct = np.bincount(found_line, minlength=n) == 1
    once = direct[found_line]
    rows = found_line[once]
    after = found[once] + len(quoted)
    opening = np.minimum(after + 1, last)
    opening += raw[opening] == _BLANK
    closing = quotes[np.minimum(np.searchsorted(quotes, opening + 1), len(quotes) - 1)]
    good = ((raw[np.minimum(after, last)] == _COLON) & (raw[np.minimum(opening, last)] == _QUOTE)
            & (closing > opening))
    if backslashes.size:
        # Every \u of a direct line lies inside its value's string.
        escapes_u = backslashes[raw[np.minimum(backslashes + 1, last)] == _LETTER_U]
        u_line = np.searchsorted(line_end, escapes_u, side="right")
        u_outside = np.zeros(n, dtype=np.bool_)  # per line: some \u outside its value
        value_open = np.full(n, -1, dtype=np.int64)
        value_close = np.full(n, -1, dtype=np.int64)
        value_open[rows[good]] = opening[good]
        value_close[rows[good]] = closing[good]
        outside = (escapes_u < value_open[u_line]) | (escapes_u > value_close[u_line])
        u_outside[u_line[outside]] = True
        good &= ~u_outside[rows]
        escaped = np.searchsorted(backslashes, opening) != np.searchsorted(backslashes, closing)
    else:
        escaped = np.zeros(len(rows), dtype=np.bool_)
    direct[rows[~good]] = False
    rows, opening, closing, escaped = rows[good], opening[good], closing[good], escaped[good]

    if len(text) != len(blob):
        opening, closing, line_start, line_end = to_char_offsets(raw, opening, closing, line_start, line_end)
    starts, ends = opening + 1, closing
    values: list[str | None] = [None] * len(rows)  # the decoded value where the raw text differs
    for i in np.flatnonzero(escaped).tolist():
        values[i] = records[rows[i]].value
    del records

    nulls = 0
    others = np.flatnonzero(~direct)
    if others.size:
        extra_starts: list[int] = []
        extra_ends: list[int] = []
        for row in others.tolist():
            begin, stop = int(line_start[row]), int(line_end[row])
            line = text[begin:stop]
            try:
                spans = locate(line.rstrip("\r\n") if line.endswith("\n") else line, [key])
            except RecordError:
                return None  # the per-record path reports it as --on-error says
            nulls += not spans
            for start, end, value in spans:
                extra_starts.append(begin + start + 1)
                extra_ends.append(begin + end - 1)
                values.append(value if text[begin + start + 1 : begin + end - 1] != value else None)
        order = np.argsort(np.concatenate([starts, extra_starts]), kind="stable")
        starts = np.concatenate([starts, extra_starts]).astype(np.int64)[order]
        ends = np.concatenate([ends, extra_ends]).astype(np.int64)[order]
        values = [values[i] for i in order.tolist()]

    rewritten = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
    if rewritten.any():
        text, starts, ends = _put_decoded(text, starts, ends, rewritten, values)
    new_text, new_starts, new_ends, counters = perturb_spans(text, starts, ends)
    if rewritten.any():
        pieces: list[str] = []
        at = 0
        for start, end in zip(new_starts[rewritten].tolist(), new_ends[rewritten].tolist()):
            pieces += [new_text[at : start - 1], _encode(new_text[start:end])]
            at = end + 1
        pieces.append(new_text[at:])
        new_text = "".join(pieces)
    counters.records = n
    counters.null_values += nulls
    return LinesOut(new_text.encode("utf-8"), counters)


def _escaped(quotes: np.ndarray, backslashes: np.ndarray) -> np.ndarray:
    """Per quote position: whether an odd run of backslashes precedes it (an escaped quote)."""
    run_first = np.ones(len(backslashes), dtype=np.bool_)
    np.not_equal(backslashes[1:], backslashes[:-1] + 1, out=run_first[1:])
    run_start = backslashes[np.maximum.accumulate(np.where(run_first, np.arange(len(backslashes)), 0))]
    before = np.searchsorted(backslashes, quotes) - 1
    adjacent = (before >= 0) & (backslashes[np.maximum(before, 0)] == quotes - 1)
    return adjacent & ((quotes - run_start[np.maximum(before, 0)]) % 2 == 1)


def _put_decoded(text: str, starts: np.ndarray, ends: np.ndarray, rewritten: np.ndarray,
                 values: list[str | None]) -> tuple[str, np.ndarray, np.ndarray]:
    """`text` with the raw text of each rewritten span replaced by its decoded value, and the
    spans moved to match."""
    pieces: list[str] = []
    at = 0
    delta = np.zeros(len(starts), dtype=np.int64)
    for i in np.flatnonzero(rewritten).tolist():
        value = values[i]
        assert value is not None
        pieces += [text[at : int(starts[i])], value]
        at = int(ends[i])
        delta[i] = len(value) - (at - int(starts[i]))
    pieces.append(text[at:])
    grown = np.cumsum(delta)
    return "".join(pieces), starts + grown - delta, ends + grown
