"""End-to-end `privtext` runs in subprocesses, on the real default GloVe at a small vocabulary."""

from __future__ import annotations

import gzip
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

VOCAB = ["--vocab-size", "2000"]
RECORDS = [
    {"id": i, "text": f"The {w} said the report was new, and the market fell {i} times.", "meta": {"n": i}, "z": [1, 2]}
    for i, w in enumerate(["government", "president", "company", "police", "team", "city"] * 5)
]


@pytest.fixture
def env(glove_small, cache_root: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    # glove_small built the 2000-word index in cache_root: every run below reuses it.
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root), "PYTHONUNBUFFERED": "1"}


def run(env: dict[str, str], *args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "privtext", *args], input=stdin, env=env,
                          capture_output=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.decode()}")
    return proc


def write_jsonl(path: Path, records: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_round_trip_changes_only_the_field(tmp_path: Path, env: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    report = tmp_path / "report.json"
    run(env, "perturb", str(src), "-o", str(out), "--mechanism", "laplace", "--epsilon", "3",
        "--report", str(report), "--workers", "2", "--chunk-size", "7", *VOCAB)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(RECORDS)
    changed = 0
    for before, after in zip(RECORDS, got):
        assert list(after) == list(before)  # key order kept
        assert {k: v for k, v in after.items() if k != "text"} == {k: v for k, v in before.items() if k != "text"}
        changed += after["text"] != before["text"]
    assert changed > len(RECORDS) // 2
    data = json.loads(report.read_text())
    assert data["counts"]["records"] == len(RECORDS)
    assert data["guarantee"]["kind"] == "metric"
    assert data["randomness"] == {"mode": "os-entropy", "seed_sha256": None,
                                  "keyed_by": "run key, input number, chunk index", "warning": None}


def test_nested_field_by_dotted_path(tmp_path: Path, env: dict[str, str]) -> None:
    records = [{"doc": {"body": "the market fell", "lang": "en"}, "id": 1}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    proc = run(env, "perturb", str(src), "--field", "doc.body", "--epsilon", "0.5", "--mechanism", "laplace",
               "--seed", "1", "-q", *VOCAB)
    got = json.loads(proc.stdout)
    assert got["id"] == 1 and got["doc"]["lang"] == "en" and list(got["doc"]) == ["body", "lang"]
    assert got["doc"]["body"] != "the market fell"


def test_parquet_round_trip_keeps_schema_metadata_and_order(tmp_path: Path, env: dict[str, str]) -> None:
    table = pa.table({
        "id": pa.array(range(40), pa.int64()),
        "text": pa.array([r["text"] for r in RECORDS] + [None] * 10, pa.large_string()),
        "score": pa.array([float(i) / 3 for i in range(40)]),
    }).replace_schema_metadata({"origin": "unit-test"})
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src)
    run(env, "perturb", str(src), "-o", str(out), "--epsilon", "200", "--chunk-size", "16", "--workers", "2", "-q", *VOCAB)
    result = pq.read_table(out)
    assert result.schema.equals(table.schema, check_metadata=True)
    assert result.column("id").equals(table.column("id"))
    assert result.column("score").equals(table.column("score"))
    texts = result.column("text").to_pylist()
    assert texts[30:] == [None] * 10
    assert sum(a != b for a, b in zip(texts[:30], table.column("text").to_pylist()[:30])) > 15


def test_stdin_to_stdout_text_format(env: dict[str, str]) -> None:
    lines = b"the market fell\nthe team won the game\n"
    proc = run(env, "perturb", "--format", "text", "--epsilon", "1", "--mechanism", "laplace", "-q", *VOCAB, stdin=lines)
    out = proc.stdout.decode().split("\n")
    assert len(out) == 3 and out[2] == ""
    assert len(out[0].split(" ")) == 3 and len(out[1].split(" ")) == 5


def test_same_seed_is_byte_identical_for_any_worker_count(tmp_path: Path, env: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS * 4)
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}.jsonl"
        run(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--seed", "42", "--workers", workers,
            "--chunk-size", "5", "-q", *VOCAB)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    other = tmp_path / "other.jsonl"
    run(env, "perturb", str(src), "-o", str(other), "--epsilon", "300", "--seed", "43", "--workers", "2",
        "--chunk-size", "5", "-q", *VOCAB)
    assert other.read_bytes() != outputs[0]


def test_default_oov_policy_never_leaks(tmp_path: Path, env: dict[str, str]) -> None:
    secret = "Zyxwquvo"
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"{secret} met the president of {secret.upper()} corp"}])
    report = tmp_path / "r.json"
    proc = run(env, "perturb", str(src), "--epsilon", "300", "--report", str(report), *VOCAB)
    assert secret.lower() not in proc.stdout.decode().lower()
    assert proc.stdout.decode().count("[OOV]") >= 2
    assert secret.lower() not in (proc.stderr.decode() + report.read_text()).lower()
    keep = run(env, "perturb", str(src), "--epsilon", "300", "--oov", "keep", *VOCAB)
    assert secret in keep.stdout.decode()
    assert "WARNING" in keep.stderr.decode() and "not protected" in keep.stderr.decode()


