"""The format codecs: format inference, compression, line chunking, the JSONL splice, text, Parquet.

The line codecs are driven with a plain function standing in for the perturbation: these tests
are about which bytes a codec keeps and where it splices, so the replacement is made visible
(upper case); tests/test_cli.py and tests/test_faults.py run the same codecs with the real
mechanism end to end.
"""

from __future__ import annotations

import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from privtext.codecs import (
    Format,
    format_of_name,
    infer_format,
    iter_line_chunks,
    open_input,
)
from privtext.codecs import jsonl as jsonl_codec
from privtext.codecs import text as text_codec
from privtext.codecs.compression import compress_piece, split_compression
from privtext.codecs.lines import RecordError
from privtext.codecs.parquet import ParquetSink, ParquetSource, column_values, rebuild
from privtext.errors import InputFormatError, UsageError
from privtext.text import ChunkCounters


def upper(texts: list[str]) -> tuple[list[str], ChunkCounters]:
    return [t.upper() for t in texts], ChunkCounters(records=len(texts))


def splice(line: bytes, field: str = "text", on_error: str = "fail") -> bytes:
    out = jsonl_codec.transform([line], 1, field.split("."), on_error, upper)
    assert out.error is None, out.error
    return out.payload


# --- names and formats ----------------------------------------------------------------------


def test_format_inference_and_compression_suffixes() -> None:
    assert format_of_name("a/b.jsonl.gz") is Format.JSONL
    assert format_of_name("x.PARQUET") is Format.PARQUET
    assert format_of_name("notes.txt.zst") is Format.TEXT
    assert format_of_name("x.csv") is None
    assert split_compression("a.jsonl.ZST") == ("a.jsonl", ".zst")
    assert split_compression("a.jsonl") == ("a.jsonl", None)
    assert infer_format("-", "text") is Format.TEXT
    with pytest.raises(UsageError, match="pass --format"):
        infer_format("x.csv", None)
    with pytest.raises(UsageError, match="stdin"):
        infer_format("-", None)


# --- compression ------------------------------------------------------------------------------


def test_compressed_pieces_concatenate_into_one_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zstandard

    parts = [b"a\n" * 1000, b"b\n" * 10, b"c\n"]
    gz = b"".join(compress_piece(p, ".gz") for p in parts)
    assert gzip.decompress(gz) == b"".join(parts)
    assert compress_piece(b"x", ".gz") == compress_piece(b"x", ".gz")  # mtime 0: deterministic
    zst = b"".join(compress_piece(p, ".zst") for p in parts)
    (tmp_path / "a.jsonl.zst").write_bytes(zst)
    with open_input(str(tmp_path / "a.jsonl.zst")) as fh:
        assert fh.read() == b"".join(parts)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(zst), read_across_frames=True)
    assert reader.read() == b"".join(parts)


@pytest.mark.parametrize("ext", [".gz", ".zst"])
def test_truncated_input_names_the_file_and_the_offset(tmp_path, ext: str) -> None:  # type: ignore[no-untyped-def]
    data = b"".join(b'{"text": "line %d"}\n' % i for i in range(50_000))
    packed = compress_piece(data, ext)
    path = tmp_path / f"in.jsonl{ext}"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputFormatError) as info, open_input(str(path)) as fh:
        for _ in iter_line_chunks(fh, 1000):
            pass
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "decompressed bytes" in message
    offset = int(message.split(" after ")[1].split()[0])
    assert 0 < offset < len(data)


def test_a_plain_file_named_gz_is_a_data_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(b'{"text": "not compressed"}\n')
    with pytest.raises(InputFormatError, match="not a valid gzip file"), open_input(str(path)) as fh:
        fh.read()


# --- line chunks ----------------------------------------------------------------------------------


