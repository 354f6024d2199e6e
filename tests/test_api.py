"""The façade: privtext.Anonymizer, Counters, build_report, pickling, streams, thread limits."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import privtext
from privtext.api import Anonymizer, restore
from privtext.counters import Counters
from privtext.errors import IndexCacheError, InputTypeError, UsageError
from privtext.report import build_report

TEXTS = [
    "The government said the report was new, and the market fell 3 times.",
    None,
    "Police in the city closed the road on Monday.",
    "",
    "The TEAM won the final game of the season.",
]
LONG = " ".join(["the president of the company said that the market would change"] * 20)


@pytest.fixture
def anon(glove_small) -> Anonymizer:  # type: ignore[no-untyped-def]
    return Anonymizer("gumbel", epsilon=300, index=glove_small, seed="api-test")


def _env(cache_root: Path) -> dict[str, str]:
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root), "PYTHONUNBUFFERED": "1"}


# --- perturb: lists ---------------------------------------------------------------------------


def test_perturb_keeps_nulls_order_and_counts_them(anon: Anonymizer) -> None:
    out = anon.perturb(TEXTS)
    assert len(out) == len(TEXTS)
    assert out[1] is None and out[3] == ""
    assert all(isinstance(t, str) for i, t in enumerate(out) if i != 1)
    c = anon.counters
    assert c.records == 4 and c.null_values == 1
    assert c.word_tokens == 13 + 9 + 9  # words and numbers; "," and "." are other tokens
    assert c.perturbed + c.oov == c.word_tokens


def test_a_bare_string_is_refused_with_a_type_error(anon: Anonymizer) -> None:
    with pytest.raises(InputTypeError, match=r"wrap it: anon.perturb\(\[text\]\)") as info:
        anon.perturb("The patient called.")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, privtext.PrivtextError)
    with pytest.raises(InputTypeError, match="item 1 is a int"):
        anon.perturb(["fine", 7])  # type: ignore[list-item]
    assert anon.counters.records == 0  # nothing was perturbed, no stream was spent


def test_unknown_mechanism_oov_or_params_fail_before_any_index_work(tmp_path: Path) -> None:
    missing = tmp_path / "never-built"
    with pytest.raises(UsageError, match="unknown mechanism"):
        Anonymizer("nope", epsilon=1, cache_dir=missing)
    with pytest.raises(UsageError, match="oov must be one of"):
        Anonymizer("gumbel", epsilon=1, oov="leak", cache_dir=missing)
    with pytest.raises(UsageError, match="unknown parameter"):
        Anonymizer("gumbel", epsilon=1, params={"bogus": 1}, cache_dir=missing)
    with pytest.raises(UsageError, match="epsilon"):
        Anonymizer("gumbel", epsilon=-1, cache_dir=missing)
    assert not missing.exists()


# --- perturb_arrow ------------------------------------------------------------------------------


@pytest.mark.parametrize("string_type", [pa.string(), pa.large_string()])
def test_perturb_arrow_keeps_types_nulls_columns_and_metadata(anon: Anonymizer, string_type: pa.DataType) -> None:
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("text", string_type, metadata={b"k": b"v"}),
                        pa.field("tag", pa.string())], metadata={b"origin": b"test"})
    batch = pa.RecordBatch.from_arrays(
        [pa.array(range(5)), pa.array(TEXTS, type=string_type), pa.array(list("abcde"))], schema=schema)
    out = anon.perturb_arrow(batch, column="text", stream=(3, 0))
    assert isinstance(out, pa.RecordBatch)
    assert out.schema.equals(schema, check_metadata=True)
    assert out.column(0).equals(batch.column(0)) and out.column(2).equals(batch.column(2))
    texts = out.column(1).to_pylist()
    assert texts[1] is None and texts[3] == "" and texts[0] != TEXTS[0]

    table = pa.Table.from_batches([batch, batch])
    out_table = anon.perturb_arrow(table, column="text", stream=(3, 1))
    assert isinstance(out_table, pa.Table) and out_table.num_rows == 10
    assert out_table.schema.equals(schema, check_metadata=True)
    assert out_table.column("id").to_pylist() == list(range(5)) * 2


def test_perturb_arrow_decodes_dictionary_columns(anon: Anonymizer) -> None:
    column = pa.array(TEXTS).dictionary_encode()
    table = pa.table({"text": column, "n": pa.array(range(5))})
    out = anon.perturb_arrow(table, stream=0)
    assert out.schema.field("text").type == pa.string()
    assert out.column("text").null_count == 1
    assert out.column("n").to_pylist() == list(range(5))


def test_perturb_arrow_refuses_bad_columns_in_one_line(anon: Anonymizer) -> None:
    table = pa.table({"body": ["x"], "n": [1]})
    with pytest.raises(UsageError, match="pass column= with one of: body, n"):
        anon.perturb_arrow(table)
    with pytest.raises(InputTypeError, match="has type int64, not string"):
        anon.perturb_arrow(table, column="n")
    with pytest.raises(InputTypeError, match="RecordBatch or Table"):
        anon.perturb_arrow({"text": ["x"]})


# --- randomness ----------------------------------------------------------------------------------


def test_explicit_streams_reproduce_with_a_seed_and_differ_between_streams(glove_small) -> None:  # type: ignore[no-untyped-def]
    a = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=7)
    b = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=7)
    c = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=8)
    assert a.perturb([LONG], stream=(1, 2)) == b.perturb([LONG], stream=(1, 2))
    assert a.perturb([LONG], stream=(1, 3)) != b.perturb([LONG], stream=(2, 1))
    assert c.perturb([LONG], stream=(1, 2)) != a.perturb([LONG], stream=(5, 5))
    assert a.perturb([LONG], stream=9) == b.perturb([LONG], stream=(0, 9))  # an int n is (0, n)


def test_implicit_streams_are_reproducible_with_a_seed_and_apart_from_explicit_ones(glove_small) -> None:  # type: ignore[no-untyped-def]
    a = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=7)
    b = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=7)
    first, second = a.perturb([LONG]), a.perturb([LONG])
    assert first != second  # each call takes the next stream
    assert b.perturb([LONG]) == first and b.perturb([LONG]) == second
    # implicit call 0 is not explicit stream 0 (nor (0, 0)): separate namespaces
    assert b.perturb([LONG], stream=0) != first
    # without a seed, every object draws its own run key
    x = Anonymizer("gumbel", epsilon=300, index=glove_small)
    y = Anonymizer("gumbel", epsilon=300, index=glove_small)
    assert x.perturb([LONG], stream=0) != y.perturb([LONG], stream=0)


def test_reusing_a_stream_raises(anon: Anonymizer) -> None:
    anon.perturb(["the man"], stream=(0, 4))
    with pytest.raises(UsageError, match=r"stream \(0, 4\) was already used"):
        anon.perturb(["the man"], stream=4)
    with pytest.raises(UsageError, match=r"stream \(0, 4\) was already used"):
        anon.perturb_arrow(pa.table({"text": ["the man"]}), stream=(0, 4))
    for bad in (-1, (1, 2, 3), "a", (1.5, 2), True):
        with pytest.raises(UsageError, match="stream= must be"):
            anon.perturb(["x"], stream=bad)  # type: ignore[arg-type]


def test_explicit_stream_is_exactly_the_cli_chunk(tmp_path: Path, glove_small, cache_root: Path) -> None:  # type: ignore[no-untyped-def]
    lines = [f"The president said the market fell {i} times in the city." for i in range(10)]
    src = tmp_path / "in.txt"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out.txt"
    subprocess.run([sys.executable, "-m", "privtext", "perturb", str(src), "-o", str(out), "--epsilon", "300",
                    "--seed", "cli-equal", "--chunk-size", "4", "--workers", "1", "-q", "--vocab-size", "2000"],
                   env=_env(cache_root), check=True, capture_output=True, timeout=300)
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed="cli-equal")
    ours = []
    for chunk, start in enumerate(range(0, 10, 4)):
        ours += anon.perturb(lines[start:start + 4], stream=(0, chunk))
    assert out.read_text().splitlines() == ours


# --- pickling ------------------------------------------------------------------------------------


def test_pickle_is_small_and_a_copy_reproduces_the_original(anon: Anonymizer) -> None:
    blob = pickle.dumps(anon)
    assert len(blob) < 8_000, len(blob)  # spec + run key; the index arrays stay on disk
    assert b"_reconstruct" not in blob and b"ndarray" not in blob  # no numpy array inside
    copy = pickle.loads(blob)
    assert copy.perturb([LONG], stream=(2, 0)) == anon.perturb([LONG], stream=(2, 0))
    with pytest.raises(UsageError, match="pass stream="):
        copy.perturb([LONG])
    assert copy.counters.records == 1  # copies count for themselves


def test_unpickling_without_the_cache_names_the_fix(tmp_path: Path, glove_small) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    shutil.copytree(glove_small.path, cache)
    anon = Anonymizer("gumbel", epsilon=300, index=cache, seed=1)
    blob = pickle.dumps(anon)
    moved = tmp_path / "moved"
    cache.rename(moved)
    with pytest.raises(IndexCacheError, match=r"is not on this machine.*ship_index=True") as info:
        pickle.loads(blob)
    assert "\n" not in str(info.value)
    # a shipped copy of the same cache is accepted
    shipped = restore(anon.state(), index_path=moved)
    assert shipped.perturb([LONG], stream=1) == restore(anon.state(), index_path=moved).perturb([LONG], stream=1)
    # a cache with a different manifest is refused
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["created"] = "another build"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCacheError, match="manifest digest differs"):
        restore(anon.state(), index_path=moved)


_PROBE = """
import json, pickle, sys
import privtext
mode, path = sys.argv[1], sys.argv[2]
if mode == "open":
    anon = privtext.Anonymizer("gumbel", epsilon=300, vocab_size=2000)