def test_report_contains_no_text(tmp_path: Path, env: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    report = tmp_path / "r.json"
    run(env, "perturb", str(src), "-o", str(tmp_path / "o.jsonl"), "--epsilon", "300", "--seed", "s3cret",
        "--report", str(report), *VOCAB)
    text = report.read_text()
    data = json.loads(text)
    vocabulary_words = {w.lower() for r in RECORDS for w in r["text"].replace(",", " ").replace(".", " ").split()}
    for word in vocabulary_words - {"the", "and", "was", "new"}:
        assert f'"{word}"' not in text and f" {word} " not in text
    assert "s3cret" not in text and len(data["randomness"]["seed_sha256"]) == 64
    assert data["counts"]["word_tokens"] == data["counts"]["perturbed"] + data["counts"]["oov"]["count"]
    assert data["per_document"]["documents"] == len(RECORDS)
    assert data["per_document"]["pure_bound"]["max"] == pytest.approx(
        data["per_document"]["perturbed_tokens"]["max"] * data["guarantee"]["per_token_pure_bound"])
    assert data["mechanism"]["derived"]["gumbel_scale_b"] > 0
    assert data["embedding"]["vocab_size_requested"] == 2000


def test_bad_records_stop_the_run_and_leave_no_output(tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "the market"}\nnot json at all\n{"other": 1}\n{"text": 5}\n')
    out = tmp_path / "out.jsonl"
    proc = run(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", *VOCAB, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode().strip()
    assert err.count("\n") == 0 and "line 2: not valid JSON" in err and "--on-error" in err
    assert "Traceback" not in err and "not json" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))

    report = tmp_path / "r.json"
    run(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--on-error", "skip", "--report", str(report), *VOCAB)
    assert len(out.read_text().splitlines()) == 1
    assert json.loads(report.read_text())["counts"]["errors"]["skipped"] == 3
    run(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--on-error", "keep", "--report", str(report), *VOCAB)
    lines = out.read_text().splitlines()
    assert lines[1:] == ["not json at all", '{"other": 1}', '{"text": 5}']
    assert json.loads(report.read_text())["counts"]["errors"]["kept_unchanged"] == 3
    assert any("--on-error keep" in f for f in json.loads(report.read_text())["flags"])


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["perturb", "missing.jsonl", "--epsilon", "1"], 2, "input file not found"),
        (["perturb", "x.jsonl", "--mechanism", "nope", "--epsilon", "1"], 2, "unknown mechanism 'nope'"),
        (["perturb", "x.jsonl", "--mechanism", "laplace", "--epsilon", "1", "--param", "k=1"], 2, "unknown parameter 'k'"),
        (["perturb", "x.jsonl", "--epsilon", "5"], 2, "infeasible for gumbel"),
        (["perturb", "x.jsonl", "--epsilon", "-1", "--mechanism", "laplace"], 2, "positive finite"),
        (["perturb", "x.csv", "--epsilon", "300"], 2, "pass --format"),
        (["perturb", "x.jsonl"], 2, "--epsilon is required"),
        (["perturb", "--epsilon", "300"], 2, "cannot infer the format of stdin"),
        (["perturb", "x.jsonl", "--epsilon", "300", "--field", "body"], 1, "field 'body' is missing"),
        (["perturb", "x.jsonl", "--epsilon", "300", "--format", "xml"], 2, "Invalid value for '--format'"),
        (["index", "--embeddings", "/no/such/vectors.txt"], 1, "embeddings file not found"),
    ],
)
def test_user_errors_are_one_line_with_a_fix(tmp_path: Path, env: dict[str, str], args: list[str], code: int, needle: str) -> None:
    write_jsonl(tmp_path / "x.jsonl", RECORDS[:2])
    (tmp_path / "x.csv").write_text("a,b\n")
    proc = subprocess.run([sys.executable, "-m", "privtext", *args, *([] if args[0] == "index" else VOCAB)],
                          cwd=tmp_path, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert needle in err
    assert "Traceback" not in err


def test_config_file_with_flag_override(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('mechanism = "laplace"\nepsilon = 1000.0\noov = "drop"\n')
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the qzxvbnm market"}])
    report = tmp_path / "r.json"
    proc = run(env, "perturb", str(src), "--config", str(cfg), "--report", str(report), "-q", *VOCAB)
    assert json.loads(proc.stdout)["text"] == "the  market"
    assert json.loads(report.read_text())["mechanism"]["name"] == "laplace"
    proc = run(env, "perturb", str(src), "--config", str(cfg), "--oov", "mask", "-q", *VOCAB)
    assert json.loads(proc.stdout)["text"] == "the [OOV] market"
    cfg.write_text('mechanism = "laplace"\nepsilon = 1.0\nepsilonn = 2\n')
    bad = run(env, "perturb", str(src), "--config", str(cfg), *VOCAB, check=False)
    assert bad.returncode == 2 and "epsilonn" in bad.stderr.decode()


def test_compressed_input_and_output(tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in RECORDS)
    out = tmp_path / "out.jsonl.zst"
    run(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "-q", *VOCAB)
    import zstandard

    with zstandard.open(out, "rt") as fh:
        assert len(fh.read().splitlines()) == len(RECORDS)


def test_output_is_written_before_stdin_closes(env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "privtext", "perturb", "--format", "jsonl", "--chunk-size", "1", "--workers", "2",
         "--epsilon", "300", "-q", *VOCAB],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        for i in range(3):
            proc.stdin.write(json.dumps({"i": i, "text": "the market fell"}).encode() + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "no output while stdin is still open"
            assert json.loads(proc.stdout.readline())["i"] == i  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_closed_pipe_ends_quietly(tmp_path: Path, env: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS * 200)
    proc = subprocess.run(
        f"set -o pipefail; {sys.executable} -m privtext perturb {src} --epsilon 300 --chunk-size 10 -q "
        f"--vocab-size 2000 | head -n 1",
        shell=True, executable="/bin/bash", env=env, capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode() == ""
    assert len(proc.stdout.splitlines()) == 1


def test_workers_after_the_parent_searched_faiss(tmp_path: Path, env: dict[str, str], cache_root: Path) -> None:
    """Regression for faiss issue 5206: forked children of a parent that searched can hang."""
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS * 10)
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from privtext.embeddings import EmbeddingSource
        from privtext.index import IndexSpec, ensure_index
        from privtext.run.perturb import run_perturb
        from privtext.settings import PerturbSettings
        index = ensure_index(IndexSpec(EmbeddingSource(), 2000, 64), Path({str(cache_root)!r})).index
        index.faiss_index.search(np.ascontiguousarray(index.vectors[:100]), 5)   # parent searches first
        settings = PerturbSettings(mechanism="laplace", epsilon=2.0, workers=2, chunk_size=10, seed="1")
        outcome = run_perturb([{str(src)!r}], {str(tmp_path / 'out.jsonl')!r}, settings, index, progress=False)
        print(outcome.counters.records)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == str(len(RECORDS) * 10)
    assert time.monotonic() - start < 180


def test_mechanisms_listing_and_module_entry_point(env: dict[str, str]) -> None:
    listing = run(env, "mechanisms").stdout.decode()
    assert "laplace" in listing and "gumbel" in listing and "guarantee:" in listing
    data = json.loads(run(env, "mechanisms", "--json").stdout)
    assert {"laplace", "gumbel"} <= {m["name"] for m in data}
    assert "Usage" in run(env, "--help").stdout.decode()


def test_index_command_prints_what_it_built(tmp_path: Path, env: dict[str, str]) -> None:
    env = {**env, "PRIVTEXT_CACHE": str(tmp_path / "cache")}
    first = run(env, "index", "--vocab-size", "300", "--neighbors", "8").stdout.decode()
    assert "built in" in first and "300 rows" in first and "Δ_min" in first
    second = run(env, "index", "--vocab-size", "300", "--neighbors", "8").stdout.decode()
    assert "reused" in second
    manifest = json.loads(run(env, "index", "--vocab-size", "300", "--neighbors", "8", "--json").stdout)
    assert manifest["geometry"]["neighbors"] == 8 and manifest["built"] is False


def test_ctrl_c_leaves_no_partial_output(tmp_path: Path, env: dict[str, str]) -> None:
    import signal

    src = write_jsonl(tmp_path / "in.jsonl", RECORDS * 2000)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "privtext", "perturb", str(src), "-o", str(out_dir / "o.jsonl"),
         "--mechanism", "laplace", "--epsilon", "3", "--workers", "2", "--chunk-size", "20", "-q", *VOCAB],
        env=env, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    # wait until workers are busy and the temporary output already holds some chunks
    while not any(f.stat().st_size for f in out_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out_dir.iterdir()), "the run never started writing"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    start = time.monotonic()
    assert proc.wait(timeout=60) == 130
    assert time.monotonic() - start < 10  # workers are stopped, not waited for
    assert "Traceback" not in proc.stderr.read().decode()  # type: ignore[union-attr]
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(("name", "fmt"), [("test_glove.txt", "glove"), ("euclidean_vectors.bin", "word2vec-bin"),
                                           ("lee_fasttext.vec", "fasttext-vec")])
def test_index_user_vector_files_with_format(tmp_path: Path, env: dict[str, str], name: str, fmt: str) -> None:
    from gensim.test.utils import datapath

    env = {**env, "PRIVTEXT_CACHE": str(tmp_path / "cache")}
    out = run(env, "index", "--embeddings", datapath(name), "--format", fmt, "--neighbors", "4").stdout.decode()
    assert f"[{fmt}]" in out and "built in" in out
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "the of and"}])
    proc = run(env, "perturb", str(src), "--embeddings", datapath(name), "--embeddings-format", fmt,
               "--neighbors", "4", "--mechanism", "laplace", "--epsilon", "1", "-q")
    assert len(json.loads(proc.stdout)["text"].split(" ")) == 3


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_example_config_runs_end_to_end(tmp_path: Path, env: dict[str, str], config: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS[:6])
    report = tmp_path / "r.json"
    run(env, "perturb", str(src), "-o", str(tmp_path / "out.jsonl"), "--config", str(config),
        "--workers", "2", "--chunk-size", "3", "--report", str(report), "-q", *VOCAB)
    data = json.loads(report.read_text())
    assert data["mechanism"]["name"] == config.stem
    assert data["counts"]["records"] == 6 and data["guarantee"]["statement"]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 6


