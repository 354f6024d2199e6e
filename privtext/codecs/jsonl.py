"""JSON Lines: only the bytes of the perturbed string value change.

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
from typing import Any

from privtext.codecs.lines import LinesOut, RecordError, transform_lines

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


_QUOTED_KEYS: dict[str, str] = {}


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
    quoted = _QUOTED_KEYS.get(key)
    if quoted is None:
        quoted = _QUOTED_KEYS.setdefault(key, json.dumps(key, ensure_ascii=False))
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
              perturb: Callable[[list[str]], tuple[list[str], Any]]) -> LinesOut:
    return transform_lines(lines, first_line, JsonlRecords(path), on_error, perturb, skip_blank=True)