else:
    anon = pickle.loads(open(path, "rb").read())
out = anon.perturb(["The president said the market fell."], stream=0)
print(json.dumps({"ok": isinstance(out[0], str), **{m: m in sys.modules for m in ("gensim", "scipy")}}))
"""


@pytest.mark.parametrize("mode", ["open", "unpickle"])
def test_an_existing_cache_opens_without_gensim_or_scipy(tmp_path: Path, glove_small, cache_root: Path,
                                                          mode: str) -> None:  # type: ignore[no-untyped-def]
    blob = tmp_path / "anon.pkl"
    blob.write_bytes(pickle.dumps(Anonymizer("gumbel", epsilon=300, index=glove_small)))
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode, str(blob)], env=_env(cache_root),
                          capture_output=True, timeout=300, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"ok": True, "gensim": False, "scipy": False}


# --- counters and reports ----------------------------------------------------------------------


def test_counters_round_trip_through_json_and_merge(anon: Anonymizer) -> None:
    anon.perturb(TEXTS, stream=0)
    c = anon.counters
    again = Counters.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    merged = Counters.from_dict(c.to_dict()).merge(c)
    assert merged.records == 2 * c.records and merged.doc_hist.sum() == 2 * c.doc_hist.sum()
    assert Counters.sum([c.to_dict(), c]) == merged
    with pytest.raises(UsageError, match="unknown counter"):
        Counters.from_dict({"records": 1, "words": 2})
    with pytest.raises(UsageError, match="non-negative"):
        Counters.from_dict({"records": -1})
    from privtext.text import ChunkCounters

    assert ChunkCounters is Counters  # the old name keeps working


def test_merged_copies_report_like_one_object(glove_small) -> None:  # type: ignore[no-untyped-def]
    whole = Anonymizer("gumbel", epsilon=300, index=glove_small, seed=3)
    batches = [TEXTS, [LONG, None], TEXTS[::-1]]
    for i, batch in enumerate(batches):
        whole.perturb(batch, stream=(0, i))
    parts = []
    for i, batch in enumerate(batches):  # as an engine would: one copy per partition
        copy = pickle.loads(pickle.dumps(whole))
        copy.perturb(batch, stream=(0, i))
        parts.append(copy.counters.to_dict())
    merged = Counters.sum(parts)
    assert merged == whole.counters
    report = privtext.build_report(whole.spec, merged, {"engine": {"name": "test", "partitions": 3}})
    assert report["counts"] == whole.report()["counts"]
    assert report["engine"] == {"name": "test", "partitions": 3}
    assert report["mechanism"]["name"] == "gumbel" and report["mechanism"]["epsilon"] == 300
    assert report["randomness"]["mode"] == "seeded" and report["randomness"]["seed_sha256"]
    assert report["per_document"]["documents"] == merged.records


def test_report_holds_no_text(glove_small) -> None:  # type: ignore[no-untyped-def]
    anon = Anonymizer("gumbel", epsilon=300, index=glove_small, oov="mask")
    secret = "Zyxwvut"
    anon.perturb([f"The president met {secret} in the city.", None])
    report = anon.report()
    text = json.dumps(report)
    assert secret.lower() not in text.lower() and "president" not in text
    assert report["counts"]["null_values"] == 1 and report["counts"]["oov"]["masked"] == 1
    assert report["engine"] == {"name": "library"}


def test_build_report_is_the_cli_core(anon: Anonymizer) -> None:
    from privtext.run.perturb import PerturbOutcome
    from privtext.settings import PerturbSettings

    anon.perturb(TEXTS, stream=0)
    settings = PerturbSettings(mechanism="gumbel", epsilon=300, seed="api-test", workers=1)
    outcome = PerturbOutcome(anon.counters, 1.0, anon.mechanism, "jsonl", 1, settings)
    cli_report = build_report(outcome)
    lib_report = build_report(anon.spec, anon.counters, {"seconds": 1.0})
    for section in ("mechanism", "guarantee", "embedding", "geometry", "counts", "per_document", "timing"):
        if section == "counts":
            cli_report[section]["errors"]["policy"] = None  # the CLI states its --on-error policy
        assert cli_report[section] == lib_report[section], section


# --- the front door ------------------------------------------------------------------------------


def test_import_privtext_is_cheap_and_exports_the_front_door() -> None:
    code = ("import sys, privtext; heavy = [m for m in ('numpy', 'faiss', 'pyarrow', 'gensim') "
            "if m in sys.modules]; print(heavy); print(privtext.Anonymizer.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.splitlines() == ["[]", "privtext.api"]
    for name in ("Anonymizer", "Counters", "build_report", "list_mechanisms", "open_index",
                 "limit_threads", "PrivtextError", "UsageError", "IndexCacheError", "InputTypeError"):
        assert hasattr(privtext, name), name
    mechanisms = importlib.import_module("privtext.mechanisms")
    assert privtext.mechanisms is mechanisms  # no export shadows a subpackage
    assert "gumbel" in privtext.list_mechanisms() and "laplace" in privtext.list_mechanisms()


def test_open_index_by_path_and_missing_path(glove_small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert privtext.open_index(path=glove_small.path).n == glove_small.n
    with pytest.raises(IndexCacheError, match="build one with privtext index"):
        privtext.open_index(path=tmp_path / "none")


def test_limit_threads_sets_and_restores_faiss_and_blas() -> None:
    import faiss

    from privtext.threads import current_limits

    faiss.omp_set_num_threads(2)
    np.dot(np.ones((4, 4)), np.ones((4, 4)))  # make sure BLAS is loaded
    restore_limits = privtext.limit_threads(1)
    try:
        limits = current_limits()
        assert limits["faiss"] == 1
        assert limits["blas"] in (1, None)
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    finally:
        restore_limits()
    assert current_limits()["faiss"] == 2
    with pytest.raises(UsageError, match="at least 1"):
        privtext.limit_threads(0)


def test_report_with_risk_adds_the_attack_success_section(anon: Anonymizer) -> None:
    anon.perturb(TEXTS, stream=0)
    assert "skipped" in anon.report()["attack_success"]
    risk = anon.report(risk=True)["attack_success"]
    assert set(risk) >= {"uniform", "zipf"} and 0 <= risk["uniform"]["attack_success"] <= 1


def test_fork_shares_the_index_but_not_streams_or_counters(anon: Anonymizer) -> None:
    twin = anon.fork()
    assert twin.index is anon.index and twin.mechanism is anon.mechanism
    assert twin.perturb([LONG], stream=(4, 4)) == anon.perturb([LONG], stream=(4, 4))
    with pytest.raises(UsageError, match="pass stream="):
        twin.perturb([LONG])
    twin.perturb([LONG], stream=(4, 5))
    assert twin.counters.records == 2 and anon.counters.records == 1


def test_from_mechanism_draws_what_the_constructor_draws(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.randomness import run_key

    anon = Anonymizer("gumbel", epsilon=300, index=glove_small, seed="from-mechanism")
    wrapped = Anonymizer.from_mechanism(anon.mechanism, key=run_key("from-mechanism"))
    assert wrapped.perturb(TEXTS, stream=(3, 4)) == anon.perturb(TEXTS, stream=(3, 4))
    with pytest.raises(UsageError, match="oov must be one of"):
        Anonymizer.from_mechanism(anon.mechanism, oov="leak")


def test_perturb_spans_equals_perturb_of_the_span_texts(glove_small) -> None:  # type: ignore[no-untyped-def]
    texts = ["The city police said.", "", "A new MARKET, the report!", "zzqxv day"]
    buffer, starts, ends = "", [], []
    for text in texts:
        buffer += '{"text": "'
        starts.append(len(buffer))
        buffer += text
        ends.append(len(buffer))
        buffer += '"}\n'
    a = Anonymizer("gumbel", epsilon=300, index=glove_small, seed="spans")
    b = Anonymizer("gumbel", epsilon=300, index=glove_small, seed="spans")
    new, new_starts, new_ends, counts = a.perturb_spans(buffer, starts, ends, stream=(0, 3))
    expected = b.perturb(texts, stream=(0, 3))
    assert [new[s:e] for s, e in zip(new_starts, new_ends)] == expected
    assert new.count('{"text": "') == len(texts) and counts.records == len(texts)
    assert a.counters.word_tokens == b.counters.word_tokens > 0
    with pytest.raises(UsageError, match="already used"):
        a.perturb_spans(buffer, starts, ends, stream=(0, 3))
    with pytest.raises(UsageError, match="spans must be"):
        a.perturb_spans("the cat", [0, 3], [3, 7], stream=(0, 4))  # touching spans
    with pytest.raises(InputTypeError):
        a.perturb_spans(b"bytes", [0], [1], stream=(0, 5))  # type: ignore[arg-type]
