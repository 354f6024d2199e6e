"""The library's front door: `Anonymizer` opens (or builds) the index, creates and prepares the
mechanism once, and perturbs lists of texts or Arrow columns with keyed randomness.

Randomness. A call with ``stream=`` draws from the Generator keyed by (run key, stream id), the
same derivation the CLI uses for (run key, input number, chunk index): ``stream=(i, c)`` is
exactly the CLI's chunk c of input i, and ``stream=c`` is ``(0, c)``. A call without ``stream=``
takes the next number of the object's own counter in a separate namespace (a sub-key of the run
key), so implicit and explicit streams never meet. Using one stream twice on one object raises:
identical noise on two batches must never happen silently.

Copies. Pickling carries the spec (mechanism, ε, params, OOV policy, index path and manifest
digest) and the run key, never arrays; unpickling opens the index by memory map and checks the
digest. A copy refuses implicit streams (two copies counting from zero would repeat noise): on an
executor, pass ``stream=``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from privtext.counters import Counters
from privtext.errors import IndexCacheError, InputTypeError, UsageError
from privtext.index import DEFAULT_NEIGHBORS, DEFAULT_VOCAB_SIZE, EmbeddingIndex
from privtext.randomness import chunk_rng, run_key
from privtext.spec import RunSpec, manifest_digest
from privtext.text import DEFAULT_MASK_TOKEN, OovPolicy, TextPerturber

if TYPE_CHECKING:
    from privtext.mechanisms.base import Mechanism

STATE_FORMAT = 1
_IMPLICIT_DOMAIN = b"privtext-implicit-streams-v1\x00"

StreamId = int | tuple[int, int]


def open_index(embeddings: str = "default", vocab_size: int | None = DEFAULT_VOCAB_SIZE, *,
               path: str | Path | None = None, embeddings_format: str = "auto",
               neighbors: int = DEFAULT_NEIGHBORS, cache_dir: str | Path | None = None,
               trust_pickle: bool = False, progress: bool | None = False) -> EmbeddingIndex:
    """The index for an embedding: opened from the cache, or built there first.

    ``path=`` opens an existing cache directory directly (nothing is built or hashed)."""
    if path is not None:
        if not (Path(path) / "manifest.json").is_file():
            raise IndexCacheError(f"no index cache at {path}; build one with privtext index "
                                  "or privtext.open_index(embeddings=...)")
        return EmbeddingIndex(Path(path))
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    spec = IndexSpec(EmbeddingSource(embeddings, embeddings_format, trust_pickle), vocab_size, neighbors)
    return ensure_index(spec, Path(cache_dir) if cache_dir is not None else None,
                        progress=progress).index


def list_mechanisms() -> list[str]:
    """Names of the registered mechanisms (built-ins and plugins); `privtext mechanisms` details them."""
    from privtext.mechanisms import available

    return list(available())


class _Core:
    """The heavy, shareable part: index (memory-mapped), prepared mechanism, text perturber."""

    def __init__(self, mechanism: Any, oov: str, mask_token: str):
        self.index = mechanism.index
        self.mechanism = mechanism
        self.perturber = TextPerturber(self.index, mechanism, oov, mask_token)

    @classmethod
    def create(cls, index: EmbeddingIndex, mechanism: str, epsilon: float,
               params: dict[str, Any], oov: str, mask_token: str) -> _Core:
        from privtext.mechanisms import create

        created = create(mechanism, index, epsilon, params)
        created.prepare()
        core = cls(created, oov, mask_token)
        core.perturber.prepare()
        return core


# One core per (index, spec) per process: an engine executor restores an Anonymizer for every
# task, and should open the index and prepare the mechanism once, not per task.
_CORES: dict[tuple[str, str, str], _Core] = {}
_CORES_LOCK = threading.Lock()


def _stream_key(stream: Any) -> tuple[int, int]:
    def ok(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) >= 0

    if ok(stream):
        return (0, int(stream))
    if isinstance(stream, (tuple, list)) and len(stream) == 2 and all(ok(v) for v in stream):
        return (int(stream[0]), int(stream[1]))
    raise UsageError("stream= must be a non-negative integer or a pair of them such as "
                     "(partition id, batch number)")


class Anonymizer:
    """Word-level DP text perturbation with one mechanism on one index.

    >>> anon = Anonymizer("gumbel", epsilon=300)          # doctest: +SKIP
    >>> anon.perturb(["The patient called.", None])         # doctest: +SKIP
    """

    def __init__(self, mechanism: str = "gumbel", *, epsilon: float,
                 params: dict[str, Any] | None = None, embeddings: str = "default",
                 vocab_size: int | None = DEFAULT_VOCAB_SIZE, oov: str = "mask",
                 seed: str | int | None = None, mask_token: str = DEFAULT_MASK_TOKEN,
                 embeddings_format: str = "auto", neighbors: int = DEFAULT_NEIGHBORS,
                 cache_dir: str | Path | None = None, trust_pickle: bool = False,
                 index: EmbeddingIndex | str | Path | None = None,
                 progress: bool | None = False):
        from privtext.mechanisms import get
        from privtext.mechanisms.base import parse_params, validate_epsilon

        # Everything that can be checked without the index is checked before it is built.
        if oov not in {p.value for p in OovPolicy}:
            raise UsageError(f"oov must be one of mask, drop, keep, got {oov!r}")
        params = dict(params or {})
        cls = get(mechanism)
        validate_epsilon(epsilon)
        parse_params(cls.Params, params)
        if index is None:
            opened = open_index(embeddings, vocab_size, embeddings_format=embeddings_format,
                                neighbors=neighbors, cache_dir=cache_dir,
                                trust_pickle=trust_pickle, progress=progress)
        elif isinstance(index, EmbeddingIndex):
            opened = index
        else:
            opened = open_index(path=index)
        core = _Core.create(opened, mechanism, float(epsilon), params, oov, mask_token)
        spec = RunSpec.from_mechanism(core.mechanism, oov, mask_token, seed)
        self._init(core, spec, run_key(seed), copy=False)

    @classmethod
    def from_mechanism(cls, mechanism: Mechanism, *, oov: str = "mask",
                       mask_token: str = DEFAULT_MASK_TOKEN, seed: str | int | None = None,
                       key: int | None = None) -> Anonymizer:
        """An Anonymizer around a mechanism already created and prepared on its index, for
        analysis tools that sweep ε or parameters over one index (`privtext evaluate`).

        `key` is a run key from `privtext.randomness.run_key` (secret, like a seed) for callers
        that derive their own keys; without it the key comes from `seed` as in the constructor."""
        if oov not in {p.value for p in OovPolicy}:
            raise UsageError(f"oov must be one of mask, drop, keep, got {oov!r}")
        anon = cls.__new__(cls)
        spec = RunSpec.from_mechanism(mechanism, oov, mask_token, seed)
        anon._init(_Core(mechanism, oov, mask_token), spec,
                   key if key is not None else run_key(seed), copy=False)
        return anon

    def _init(self, core: _Core, spec: RunSpec, key: int, copy: bool) -> None:
        self._core = core
        self.spec = spec
        self._key = key
        self._implicit_key = int.from_bytes(
            hashlib.sha256(_IMPLICIT_DOMAIN + key.to_bytes(32, "big")).digest(), "big")
        self._copy = copy
        self._counters = Counters()
        self._used: set[tuple[int, int]] = set()
        self._next_implicit = 0
        self._lock = threading.Lock()
        self._seconds = 0.0

    # --- what users read ----------------------------------------------------------------------

    @property
    def index(self) -> EmbeddingIndex:
        return self._core.index

    @property
    def mechanism(self) -> Any:
        return self._core.mechanism

    @property
    def counters(self) -> Counters:
        """A copy of the counts of everything perturbed so far by this object."""
        with self._lock:
            return Counters.from_dict(self._counters.to_dict())

    def report(self, run_info: dict[str, Any] | None = None, risk: bool = False) -> dict[str, Any]:
        """The epsilon report of everything this object perturbed so far. `risk=True` adds the
        attack-success section (computed once per index and mechanism, then cached with the
        index), as `privtext perturb` does by default."""
        from privtext.report import attack_success_section, build_report

        with self._lock:
            info: dict[str, Any] = {
                "seconds": self._seconds,
                "keyed_by": "run key, stream id (explicit stream=, or the object's own counter "
                            "in a separate namespace)",
                "engine": {"name": "library"},
                "input": {"streams": len(self._used)},
            }
        if risk:
            info["attack_success"] = attack_success_section(self.mechanism)
        info.update(run_info or {})
        return build_report(self.spec, self.counters, info)

    def __repr__(self) -> str:
        return (f"Anonymizer({self.spec.mechanism!r}, epsilon={self.spec.epsilon!r}, "
                f"params={self.spec.params!r}, oov={self.spec.oov!r}, "
                f"index={self.spec.index_path!r})")

    # --- perturbing ---------------------------------------------------------------------------

    def _take_stream(self, stream: StreamId | None) -> np.random.Generator:
        with self._lock:
            if stream is None:
                if self._copy:
                    raise UsageError(
                        "this Anonymizer is a copy (unpickled in another process): pass stream= "
                        "(e.g. (partition id, batch number)) so copies never repeat each other's noise")
                number = self._next_implicit
                self._next_implicit += 1
                return chunk_rng(self._implicit_key, 0, number)
            key = _stream_key(stream)
            if key in self._used:
                raise UsageError(
                    f"stream {key} was already used by this Anonymizer; reusing it would repeat "
                    "the same noise: give every batch its own stream id")
            self._used.add(key)
            return chunk_rng(self._key, *key)

    def perturb(self, texts: Iterable[str | None], stream: StreamId | None = None) -> list[str | None]:
        """Perturbed copies of `texts`, in order; None stays None (counted as a null value)."""
        return self.perturb_batch(texts, stream)[0]

    def perturb_batch(self, texts: Iterable[str | None],
                      stream: StreamId | None = None) -> tuple[list[str | None], Counters]:
        """`perturb`, also returning this batch's own counts (they are added to `counters` as
        well): for callers that merge counts themselves, such as the CLI's chunks."""
        if isinstance(texts, (str, bytes)):
            raise InputTypeError("perturb() takes a list of texts, not one string; "
                                 "wrap it: anon.perturb([text])")
        values = list(texts)
        slots: list[int] = []
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, str):
                raise InputTypeError(f"item {i} is a {type(value).__name__}, not a str or None; "
                                     "convert the column to text first")
            slots.append(i)
        rng = self._take_stream(stream)
        start = time.perf_counter()
        new_texts, counters = self._core.perturber.perturb_documents([values[i] for i in slots], rng)
        counters.null_values = len(values) - len(slots)
        out: list[str | None] = list(values)
        for i, text in zip(slots, new_texts):
            out[i] = text
        with self._lock:
            self._counters.merge(counters)
            self._seconds += time.perf_counter() - start
        return out, counters

    def perturb_spans(self, text: str, starts: Any, ends: Any,
                      stream: StreamId | None = None) -> tuple[str, np.ndarray, np.ndarray, Counters]:
        """The documents text[starts[i]:ends[i]] perturbed in place, for callers whose records
        sit in one buffer (a codec's chunk): (new text, new starts, new ends, this call's counts).

        Everything outside the spans is kept; spans are ascending with at least one character
        between two of them. The result is `perturb_batch` of the span texts on the same stream,
        spliced back, without cutting the texts out one by one."""
        if not isinstance(text, str):
            raise InputTypeError(f"perturb_spans() takes a str, not a {type(text).__name__}")
        rng = self._take_stream(stream)
        start = time.perf_counter()
        try:
            new_text, new_starts, new_ends, counters = self._core.perturber.perturb_spans(text, starts, ends, rng)
        except ValueError as exc:
            raise UsageError(f"perturb_spans(): {exc}") from None
        with self._lock:
            self._counters.merge(counters)
            self._seconds += time.perf_counter() - start
        return new_text, new_starts, new_ends, counters

    def writes_json_plain(self) -> bool:
        """Whether every replacement this object can write is a JSON string's content as is
        (no quote, backslash or control character), so a codec may splice it unescaped."""
        return self._core.perturber.writes_json_plain()

    def perturb_arrow(self, data: Any, column: str = "text", stream: StreamId | None = None) -> Any:
        """A copy of a pyarrow RecordBatch or Table with `column` perturbed.

        Other columns, row order, nulls, field metadata and schema metadata are kept; a string
        column stays string, a large_string stays large_string, a dictionary-encoded column is
        decoded to its value type (its dictionary would not survive perturbation anyway).
        """
        import pyarrow as pa

        if not isinstance(data, (pa.RecordBatch, pa.Table)):
            raise InputTypeError(f"perturb_arrow() takes a pyarrow RecordBatch or Table, "
                                 f"not a {type(data).__name__}")
        schema = data.schema
        if column not in schema.names:
            raise UsageError(f"column {column!r} is not in the data; pass column= with one of: "
                             f"{', '.join(schema.names)}")
        position = schema.get_field_index(column)
        if position < 0:
            raise UsageError(f"column name {column!r} appears more than once; rename the duplicates")
        field = schema.field(position)
        value_type = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
            raise InputTypeError(f"column {column!r} has type {field.type}, not string; "
                                 "pass column= with a text column")
        new_values = pa.array(self.perturb(data.column(position).to_pylist(), stream), type=value_type)
        new_schema = schema.set(position, field.with_type(value_type))
        columns = [new_values if i == position else data.column(i) for i in range(data.num_columns)]
        if isinstance(data, pa.RecordBatch):
            return pa.RecordBatch.from_arrays(columns, schema=new_schema)
        return pa.Table.from_arrays(columns, schema=new_schema)

    # --- copies -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a copy needs: spec and run key (secret: treat it like the seed). No arrays."""
        return {"format": STATE_FORMAT, "spec": self.spec.to_dict(), "run_key": self._key}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (restore, (self.state(),))

    def fork(self) -> Anonymizer:
        """An in-process copy that shares index and mechanism, with fresh counters and streams
        (the copy refuses implicit streams, like an unpickled one)."""
        copy = Anonymizer.__new__(Anonymizer)
        copy._init(self._core, self.spec, self._key, copy=True)
        return copy