def test_line_chunks_end_at_the_record_count_or_the_byte_cap() -> None:
    lines = [b"x" * 10 + b"\n"] * 10 + [b"y" * 100 + b"\n"] * 3 + [b"last"]  # 11, 101 and 4 bytes
    chunks = list(iter_line_chunks(io.BytesIO(b"".join(lines)), 4, max_bytes=150))
    assert [len(c.lines) for c in chunks] == [4, 4, 4, 2]  # the third ends at the byte cap
    assert [c.first_line for c in chunks] == [1, 5, 9, 13]
    assert chunks[-1].end_offset == len(b"".join(lines))
    assert b"".join(b"".join(c.lines) for c in chunks) == b"".join(lines)
    # starting again at a boundary cuts the rest exactly as before (what --resume relies on)
    rest = b"".join(lines)[chunks[2].end_offset :]
    again = list(iter_line_chunks(io.BytesIO(rest), 4, max_bytes=150, first_line=13,
                                  offset=chunks[2].end_offset))
    assert [(c.first_line, c.end_offset) for c in again] == [(c.first_line, c.end_offset) for c in chunks[3:]]


# --- the JSONL splice -----------------------------------------------------------------------------


def test_only_the_field_bytes_change() -> None:
    line = (b'{ "id" :  12345678901234567890123456789 ,"f":1e400, "g": -0.0e-0,"esc":"\\u00e9\\n\\ud83d\\ude00",'
            b'"text" : "the caf\\u00e9 \\"quoted\\"",\t"nested": {"text": "inner"}, "arr": [1, {"text": "x"}] }')
    out = splice(line + b"\n")
    start = line.index(b'"text" : ') + len(b'"text" : ')
    end = line.index(b',\t"nested"')
    assert out[:start] == line[:start] and out[start + 1 :].endswith(line[end:] + b"\n")
    assert json.loads(out)["text"] == 'THE CAFÉ "QUOTED"'
    assert out.count(b"inner") == 1 and b'"text": "x"' in out  # other levels untouched


def test_duplicate_keys_are_all_perturbed_and_kept() -> None:
    out = jsonl_codec.transform([b'{"text": "a", "n": 1, "text": "b"}\n'], 1, ["text"], "fail", upper)
    assert out.payload == b'{"text": "A", "n": 1, "text": "B"}\n'
    assert out.counters.records == 1  # one record, two values


def test_nested_field_by_path_and_crlf_ending() -> None:
    assert splice(b'{"doc": {"lang": "en", "body": "hi there"}, "body": "top"}\r\n', "doc.body") == \
        b'{"doc": {"lang": "en", "body": "HI THERE"}, "body": "top"}\r\n'


def test_output_escaping_is_valid_json_for_any_replacement() -> None:
    def weird(texts: list[str]) -> tuple[list[str], ChunkCounters]:
        return ['"\\\n\t\x00\u2028é😀' for _ in texts], ChunkCounters(records=len(texts))

    out = jsonl_codec.transform([b'{"text": "x"}'], 1, ["text"], "fail", weird)
    assert json.loads(out.payload)["text"] == '"\\\n\t\x00\u2028é😀'
    assert not out.payload.endswith(b"\n")  # a last line without a newline stays without one


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"text": "a\\ud800b"}', "lone surrogate"),
    (b'{"text": "bad \\x escape"}', "not valid JSON"),
    (b'{"text": "a"', "not valid JSON"),
    (b'{"text": "a"} trailing', "not valid JSON"),
    (b'["text"]', "not a JSON object"),
    (b'{"txt": "a"}', "field 'text' is missing"),
    (b'{"text": 5}', "field 'text' is not a string"),
    (b'{"text": "\xff"}', "not valid UTF-8"),
])
def test_invalid_records_fall_under_on_error(line: bytes, reason: str) -> None:
    lines = [b'{"text": "ok"}\n', line + b"\n", b"\n"]
    fail = jsonl_codec.transform(lines, 7, ["text"], "fail", upper)
    assert fail.error is not None and fail.error[0] == 8 and reason in fail.error[1]
    skip = jsonl_codec.transform(lines, 7, ["text"], "skip", upper)
    assert skip.payload == b'{"text": "OK"}\n\n' and skip.counters.errors_skipped == 1
    keep = jsonl_codec.transform(lines, 7, ["text"], "keep", upper)
    assert keep.payload == b'{"text": "OK"}\n' + line + b"\n\n" and keep.counters.errors_kept == 1