def test_registered_mechanisms_all_have_an_example_config() -> None:
    from privtext.mechanisms import available

    assert {c.stem for c in CONFIGS} == set(available())


def test_parquet_from_stdin_to_stdout(tmp_path: Path, env: dict[str, str]) -> None:
    import io

    table = pa.table({"id": list(range(50)), "text": pa.array(["the market fell"] * 50).dictionary_encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=20)
    proc = run(env, "perturb", "--format", "parquet", "--epsilon", "300", "-q", *VOCAB, stdin=buffer.getvalue())
    result = pq.read_table(pa.BufferReader(proc.stdout))
    assert result.schema.equals(table.schema) and result.column("id").equals(table.column("id"))
    meta = pq.ParquetFile(pa.BufferReader(proc.stdout)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [20, 20, 10]


def test_jsonl_bytes_outside_the_field_are_kept_exactly(tmp_path: Path, env: dict[str, str]) -> None:
    lines = [
        b'{"n":123456789012345678901234567890, "f": 1e400,  "text" :"the market fell", "e":"\\u00e9\\/"}\n',
        b'{"text": "the team won", "text": "the city fell", "k": [1.50, -0.0]}\r\n',
        b'   \n',
        b'{"meta": {"text": "inner"}, "text": "a \\ud800 lone surrogate"}\n',
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(lines))
    proc = run(env, "perturb", str(src), "--epsilon", "1", "--mechanism", "laplace", "--on-error", "keep",
               "-q", *VOCAB)
    out = proc.stdout.split(b"\n")
    first = out[0]
    assert first.startswith(b'{"n":123456789012345678901234567890, "f": 1e400,  "text" :"')
    assert first.endswith(b'", "e":"\\u00e9\\/"}')
    second = out[1]
    assert second.startswith(b'{"text": "') and second.endswith(b'", "k": [1.50, -0.0]}\r')
    assert second.count(b'"text": ') == 2
    assert out[2] == b"   " and out[3] == lines[3].rstrip(b"\n")  # blank kept; the bad record kept as is


def test_search_hnsw_option_reports_recall(tmp_path: Path, env: dict[str, str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    report = tmp_path / "report.json"
    proc = run(env, "perturb", str(src), "-o", str(tmp_path / "out.jsonl"), "--mechanism", "vickrey",
               "--epsilon", "10", "--search", "hnsw", "--report", str(report), *VOCAB)
    data = json.loads(report.read_text())
    assert data["mechanism"]["params"]["search"] == "hnsw"
    recall = data["mechanism"]["derived"]["hnsw_recall"]
    assert 0.5 < recall["recall_at_1_zipf"] <= 1.0
    assert "recall@1" in proc.stderr.decode()
    assert any("HNSW" in c for c in data["guarantee"]["conditions"])
    bad = run(env, "perturb", str(src), "--mechanism", "gumbel", "--epsilon", "300", "--search", "hnsw",
              *VOCAB, check=False)
    assert bad.returncode == 2 and b"--search applies only to laplace" in bad.stderr