def restore(state: dict[str, Any], index_path: str | Path | None = None) -> Anonymizer:
    """Rebuild an Anonymizer from `Anonymizer.state()` (this is what unpickling calls).

    `index_path` points at a shipped copy of the cache (e.g. from SparkContext.addFile); the
    default is the path recorded on the driver. Either way the manifest digest must match.
    """
    if state.get("format") != STATE_FORMAT:
        raise UsageError("this Anonymizer was pickled by another privtext version; "
                         "install the same privtext version on the driver and the executors")
    spec = RunSpec.from_dict(state["spec"])
    path = Path(index_path) if index_path is not None else Path(spec.index_path)
    if not (path / "manifest.json").is_file():
        raise IndexCacheError(
            f"index cache {path} is not on this machine; put the cache on a path every executor "
            "can read, or let the engine ship it (ship_index=True; see docs/engines.md)")
    digest = manifest_digest(path)
    if digest != spec.index_digest:
        raise IndexCacheError(
            f"index cache {path} is not the one this Anonymizer was made with (manifest digest "
            "differs); ship the driver's cache (ship_index=True) or copy it to this path")
    cache_key = (str(path.resolve()), digest, repr(sorted(
        (k, repr(v)) for k, v in state["spec"].items() if k not in ("index_path",))))
    with _CORES_LOCK:
        core = _CORES.get(cache_key)
        if core is None:
            core = _Core.create(EmbeddingIndex(path), spec.mechanism, spec.epsilon, spec.params,
                         spec.oov, spec.mask_token)
            _CORES[cache_key] = core
    anon = Anonymizer.__new__(Anonymizer)
    anon._init(core, spec, int(state["run_key"]), copy=True)
    return anon
