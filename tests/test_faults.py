"""Failure classes with real processes, real signals and real files (docs/reliability.md's table).

Every run here is a `python -m privtext` subprocess on the real default GloVe at 2000 words. The
processes of a run are found by a marker in their environment (workers and the fork server
inherit it), by scanning /proc, so "nothing left behind" is checked, not assumed.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

VOCAB = ["--vocab-size", "2000"]
WORDS = ["government", "president", "company", "police", "team", "city", "market", "report"]


@pytest.fixture
def env(glove_small, cache_root: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root), "PYTHONUNBUFFERED": "1"}


def corpus(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            w = WORDS[i % len(WORDS)]
            fh.write(json.dumps({"id": i, "text": f"The {w} said the report was new, and the "
                                 f"market fell {i} times.", "n": 10**30 + i}) + "\n")
    return path


def privtext(env: dict[str, str], *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[bytes]:  # type: ignore[no-untyped-def]
    proc = subprocess.run([sys.executable, "-m", "privtext", *args], env=env, capture_output=True,
                          timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr.decode()}")
    return proc


def marked_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds `marker`."""
    found = []
    needle = f"PRIVTEXT_TEST_MARK={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry))
    return found


def wait_gone(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = marked_pids(marker)
        if not left:
            return []
        time.sleep(0.1)
    return marked_pids(marker)


def start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[bytes], str]:
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "privtext", *args],
                            env={**env, "PRIVTEXT_TEST_MARK": marker},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, marker


def wait_for_workers(marker: str, count: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while len(marked_pids(marker)) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".privtext-" in p.name)


# --- kill -9 at random points, then --resume: byte-identical to an uninterrupted seeded run ----


def _kill_and_resume(env: dict[str, str], src: Path, out: Path, args: list[str], rng: random.Random,
                     kills: int, duration: float) -> int:
    """Kills at random points of a run that takes `duration` seconds uninterrupted."""
    done_kills = 0
    for _ in range(kills):
        proc, marker = start(env, "perturb", str(src), "-o", str(out), "--resume", *args)
        time.sleep(rng.uniform(0.3, 0.8) * duration)
        if proc.poll() is not None:  # finished before the kill: nothing left to interrupt
            assert proc.returncode == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
            break
        proc.kill()
        proc.wait()
        done_kills += 1
        assert wait_gone(marker, 10) == [], "workers outlived a SIGKILLed parent"
    privtext(env, "perturb", str(src), "-o", str(out), "--resume", *args)
    return done_kills


def test_kill_9_then_resume_is_byte_identical_jsonl(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 100_000)
    args = ["--seed", "11", "--epsilon", "300", "--chunk-size", "100", "--workers", "2", "-q", *VOCAB]
    reference = tmp_path / "reference.jsonl"
    began = time.monotonic()
    privtext(env, "perturb", str(src), "-o", str(reference), *args)
    out = tmp_path / "out.jsonl"
    kills = _kill_and_resume(env, src, out, args, random.Random(5), 3, time.monotonic() - began)
    assert kills >= 1, "the run always finished before a kill; make the corpus larger"
    assert out.read_bytes() == reference.read_bytes()
    assert debris(tmp_path) == []


def test_kill_9_then_resume_is_byte_identical_parquet(tmp_path: Path, env: dict[str, str]) -> None:
    n = 40_000
    table = pa.table({"id": pa.array(range(n), pa.int64()),
                      "text": pa.array([f"The {WORDS[i % 8]} said the market fell {i} times." for i in range(n)])})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=2000, compression="zstd")
    args = ["--seed", "3", "--epsilon", "300", "--chunk-size", "500", "--workers", "2", "-q", *VOCAB]
    reference = tmp_path / "reference.parquet"
    began = time.monotonic()
    privtext(env, "perturb", str(src), "-o", str(reference), *args)
    out = tmp_path / "out.parquet"
    kills = _kill_and_resume(env, src, out, args, random.Random(8), 3, time.monotonic() - began)
    assert kills >= 1
    assert out.read_bytes() == reference.read_bytes()
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == 20 and meta.row_group(0).column(1).compression == "ZSTD"
    assert debris(tmp_path) == []


