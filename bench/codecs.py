"""Records/s of the format codecs alone (no mechanism): the JSONL splice against re-serialising.

    .venv/bin/python bench/codecs.py [--records 200000]

The perturbation is the identity here, so the figure is the codec's own cost per record: parse,
locate the field, splice, encode. The columnar rows are what the CLI runs (a chunk validated at
once by msgspec, the values found with numpy, one in-place call for the chunk); the per-record
rows are the fallback for chunks the columnar path hands back. The old path (json.loads + json.dumps per record) is timed on
the same lines for comparison. Short, tweet-like records: the case where per-record work matters.
"""

from __future__ import annotations

import argparse
import json
import time

from privtext.codecs import jsonl as jsonl_codec
from privtext.codecs import text as text_codec
from privtext.text import ChunkCounters

WORDS = "the government said report was new and market fell times people city team police".split()


def identity(texts: list[str]) -> tuple[list[str], ChunkCounters]:
    return texts, ChunkCounters(records=len(texts))


def identity_spans(text: str, starts: object, ends: object) -> tuple[str, object, object, ChunkCounters]:
    """The columnar paths' in-place perturbation, as the identity."""
    return text, starts, ends, ChunkCounters()


def lines(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(26))
        out.append(json.dumps({"id": i, "user": {"name": f"u{i}", "followers": i * 3},
                               "text": text, "lang": "en", "score": i / 7}).encode() + b"\n")
    return out


def rate(fn, data: list[bytes], chunk: int = 1000) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for i in range(0, len(data), chunk):
        fn(data[i : i + chunk])
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    data = lines(args.records)
    words = 26 * len(data)

    def splice(chunk: list[bytes]) -> bytes:
        return jsonl_codec.transform(chunk, 1, ["text"], "fail", identity).payload

    def columnar(chunk: list[bytes]) -> bytes:
        return jsonl_codec.transform(chunk, 1, ["text"], "fail", identity, identity_spans).payload

    def reserialise(chunk: list[bytes]) -> bytes:
        out = []
        for raw in chunk:
            record = json.loads(raw)
            record["text"] = identity([record["text"]])[0][0]
            out.append(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        return b"".join(out)

    def text(chunk: list[bytes]) -> bytes:
        return text_codec.transform(chunk, 1, ["text"], "fail", identity).payload

    def text_columnar(chunk: list[bytes]) -> bytes:
        return text_codec.transform(chunk, 1, ["text"], "fail", identity, identity_spans).payload

    for fn in (splice, columnar, text, text_columnar):
        assert fn(data[:100]) == b"".join(data[:100])  # byte-faithful
    for name, fn in (("jsonl columnar (privtext)", columnar), ("jsonl per record", splice),
                     ("json.loads + json.dumps", reserialise),
                     ("text lines, columnar", text_columnar), ("text lines, per line", text)):
        r = rate(fn, data)
        print(f"{name:26s} {r:12,.0f} records/s  ({r * words / len(data) / 1e6:5.1f}M words/s at 26 words/record)")


if __name__ == "__main__":
    main()