def test_a_null_field_passes_through_like_a_null_parquet_value() -> None:
    lines = [b'{"text": null, "id": 1}\n', b'{"doc": {"text": null}}\n', b'{"text": "ok"}\n']
    out = jsonl_codec.transform(lines[:1] + lines[2:], 1, ["text"], "fail", upper)
    assert out.error is None and out.payload == b'{"text": null, "id": 1}\n{"text": "OK"}\n'
    assert out.counters.records == 2 and out.counters.null_values == 1
    nested = jsonl_codec.transform(lines[1:2], 1, ["doc", "text"], "fail", upper)
    assert nested.payload == lines[1] and nested.counters.null_values == 1
    # a duplicated key with a null and a string: the string is perturbed, the null kept
    both = jsonl_codec.transform([b'{"text": null, "text": "a"}'], 1, ["text"], "fail", upper)
    assert both.payload == b'{"text": null, "text": "A"}' and both.counters.null_values == 0


def test_locate_never_puts_content_in_reasons() -> None:
    with pytest.raises(RecordError) as info:
        jsonl_codec.locate('{"secret words": 1}', ["text"])
    assert "secret" not in str(info.value)


# --- text ------------------------------------------------------------------------------------------


def test_text_lines_keep_endings_and_blank_lines() -> None:
    out = text_codec.transform([b"one two\r\n", b"\n", b"three"], 1, ["text"], "fail", upper)
    assert out.payload == b"ONE TWO\r\n\nTHREE" and out.counters.records == 3
    bad = text_codec.transform([b"ok\n", b"\xff\xfe\n"], 1, ["text"], "fail", upper)
    assert bad.error == (2, "not valid UTF-8")


# --- Parquet ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("col_type", [pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string())])
def test_parquet_rebuild_keeps_the_column_type(col_type: pa.DataType) -> None:
    values = ["a b", None, "a b", "c"]
    column = pa.array(values, type=col_type) if not pa.types.is_dictionary(col_type) else \
        pa.array(values).dictionary_encode()
    batch = pa.RecordBatch.from_arrays([pa.array([1, 2, 3, 4]), column], names=["id", "text"])
    got = column_values(batch, "text")
    assert got == values
    new = rebuild(batch, "text", [v.upper() if v else v for v in got])
    assert new.schema.equals(batch.schema)
    assert new.column(1).to_pylist() == ["A B", None, "A B", "C"]


def test_parquet_keeps_row_groups_and_codec(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = pa.table({"id": list(range(250)), "text": [f"t {i}" for i in range(250)]})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=100, compression="gzip")
    source = ParquetSource.open(str(src))
    assert source.compression() == "gzip"
    chunks = list(source.chunks(40))
    assert [(c.row_group, c.batch.num_rows, c.last_in_group) for c in chunks] == [
        (0, 40, False), (0, 40, False), (0, 20, True), (1, 40, False), (1, 40, False), (1, 20, True),
        (2, 40, False), (2, 10, True)]
    out = tmp_path / "out.parquet"
    sink = ParquetSink(str(out), source.schema, source.compression())
    group: list[pa.RecordBatch] = []
    for chunk in chunks:
        group.append(chunk.batch)
        if chunk.last_in_group:
            sink.write_group(group)
            group = []
    sink.close()
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [100, 100, 50]
    assert meta.row_group(0).column(1).compression == "GZIP"
    assert pq.read_table(out).equals(table)


def test_parquet_field_checks_and_unreadable_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"n": [1], "text": ["a"]}), src)
    source = ParquetSource.open(str(src))
    with pytest.raises(UsageError, match="not a top-level column"):
        source.check_field("body")
    with pytest.raises(UsageError, match="not string"):
        source.check_field("n")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputFormatError, match=r"cannot read .* as Parquet"):
        ParquetSource.open(str(tmp_path / "fake.parquet"))


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"a": {"text": "inner"}, "te\\u0078t": "outer"}', b'{"a": {"text": "inner"}, "te\\u0078t": "OUTER"}'),
    (b'{"say \\"text": "k", "text": "v"}', b'{"say \\"text": "k", "text": "V"}'),
    (b'{"note": "a \\"text\\": b", "text": "v"}', b'{"note": "a \\"text\\": b", "text": "V"}'),
    (b'{"a.b+": "x", "text": "v"}', b'{"a.b+": "x", "text": "V"}'),
])
def test_the_fast_path_never_splices_the_wrong_occurrence(line: bytes, expected: bytes) -> None:
    assert splice(line) == expected


