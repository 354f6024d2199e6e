"""Safe output targets: never replace anything but a regular file, never an input.

- `-` and `/dev/stdout` stream to standard output;
- a FIFO, a character device or a socket is opened and streamed into, never replaced;
- a symlink is written through: its target is replaced, the link stays;
- a directory (or a block device) is refused;
- a regular file is written beside its target under a name of privtext's own and renamed over it
  only after flush, fsync and close succeeded; a failure removes the temporary file and leaves
  the old file untouched. A new file gets the mode the umask gives; an existing one keeps its mode.

Every OSError on the way becomes one line (OutputError, exit 1) that names the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO

from privtext.errors import OutputError, UsageError

STDIO = "-"
_STDOUT_NAMES = {"/dev/stdout", "/proc/self/fd/1", "/dev/fd/1"}
TMP_MARK = ".privtext-"


class OutputKind(Enum):
    STDOUT = "stdout"
    STREAM = "stream"  # FIFO, character device, socket: opened and written, never replaced
    FILE = "file"  # a regular file (or none yet): replaced atomically


@dataclass(frozen=True)
class OutputTarget:
    given: str  # what the user wrote (for messages)
    kind: OutputKind
    path: Path | None  # the file to open (STREAM) or to replace (FILE: symlinks resolved)

    @property
    def resumable(self) -> bool:
        return self.kind is OutputKind.FILE


def resolve_output(given: str, what: str = "output") -> OutputTarget:
    """Classifies an output path; refuses a directory and a missing or unwritable directory."""
    if given == STDIO or given in _STDOUT_NAMES:
        return OutputTarget(given, OutputKind.STDOUT, None)
    real = Path(os.path.realpath(given))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot inspect {what} {given} ({exc.strerror}); check the path") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{what} {given} is a directory; name a file (for example {given}/out.jsonl)")
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            return OutputTarget(given, OutputKind.STREAM, real)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {given} is not a regular file, pipe or character device; "
                             "choose another path")
        if not os.access(real, os.W_OK):
            raise OutputError(f"{what} {given} is read-only; make it writable or choose another path")
    parent = real.parent
    if not parent.is_dir():
        raise UsageError(f"{what} directory does not exist: {parent}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} directory {parent} is not writable; fix its permissions or "
                          "choose another path")
    return OutputTarget(given, OutputKind.FILE, real)


def refuse_inputs(target: OutputTarget, inputs: list[str], what: str = "output") -> None:
    """An output that resolves to any input (through links too) is refused before anything runs."""
    if target.path is None:
        return
    for src in inputs:
        if src == STDIO:
            continue
        same = os.path.realpath(src) == str(target.path)
        if not same and target.path.exists() and os.path.exists(src):
            with contextlib.suppress(OSError):
                same = os.path.samefile(src, target.path)
        if same:
            raise UsageError(f"{what} {target.given} is the input {src}; privtext never overwrites "
                             "its input: choose another path")


def umask() -> int:
    """The process umask, read without changing it (Linux); else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def target_mode(path: Path) -> int:
    """Mode for the file that will stand at `path`: its current one, or what the umask gives."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~umask()


def describe_os_error(exc: OSError) -> str:
    """What went wrong and the fix, for an OSError (no traceback, no content)."""
    code = exc.errno
    if code == errno.ENOSPC:
        return "no space left on the device; free space or write elsewhere"
    if code == errno.EFBIG:
        return "the file-size limit was reached (ulimit -f); raise it or write elsewhere"
    if code == errno.EDQUOT:
        return "the disk quota is exhausted; free space or write elsewhere"
    if code == errno.EROFS:
        return "the file system is read-only; write elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied; fix the permissions or write elsewhere"
    if code == errno.EIO:
        return "an I/O error occurred on the device; check it and try again"
    return f"{exc.strerror or exc}; check the path and try again"


def os_error(exc: OSError, given: str, doing: str = "writing") -> OutputError:
    """One line that names the fix for an OSError met while writing `given`."""
    return OutputError(f"error {doing} {given}: {describe_os_error(exc)} (nothing was published)")


def tmp_name(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{tag}"


_PID_TMP = re.compile(r"\.privtext-(\d+)\.tmp$")


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Removes `.NAME.privtext-PID.tmp` files beside `target` whose process is gone (left by a
    run that was killed); returns what was removed."""
    removed: list[Path] = []
    prefix = f".{target.name}{TMP_MARK}"
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _PID_TMP.search(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours counts; another user's too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicFile:
    """A binary file that replaces `target.path` only on `commit()`; `abort()` removes it.

    `tmp` may name a fixed temporary path (a resumable run's partial output, opened for append
    after truncation to `keep_bytes`); by default a per-process name is used."""

    def __init__(self, target: OutputTarget, tmp: Path | None = None, keep_bytes: int | None = None):
        assert target.kind is OutputKind.FILE and target.path is not None
        self.target = target
        self.mode = target_mode(target.path)
        self.tmp = tmp or tmp_name(target.path, f"{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            if keep_bytes is None:
                fd = os.open(self.tmp, flags | os.O_TRUNC, 0o600)
            else:
                fd = os.open(self.tmp, flags, 0o600)
                os.ftruncate(fd, keep_bytes)
                os.lseek(fd, keep_bytes, os.SEEK_SET)
        except OSError as exc:
            raise os_error(exc, target.given, "creating a temporary file for") from None
        self.stream: IO[bytes] = os.fdopen(fd, "wb", buffering=1 << 20)
        self._done = False

    # write/flush/commit raise without cleaning up: the caller chooses abort() (remove the
    # temporary file) or detach() (keep a resumable run's partial output).
    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except OSError as exc:
            raise os_error(exc, self.target.given) from None

    def flush(self, sync: bool = False) -> None:
        try:
            self.stream.flush()
            if sync:
                os.fsync(self.stream.fileno())
        except OSError as exc:
            raise os_error(exc, self.target.given) from None

    def tell(self) -> int:
        return self.stream.tell()

    def commit(self) -> None:
        """flush, fsync, set the mode, close, and only then rename over the target."""
        assert self.target.path is not None
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            os.fchmod(self.stream.fileno(), self.mode)
            self.stream.close()
            os.replace(self.tmp, self.target.path)
        except OSError as exc:
            raise os_error(exc, self.target.given) from None
        self._done = True
        fsync_dir(self.target.path.parent)

    def abort(self) -> None:
        """Closes without publishing and removes the temporary file; safe to call twice."""
        if self._done:
            return
        self._done = True
        _close_quietly(self.stream)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def detach(self) -> None:
        """Closes and keeps the temporary file (a resumable run's partial output)."""
        if self._done:
            return
        self._done = True
        _close_quietly(self.stream)


def _close_quietly(stream: IO[bytes]) -> None:
    """Closes a stream whose buffer may not flush (disk full): the unflushed bytes are dropped,
    which is right, since they were never committed."""
    try:
        stream.close()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            os.close(stream.fileno())


class StreamOutput:
    """Stdout, a FIFO or a device: written as it goes (nothing to publish or roll back)."""

    def __init__(self, target: OutputTarget):
        self.target = target
        if target.kind is OutputKind.STDOUT:
            self.stream: IO[bytes] = sys.stdout.buffer
            self._owned = False
        else:
            try:
                self.stream = open(target.path, "wb", buffering=0)  # type: ignore[arg-type]
            except OSError as exc:
                raise os_error(exc, target.given, "opening") from None
            self._owned = True

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise os_error(exc, self.target.given) from None

    def flush(self, sync: bool = False) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise os_error(exc, self.target.given) from None

    def tell(self) -> int:
        return 0

    def commit(self) -> None:
        self.flush()
        if self._owned:
            self.stream.close()

    def abort(self) -> None:
        if self._owned:
            with contextlib.suppress(OSError):
                self.stream.close()

    detach = abort


def write_text_atomic(path: str, text: str, inputs: list[str] | None = None, what: str = "output") -> None:
    """A small text file (a report) through the same safe-target rules."""
    target = resolve_output(path, what)
    refuse_inputs(target, inputs or [], what)
    data = text.encode("utf-8")
    if target.kind is OutputKind.FILE:
        assert target.path is not None
        remove_stale_temporaries(target.path)
        out: AtomicFile | StreamOutput = AtomicFile(target)
    else:
        out = StreamOutput(target)
    try:
        out.write(data)
        out.commit()
    except BaseException:
        out.abort()
        raise
