"""Safe output targets on real files, links, FIFOs and devices."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from privtext.errors import OutputError, UsageError
from privtext.run.outputs import (
    AtomicFile,
    OutputKind,
    refuse_inputs,
    remove_stale_temporaries,
    resolve_output,
    target_mode,
    umask,
    write_text_atomic,
)


def test_kinds(tmp_path: Path) -> None:
    assert resolve_output("-").kind is OutputKind.STDOUT
    assert resolve_output("/dev/stdout").kind is OutputKind.STDOUT
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    assert resolve_output(str(fifo)).kind is OutputKind.STREAM
    assert resolve_output(str(tmp_path / "new.jsonl")).kind is OutputKind.FILE
    real = tmp_path / "real.jsonl"
    real.write_text("x")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    target = resolve_output(str(link))
    assert target.kind is OutputKind.FILE and target.path == real  # written through
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "later.jsonl")
    assert resolve_output(str(dangling)).path == tmp_path / "later.jsonl"
    with pytest.raises(UsageError, match="is a directory"):
        resolve_output(str(tmp_path))
    with pytest.raises(UsageError, match="directory does not exist"):
        resolve_output(str(tmp_path / "no" / "x.jsonl"))


def test_input_refused_through_links_and_hard_links(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    hard = tmp_path / "hard.jsonl"
    os.link(src, hard)
    soft = tmp_path / "soft.jsonl"
    soft.symlink_to(src)
    for path in (src, hard, soft):
        with pytest.raises(UsageError, match="never overwrites its input"):
            refuse_inputs(resolve_output(str(path)), [str(src)])
    refuse_inputs(resolve_output(str(tmp_path / "other.jsonl")), [str(src), "-"])


def test_atomic_file_publishes_only_on_commit_with_the_right_mode(tmp_path: Path) -> None:
    target = resolve_output(str(tmp_path / "o.txt"))
    out = AtomicFile(target)
    out.write(b"data")
    assert not (tmp_path / "o.txt").exists() and out.tmp.exists()
    out.commit()
    assert (tmp_path / "o.txt").read_bytes() == b"data" and not out.tmp.exists()
    assert stat.S_IMODE((tmp_path / "o.txt").stat().st_mode) == 0o666 & ~umask()
    os.chmod(tmp_path / "o.txt", 0o604)
    assert target_mode(tmp_path / "o.txt") == 0o604
    again = AtomicFile(resolve_output(str(tmp_path / "o.txt")))
    again.write(b"new")
    again.abort()
    assert (tmp_path / "o.txt").read_bytes() == b"data" and not again.tmp.exists()
    write_text_atomic(str(tmp_path / "o.txt"), "newer")
    assert (tmp_path / "o.txt").read_text() == "newer"
    assert stat.S_IMODE((tmp_path / "o.txt").stat().st_mode) == 0o604  # kept


def test_failed_flush_publishes_nothing_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A real file-size limit in a child process: the write fails with EFBIG at commit."""
    script = f"""
import resource, sys
from privtext.errors import OutputError
from privtext.run.outputs import AtomicFile, resolve_output
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
out = AtomicFile(resolve_output({str(tmp_path / 'o.bin')!r}))
try:
    out.write(b"x" * 5000)   # buffered: the failure shows at flush
    out.commit()
except OutputError as exc:
    print(exc)
    out.abort()   # the caller's choice: abort (remove) or detach (keep for --resume)
    sys.exit(1)
"""
    (tmp_path / "o.bin").write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "file-size limit" in proc.stdout.decode() and "nothing was published" in proc.stdout.decode()
    assert (tmp_path / "o.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.bin"]


def test_stale_temporaries_of_dead_processes_only(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = tmp_path / f".o.txt.privtext-{int(dead.stdout)}.tmp"
    live = tmp_path / f".o.txt.privtext-{os.getpid()}.tmp"
    foreign = tmp_path / ".o.txt.something-else.tmp"
    for path in (stale, live, foreign):
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path / "o.txt") == [stale]
    assert live.exists() and foreign.exists()


def test_read_only_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write anything")
    path = tmp_path / "ro.txt"
    path.write_text("x")
    os.chmod(path, 0o444)
    with pytest.raises(OutputError, match="read-only"):
        resolve_output(str(path))