def test_a_key_with_regex_characters() -> None:
    out = jsonl_codec.transform([b'{"c++": "x y", "z": 1}'], 1, ["c++"], "fail", upper)
    assert out.payload == b'{"c++": "X Y", "z": 1}'


def test_json_string_encoding_is_the_standard_librarys_byte_for_byte() -> None:
    import json.encoder
    import random

    from privtext.codecs.jsonl import _encode

    rng = random.Random(7)
    cases = ["plain", 'a "quote"', "back\\slash", "tab\t", "line\n", "\x7f", "\u2028", "é 日本",
             "", "\x00", "\U0001F600", "a\u0301", "\ud800"]
    for _ in range(5000):
        cases.append("".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0xE000),
                                             rng.randrange(0x10000, 0x10400)]))
                             for _ in range(rng.randrange(0, 12))))
    for text in cases:
        assert _encode(text) == json.encoder.encode_basestring(text)  # type: ignore[attr-defined]


# --- the columnar JSONL path ------------------------------------------------------------------

_WORDS = ["the", "The", "CITY", "police", "said", "naïve", "日本", "zzqxv", "Ünïcode", "e\u0301t\u00e9",
          "İstanbul", "", "a", "x1", "MARKET"]
_GAPS = [" ", "  ", ", ", "! ", "\t", " \u2028 ", "😀 ", "-", "\u200d"]


def _random_value(rng: random.Random) -> str:
    return "".join(rng.choice(_WORDS) + rng.choice(_GAPS) for _ in range(rng.randrange(0, 9)))


def _random_record(rng: random.Random, i: int) -> bytes:
    """A JSONL line of one of the shapes the columnar path must place or hand back."""
    value = _random_value(rng)
    shape = rng.randrange(12)
    if shape == 0:
        line = json.dumps({"id": i, "text": value})  # \u escapes: parsed one by one
    elif shape == 1:
        line = json.dumps({"text": value + ' "q" \\ \n'}, ensure_ascii=False)  # escapes in the value
    elif shape == 2:
        line = json.dumps({"text": value, "meta": {"text": "inner"}}, ensure_ascii=False)  # key twice
    elif shape == 3:
        quoted = json.dumps(value, ensure_ascii=False)
        line = '{"text": ' + quoted + ', "text": ' + json.dumps(value[::-1]) + '}'  # duplicate key
    elif shape == 4:
        line = json.dumps({"text": None, "n": 1e300})
    elif shape == 5:
        line = '{ "big": 123456789012345678901234567890, "text" :' + json.dumps(value) + ' }'  # space before ':'
    elif shape == 6:
        line = json.dumps({"text": value}, ensure_ascii=False, separators=(",", ":"))
    elif shape == 7:
        line = json.dumps({"note": 'say "text": no', "text": value}, ensure_ascii=False)
    else:
        line = json.dumps({"label": "x", "text": value, "n": [1, 2.5e-3, None]}, ensure_ascii=False)
    ending = rng.choice(["\n", "\n", "\r\n"])
    return (line + ending).encode("utf-8")


def _both_paths(glove_small, lines: list[bytes], seed: int):  # type: ignore[no-untyped-def]
    """(columnar output, per-record output) of one chunk on the same stream of two equal objects."""
    from privtext.api import Anonymizer

    outs = []
    calls: list[int] = []
    for columnar in (True, False):
        anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=seed, oov="keep" if seed % 2 else "mask")

        def perturb(texts: list[str], anon: Anonymizer = anon) -> tuple[list[str], ChunkCounters]:
            return anon.perturb_batch(texts, (0, 0))  # type: ignore[return-value]

        def spans(text, starts, ends, anon: Anonymizer = anon):  # type: ignore[no-untyped-def]
            calls.append(len(lines))
            return anon.perturb_spans(text, starts, ends, (0, 0))

        outs.append(jsonl_codec.transform(lines, 1, ["text"], "fail", perturb, spans if columnar else None))
    return outs[0], outs[1], calls


