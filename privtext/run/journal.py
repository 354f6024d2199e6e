"""The run journal: which chunks are committed, so a killed or failed run can `--resume`.

It lives beside the output as `.NAME.privtext-journal` (JSON lines) with the partial output
`.NAME.privtext-part` (line formats) or the directory `.NAME.privtext-segments` (Parquet: one
finished file per row group). It holds counts, byte offsets, the identity of the inputs (size,
modification time, digests of their first and last MiB), the settings that shape the output and a
commitment to the seed: never text, tokens, file names or key material.

Commit order makes it safe against a kill at any instant: a chunk's bytes are written and flushed
to the partial output *before* its journal line is written, so every journalled chunk is on disk;
a resumed run cuts the partial output back to the last journalled offset (dropping what a dying
run wrote after it) and goes on from the next chunk. Both files are fsynced every few seconds and
at the end, so a power cut loses at most those seconds of work, never consistency.

The journal is locked (flock) while a run uses it, so two runs cannot write one output.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np

from privtext.errors import OutputError, ResumeError
from privtext.run.outputs import tmp_name
from privtext.text import ChunkCounters

VERSION = 1
SYNC_SECONDS = 2.0
_EDGE = 1 << 20


@dataclass(frozen=True)
class WorkPaths:
    part: Path
    journal: Path
    segments: Path

    @classmethod
    def for_target(cls, target: Path) -> WorkPaths:
        return cls(tmp_name(target, "part"), tmp_name(target, "journal"), tmp_name(target, "segments"))

    def exist(self) -> bool:
        return self.part.exists() or self.journal.exists() or self.segments.exists()

    def remove(self) -> None:
        for path in (self.part, self.journal):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(self.segments, ignore_errors=True)


def input_identity(path: str) -> dict[str, Any]:
    """Size, mtime and digests of the first and last MiB: a changed input is noticed without
    reading it whole (a resume must not splice two different corpora)."""
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(_EDGE))
        if st.st_size > _EDGE:
            fh.seek(max(_EDGE, st.st_size - _EDGE))
            digest.update(fh.read(_EDGE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": digest.hexdigest()}


def counters_to_dict(c: ChunkCounters) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "doc_hist"}
    nz = np.flatnonzero(c.doc_hist)
    out["doc_hist"] = {str(int(k)): int(c.doc_hist[k]) for k in nz}
    return out


def counters_from_dict(d: dict[str, Any]) -> ChunkCounters:
    hist_items = {int(k): int(v) for k, v in d.get("doc_hist", {}).items()}
    hist = np.zeros(max(hist_items, default=0) + 1, dtype=np.int64)
    for k, v in hist_items.items():
        hist[k] = v
    names = {f.name for f in fields(ChunkCounters)} - {"doc_hist"}
    return ChunkCounters(**{k: int(v) for k, v in d.items() if k in names}, doc_hist=hist)


@dataclass
class Journal:
    path: Path
    header: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    resumes: int = 0
    _fh: IO[str] | None = None
    _last_sync: float = 0.0

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Journal:
        try:
            fh = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the run journal {path} ({exc.strerror}); "
                              "check the output directory") from None
        _lock(fh, path)  # before truncating: a live run's journal is never touched
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"privtext_journal": VERSION, **header}, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            fh.close()
            raise OutputError(f"cannot write the run journal {path} ({exc.strerror}); "
                              "check the output directory") from None
        journal = cls(path, header)
        journal._fh = fh
        journal._last_sync = time.monotonic()
        return journal

    @classmethod
    def reopen(cls, path: Path, header: dict[str, Any]) -> Journal:
        """Loads a journal for --resume and checks it describes this very run."""
        try:
            fh = open(path, "r+", encoding="utf-8")
        except OSError as exc:
            raise ResumeError(f"cannot open the run journal {path} ({exc.strerror})") from None
        _lock(fh, path)
        # Complete lines end with a newline; whatever follows the last one was torn by the kill.
        lines = fh.read().split("\n")[:-1]
        try:
            stored = json.loads(lines[0])
        except (ValueError, IndexError):
            fh.close()
            raise ResumeError(f"the run journal {path} is damaged; delete it and start again "
                              "without --resume") from None
        if stored.pop("privtext_journal", None) != VERSION:
            fh.close()
            raise ResumeError(f"{path} was written by another privtext version; start again "
                              "without --resume")
        try:
            _check_same(stored, header)
        except ResumeError:
            fh.close()
            raise
        journal = cls(path, stored)
        good = len(lines[0]) + 1
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if "resume" in entry:
                journal.resumes = int(entry["resume"])
            else:
                journal.entries.append(entry)
            good += len(line) + 1
        fh.seek(0)
        fh.truncate(good)
        fh.seek(0, os.SEEK_END)
        journal._fh = fh
        journal.resumes += 1
        journal._write({"resume": journal.resumes, "at_entries": len(journal.entries)}, sync=True)
        return journal

    def commit(self, entry: dict[str, Any], data: Any = None) -> None:
        """Records a chunk whose bytes `data` (the partial output) already holds."""
        now = time.monotonic()
        sync = now - self._last_sync >= SYNC_SECONDS
        if sync and data is not None:
            data.flush(sync=True)  # the data is durable before the line that claims it
        self.entries.append(entry)
        self._write(entry, sync=sync)

    def _write(self, entry: dict[str, Any], sync: bool) -> None:
        assert self._fh is not None
        try:
            self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
            self._fh.flush()
            if sync:
                os.fsync(self._fh.fileno())
                self._last_sync = time.monotonic()
        except OSError as exc:
            raise OutputError(f"cannot write the run journal {self.path} ({exc.strerror}); "
                              "free space and rerun with --resume") from None

    def total_counters(self) -> ChunkCounters:
        total = ChunkCounters()
        for entry in self.entries:
            if "n" in entry:  # (an input-done line carries no counts)
                total.merge(counters_from_dict(entry["n"]))
        return total

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError, ValueError):
                self._fh.close()
            self._fh = None


def _lock(fh: IO[str], path: Path) -> None:
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise OutputError(f"another privtext run is writing this output (its journal {path} is "
                          "locked); wait for it or choose another -o") from None


def _check_same(stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses a resume whose inputs, settings, index or seed differ, naming what differs."""
    labels = {"inputs": "the inputs changed (size, time or content)",
              "contract": "the perturbation settings differ",
              "index": "the embedding index differs",
              "seed_sha256": "the seed differs (or one run had a seed and the other not)",
              "format": "the format differs", "output": "the output compression differs"}
    for key, label in labels.items():
        if stored.get(key) != current.get(key):
            if key == "inputs" and len(stored.get(key, [])) != len(current.get(key, [])):
                label = "the number of inputs differs"
            raise ResumeError(f"cannot resume: {label} since the interrupted run; rerun with "
                              "the same inputs and options, or start again without --resume")
