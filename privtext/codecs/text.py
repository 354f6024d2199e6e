"""Plain text: one document per line; line endings (LF or CRLF) and blank lines are kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from privtext.codecs.lines import LinesOut, RecordError, transform_lines


class TextRecords:
    def parse(self, body: memoryview) -> tuple[Any, list[str]]:
        try:
            return None, [str(body, "utf-8")]
        except UnicodeDecodeError:
            raise RecordError("not valid UTF-8") from None

    def render(self, state: Any, texts: list[str], ending: str) -> bytes:
        return (texts[0] + ending).encode("utf-8") if ending else texts[0].encode("utf-8")


def transform(lines: list[bytes], first_line: int, path: list[str], on_error: str,
              perturb: Callable[[list[str]], tuple[list[str], Any]]) -> LinesOut:
    return transform_lines(lines, first_line, TextRecords(), on_error, perturb, skip_blank=False)