def test_the_columnar_path_writes_the_per_record_paths_bytes(glove_small) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(11)
    for seed in range(40):
        lines = [_random_record(rng, i) for i in range(rng.randrange(1, 60))]
        if rng.random() < 0.3:
            lines[-1] = lines[-1].rstrip(b"\r\n")  # a last line without its newline
        columnar, per_record, calls = _both_paths(glove_small, lines, seed)
        assert calls == [len(lines)]  # every chunk here is valid JSONL: the columnar path took it
        assert columnar.error is None and per_record.error is None
        assert columnar.payload == per_record.payload
        for name in ("records", "word_tokens", "other_tokens", "perturbed", "unchanged", "oov", "null_values"):
            assert getattr(columnar.counters, name) == getattr(per_record.counters, name), name
        assert columnar.counters.doc_hist.tolist() == per_record.counters.doc_hist.tolist()
        for line in columnar.payload.splitlines():
            json.loads(line)


def test_the_columnar_path_takes_plain_chunks_and_hands_back_the_rest() -> None:
    taken: list[int] = []

    def spans(text, starts, ends):  # type: ignore[no-untyped-def]
        taken.append(len(starts))
        return text.upper(), starts, ends, ChunkCounters()

    plain = [b'{"id": 1, "text": "a b"}\n', b'{"text":"c","x":[1,{"y":"z"}]}\r\n', b'{"text": "\\u00e9\\"q"}\n']
    out = jsonl_codec._transform_columnar(plain, "text", spans)
    assert out is not None and taken == [3] and out.counters.records == 3
    assert out.payload.splitlines()[2] == '{"TEXT": "É\\"Q"}'.encode()  # re-escaped as _encode writes
    for chunk in ([b'{"text": "a"}\n', b"\n"], [b'{"text": "a"} {"text": "b"}\n'], [b'{"text": 1}\n'],
                  [b'{"other": "a"}\n'], [b'{"text": "a"}\n', b"{broken\n"], [b'{"text": "\xff"}\n'],
                  [b'{"text": "\\ud800"}\n'], [b'["text"]\n'], [b'{"text": "a", "n": NaN}\n']):
        assert jsonl_codec._transform_columnar(chunk, "text", spans) is None, chunk
    assert jsonl_codec._transform_columnar(plain, "a/b", spans) is None  # '/' may be written \/
    # A record longer than a chunk keeps the per-record path, which perturbs it in pieces.
    from privtext.codecs.lines import COLUMNAR_MAX_BYTES

    huge = b"a " * (COLUMNAR_MAX_BYTES // 2 + 1)
    assert jsonl_codec._transform_columnar([b'{"text": "' + huge + b'"}\n'], "text", spans) is None
    assert text_codec._transform_columnar([huge + b"\n"], spans) is None
    assert taken == [3]


def test_the_text_formats_columnar_path_writes_the_per_line_paths_bytes(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.api import Anonymizer

    rng = random.Random(3)
    for seed in range(20):
        lines = [(_random_value(rng) + rng.choice(["\n", "\r\n", "\r\r\n", "\n"])).encode()
                 for _ in range(rng.randrange(1, 50))]
        lines[rng.randrange(len(lines))] = rng.choice([b"\n", b"\r\n", b" \n"])  # blank lines are records
        if seed % 3 == 0:
            lines[-1] = lines[-1].rstrip(b"\r\n")
        outs, calls = [], []
        for columnar in (True, False):
            anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=seed)

            def spans(text, starts, ends, anon=anon, calls=calls):  # type: ignore[no-untyped-def]
                calls.append(1)
                return anon.perturb_spans(text, starts, ends, (0, 0))

            outs.append(text_codec.transform(lines, 1, [], "fail", lambda t, anon=anon: anon.perturb_batch(t, (0, 0)),
                                             spans if columnar else None))
        assert calls == [1]
        assert outs[0].payload == outs[1].payload
        assert outs[0].counters.records == outs[1].counters.records == len(lines)
        assert outs[0].counters.doc_hist.tolist() == outs[1].counters.doc_hist.tolist()
    bad = [b"ok\n", b"\xff\n"]
    assert text_codec.transform(bad, 1, [], "fail", upper, lambda *a: pytest.fail("not UTF-8")).error == (2, "not valid UTF-8")