def test_resume_without_seed_keeps_the_written_part_and_reports_it(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 60_000)
    out, report = tmp_path / "out.jsonl", tmp_path / "r.json"
    args = ["--epsilon", "300", "--chunk-size", "100", "--workers", "2", "-q", *VOCAB]
    proc, _ = start(env, "perturb", str(src), "-o", str(out), *args)
    journal = tmp_path / ".out.jsonl.privtext-journal"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    lines = journal.read_text().splitlines()
    committed = json.loads(lines[-2])["out"]  # the last complete line may be torn; take one before
    partial = (tmp_path / ".out.jsonl.privtext-part").read_bytes()[:committed]
    text = journal.read_text()
    assert "market" not in text and "government" not in text  # counts and offsets, never text
    privtext(env, "perturb", str(src), "-o", str(out), "--resume", "--report", str(report), *args)
    assert out.read_bytes()[:committed] == partial  # what was written is never redrawn
    assert len(out.read_bytes().splitlines()) == 60_000
    data = json.loads(report.read_text())
    assert data["run"]["resumed"] is True and data["run"]["resume"]["seeded"] is False
    assert data["counts"]["records"] == 60_000


def test_resume_refuses_a_journal_that_does_not_match(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 60_000)
    out = tmp_path / "out.jsonl"
    args = ["--seed", "1", "--chunk-size", "100", "--workers", "2", "-q", *VOCAB]
    proc, _ = start(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", *args)
    journal = tmp_path / ".out.jsonl.privtext-journal"
    while not journal.exists() or journal.read_text().count("\n") < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    other = privtext(env, "perturb", str(src), "-o", str(out), "--epsilon", "200", "--resume", *args, check=False)
    assert other.returncode == 2
    assert "settings differ" in other.stderr.decode() and other.stderr.decode().count("\n") == 1
    seed = privtext(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--resume",
                    *[a if a != "1" else "2" for a in args], check=False)
    assert seed.returncode == 2 and "seed differs" in seed.stderr.decode()
    with open(src, "a") as fh:
        fh.write(json.dumps({"text": "one more"}) + "\n")
    changed = privtext(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--resume", *args, check=False)
    assert changed.returncode == 2 and "inputs changed" in changed.stderr.decode()
    assert journal.exists()  # a refused resume destroys nothing


def test_resume_several_inputs_and_text_format(tmp_path: Path, env: dict[str, str]) -> None:
    sources = []
    for k in range(3):
        path = tmp_path / f"in{k}.txt"
        path.write_text("".join(f"the {WORDS[(i + k) % 8]} fell {i} times\r\n" for i in range(20_000)))
        sources.append(str(path))
    args = ["--seed", "5", "--epsilon", "300", "--chunk-size", "100", "--workers", "2", "-q", *VOCAB]
    reference = tmp_path / "reference.txt"
    privtext(env, "perturb", *sources, "-o", str(reference), *args)
    out = tmp_path / "out.txt"
    for delay in (1.5, 2.5):
        proc, marker = start(env, "perturb", *sources, "-o", str(out), "--resume", *args)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert wait_gone(marker, 10) == []
    privtext(env, "perturb", *sources, "-o", str(out), "--resume", *args)
    assert out.read_bytes() == reference.read_bytes()
    assert out.read_bytes().count(b"\r\n") == 60_000


# --- signals and orphans ---------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_sigterm_sighup_behave_like_ctrl_c(tmp_path: Path, env: dict[str, str], sig: int, code: int) -> None:
    src = corpus(tmp_path / "in.jsonl", 60_000)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc, marker = start(env, "perturb", str(src), "-o", str(out_dir / "o.jsonl"), "--epsilon", "300",
                         "--workers", "2", "--chunk-size", "50", "-q", *VOCAB)
    wait_for_workers(marker, 3)
    time.sleep(0.5)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == code
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert wait_gone(marker, 10) == []
    assert list(out_dir.iterdir()) == []


def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 60_000)
    proc, marker = start(env, "perturb", str(src), "-o", str(tmp_path / "o.jsonl"), "--epsilon", "300",
                         "--workers", "2", "--chunk-size", "50", "-q", *VOCAB)
    wait_for_workers(marker, 4)  # main, fork server, two workers (and the resource tracker)
    assert len(marked_pids(marker)) >= 4
    journal = tmp_path / ".o.jsonl.privtext-journal"
    deadline = time.monotonic() + 60
    while not journal.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert wait_gone(marker, 5) == []  # parent-death detection, within seconds
    # The next run removes the killed run's work files and succeeds.
    small = corpus(tmp_path / "small.jsonl", 10)
    run = privtext(env, "perturb", str(small), "-o", str(tmp_path / "o.jsonl"), "--epsilon", "300", *VOCAB)
    assert "removed the unfinished work" in run.stderr.decode()
    assert debris(tmp_path) == []


def test_stale_temporary_file_of_a_dead_run_is_removed(tmp_path: Path, env: dict[str, str]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = tmp_path / f".r.json.privtext-{int(dead.stdout)}.tmp"
    stale.write_text("{}")
    src = corpus(tmp_path / "in.jsonl", 5)
    privtext(env, "perturb", str(src), "-o", str(tmp_path / "o.jsonl"), "--epsilon", "300",
             "--report", str(tmp_path / "r.json"), "-q", *VOCAB)
    assert not stale.exists() and debris(tmp_path) == []


# --- outputs -----------------------------------------------------------------------------------


def test_output_or_report_that_is_an_input_is_refused_before_anything_runs(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 5)
    before = src.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for args in (["-o", str(src)], ["-o", str(link)], ["-o", str(tmp_path / "o.jsonl"), "--report", str(src)],
                 ["-o", str(tmp_path / "o.jsonl"), "--report", str(link)]):
        proc = privtext(env, "perturb", str(src), "--epsilon", "300", *args, *VOCAB, check=False)
        assert proc.returncode == 2, proc.stderr.decode()
        assert "never overwrites its input" in proc.stderr.decode()
        assert src.read_bytes() == before and not (tmp_path / "o.jsonl").exists()


def test_symlink_is_written_through_and_modes_follow_umask(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 5)
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    os.chmod(real, 0o640)
    link = tmp_path / "out.jsonl"
    link.symlink_to(real)
    privtext(env, "perturb", str(src), "-o", str(link), "--epsilon", "300", "-q", *VOCAB)
    assert link.is_symlink() and len(real.read_text().splitlines()) == 5
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # an existing file keeps its mode
    fresh = tmp_path / "fresh.jsonl"
    privtext(env, "perturb", str(src), "-o", str(fresh), "--epsilon", "300", "-q", *VOCAB,
             preexec_fn=lambda: os.umask(0o027))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640  # 0666 & ~027
    privtext(env, "perturb", str(src), "-o", str(tmp_path / "f2.jsonl"), "--epsilon", "300", "-q", *VOCAB,
             preexec_fn=lambda: os.umask(0o002))
    assert stat.S_IMODE((tmp_path / "f2.jsonl").stat().st_mode) == 0o664


def test_fifo_and_device_are_streamed_and_directory_refused(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 5)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    privtext(env, "perturb", str(src), "-o", str(fifo), "--epsilon", "300", "-q", *VOCAB)
    assert len(reader.communicate(timeout=60)[0].splitlines()) == 5
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    device = tmp_path / "null"
    try:  # a private copy of /dev/null: a bug here must not break the machine's own
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        device = Path("/dev/null")
    privtext(env, "perturb", str(src), "-o", str(device), "--epsilon", "300", "-q", *VOCAB)
    assert stat.S_ISCHR(os.stat(device).st_mode)
    with open(tmp_path / "via-stdout.jsonl", "wb") as fh:
        proc = subprocess.run([sys.executable, "-m", "privtext", "perturb", str(src), "-o", "/dev/stdout",
                               "--epsilon", "300", "-q", *VOCAB], env=env, stdout=fh, timeout=120)
    assert proc.returncode == 0 and len((tmp_path / "via-stdout.jsonl").read_text().splitlines()) == 5
    (tmp_path / "adir").mkdir()
    proc = privtext(env, "perturb", str(src), "-o", str(tmp_path / "adir"), "--epsilon", "300", *VOCAB, check=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr.decode()


def test_read_only_output_directory_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    src = corpus(tmp_path / "in.jsonl", 5)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    proc = privtext(env, "perturb", str(src), "-o", str(ro / "o.jsonl"), "--epsilon", "300", *VOCAB, check=False)
    assert proc.returncode == 1 and "not writable" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_file_size_limit_fails_in_one_line_and_publishes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 20_000)
    out = tmp_path / "o.jsonl"
    out.write_text("previous content\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = privtext(env, "perturb", str(src), "-o", str(out), "--epsilon", "300", "--workers", "2", *VOCAB,
                    check=False, preexec_fn=limit)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "file-size limit" in err and "Traceback" not in err and err.strip().count("\n") == 0
    assert out.read_text() == "previous content\n"  # untouched
    assert debris(tmp_path) == []


def test_read_only_directory_for_root_via_file_size_limit_zero(tmp_path: Path, env: dict[str, str]) -> None:
    """A report that cannot be written (limit 0 bytes) is also one line and leaves no file."""
    src = corpus(tmp_path / "in.jsonl", 3)
    proc = privtext(env, "perturb", str(src), "--epsilon", "300", "--report", str(tmp_path / "r.json"), *VOCAB,
                    check=False, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    assert proc.returncode == 1 and "file-size limit" in proc.stderr.decode()
    assert debris(tmp_path) == [] and not (tmp_path / "r.json").exists()


# --- inputs and formats --------------------------------------------------------------------------


def test_truncated_and_fake_compressed_inputs_are_data_errors(tmp_path: Path, env: dict[str, str]) -> None:
    records = "".join(json.dumps({"text": f"the market fell {i} times"}) + "\n" for i in range(20_000)).encode()
    full = gzip.compress(records)
    (tmp_path / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    (tmp_path / "plain.jsonl.gz").write_bytes(records[:1000])
    import zstandard

    zst = zstandard.ZstdCompressor().compress(records)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    for name, needle in (("cut.jsonl.gz", "is truncated"), ("plain.jsonl.gz", "not a valid gzip"),
                         ("cut.jsonl.zst", "is truncated")):
        out = tmp_path / "o.jsonl"
        proc = privtext(env, "perturb", str(tmp_path / name), "-o", str(out), "--epsilon", "300", *VOCAB, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1, err
        assert needle in err and name in err and "decompressed bytes" in err
        assert "Traceback" not in err and err.strip().count("\n") == 0
        assert not out.exists() and debris(tmp_path) == []


def test_zst_and_gz_round_trip(tmp_path: Path, env: dict[str, str]) -> None:
    import zstandard

    records = "".join(json.dumps({"text": f"the market fell {i} times"}) + "\n" for i in range(500)).encode()
    (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(records))
    privtext(env, "perturb", str(tmp_path / "in.jsonl.zst"), "-o", str(tmp_path / "o.jsonl.gz"),
             "--epsilon", "300", "--chunk-size", "50", "--workers", "2", "-q", *VOCAB)
    assert len(gzip.decompress((tmp_path / "o.jsonl.gz").read_bytes()).splitlines()) == 500


def test_corrupt_parquet_row_group_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    table = pa.table({"text": [f"the market fell {i} times" for i in range(4000)]})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=1000, compression="none")
    meta = pq.ParquetFile(src).metadata
    start = meta.row_group(2).column(0).data_page_offset
    data = bytearray(src.read_bytes())
    data[start : start + 64] = os.urandom(64)
    src.write_bytes(bytes(data))
    proc = privtext(env, "perturb", str(src), "-o", str(tmp_path / "o.parquet"), "--epsilon", "300", *VOCAB,
                    check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "row group 2" in err and "Traceback" not in err
    assert not (tmp_path / "o.parquet").exists() and debris(tmp_path) == []


def test_field_typo_fails_whatever_on_error_says(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 50)
    for policy in ("fail", "skip", "keep"):
        out = tmp_path / f"o-{policy}.jsonl"
        proc = privtext(env, "perturb", str(src), "-o", str(out), "--field", "txet", "--on-error", policy,
                        "--epsilon", "300", *VOCAB, check=False)
        assert proc.returncode == 1, proc.stderr.decode()
        assert "txet" in proc.stderr.decode() and not out.exists()
    assert debris(tmp_path) == []


def test_output_extension_naming_another_format_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 5)
    proc = privtext(env, "perturb", str(src), "-o", str(tmp_path / "o.parquet"), "--epsilon", "300", *VOCAB,
                    check=False)
    assert proc.returncode == 2 and "names the parquet format" in proc.stderr.decode()
    privtext(env, "perturb", str(src), "-o", str(tmp_path / "o.parquet"), "--format", "jsonl",
             "--epsilon", "300", "-q", *VOCAB)
    assert len((tmp_path / "o.parquet").read_text().splitlines()) == 5


def test_config_errors_are_one_line_usage_errors(tmp_path: Path, env: dict[str, str]) -> None:
    src = corpus(tmp_path / "in.jsonl", 3)
    cfg = tmp_path / "c.toml"
    for content, needle in ((b'epsilon = "lots"\n', "'epsilon' in"), (b"workers = [1]\n", "'workers' in"),
                            (b'epsilon = 300\noov = 3\n', "'oov' in"), (b'epsilon = 300\n# caf\xe9\n', "not UTF-8")):
        cfg.write_bytes(content)
        proc = privtext(env, "perturb", str(src), "--config", str(cfg), *VOCAB, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 2, err
        assert needle in err and "Traceback" not in err and err.strip().count("\n") == 0


def test_config_format_and_workers_zero_are_honoured(tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "in.data"
    src.write_text("the market fell\nthe team won\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('format = "text"\nepsilon = 300\nworkers = 0\n')
    report = tmp_path / "r.json"
    proc = privtext(env, "perturb", str(src), "--config", str(cfg), "--report", str(report), "-q", *VOCAB)
    assert len(proc.stdout.decode().splitlines()) == 2
    assert json.loads(report.read_text())["input"]["format"] == "text"
    flag = privtext(env, "perturb", str(src), "--format", "text", "--epsilon", "300", "--workers", "0", "-q", *VOCAB)
    assert len(flag.stdout.decode().splitlines()) == 2


def test_worker_start_failure_is_one_line(tmp_path: Path, env: dict[str, str], cache_root: Path) -> None:
    """The cache vanishes between the parent opening it and the workers starting."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(cache_root, cache)
    src = corpus(tmp_path / "in.jsonl", 5000)
    script = f"""
import shutil, sys
from pathlib import Path
from privtext.embeddings import EmbeddingSource
from privtext.errors import PrivtextError
from privtext.index import IndexSpec, ensure_index
from privtext.run.perturb import execute, plan_run
from privtext.settings import PerturbSettings
index = ensure_index(IndexSpec(EmbeddingSource(), 2000, 64), Path({str(cache)!r})).index
settings = PerturbSettings(mechanism="laplace", epsilon=2.0, workers=2, chunk_size=100)
plan = plan_run([{str(src)!r}], {str(tmp_path / 'o.jsonl')!r}, settings)
import numpy as np
np.asarray(index.vectors).sum()  # the parent holds its mapping; the workers will not find the file
(index.path / "vectors.npy").unlink()
try:
    execute(plan, index, progress=False)
except PrivtextError as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 1, proc.stderr.decode()
    assert "vectors.npy" in out and "privtext index --force" in out
    assert "Traceback" not in proc.stderr.decode()
    assert not (tmp_path / "o.jsonl").exists() and debris(tmp_path) == []


def _peak_kib(env: dict[str, str], *args: str) -> int:
    script = (
        "import resource, runpy, sys; sys.argv = ['privtext'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('privtext', run_name='__main__')\n"
        "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    return int(err.rsplit("PEAK", 1)[1].split()[0])


def test_one_long_record_memory_is_bounded(tmp_path: Path, env: dict[str, str]) -> None:
    """A 26 MB record: the run's peak grows by less than 10x the record (it was 2 GB for 30 MB)."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "text": " ".join(WORDS[i % 8] for i in range(3_000_000))}) + "\n")
    size = src.stat().st_size
    small = corpus(tmp_path / "small.jsonl", 1000)
    common = ["--epsilon", "300", "--workers", "1", "-q", *VOCAB]
    baseline = _peak_kib(env, "perturb", str(small), "-o", str(tmp_path / "s.jsonl"), *common)
    peak = _peak_kib(env, "perturb", str(src), "-o", str(tmp_path / "o.jsonl"), *common)
    assert (peak - baseline) * 1024 < 10 * size, f"peak {peak} KiB, baseline {baseline} KiB, record {size} B"
    got = json.loads((tmp_path / "o.jsonl").read_text())
    assert got["id"] == 1 and len(got["text"].split(" ")) == 3_000_000


def test_a_failed_run_with_resume_keeps_its_part_and_continues(tmp_path: Path, env: dict[str, str]) -> None:
    """Disk full (a file-size limit) half way, with --resume: the finished part is kept, and the
    rerun completes byte-identical to an uninterrupted seeded run."""
    src = corpus(tmp_path / "in.jsonl", 20_000)
    args = ["--seed", "9", "--epsilon", "300", "--chunk-size", "100", "--workers", "2", "-q", *VOCAB]
    privtext(env, "perturb", str(src), "-o", str(tmp_path / "reference.jsonl"), *args)
    out = tmp_path / "out.jsonl"
    failed = privtext(env, "perturb", str(src), "-o", str(out), "--resume", *args, check=False,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000)))
    assert failed.returncode == 1 and "file-size limit" in failed.stderr.decode()
    assert not out.exists()
    assert (tmp_path / ".out.jsonl.privtext-journal").exists()  # kept for --resume
    privtext(env, "perturb", str(src), "-o", str(out), "--resume", *args)
    assert out.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()
    assert debris(tmp_path) == []
