"""What a run counted: records, tokens, perturbed words, OOV, errors, nulls. Counts only, never content.

Counters are produced per chunk (CLI), per batch (library) or per partition (engines) and merged
wherever the report is built. `to_dict`/`from_dict` give a JSON-safe form so counters can travel
between processes and machines (a Spark accumulator, a Ray actor, a file) and be merged there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privtext.errors import UsageError

# The scalar counts, in report order. `doc_hist` is handled apart (it is a histogram).
SCALARS = ("records", "word_tokens", "other_tokens", "perturbed", "unchanged", "oov",
           "errors_skipped", "errors_kept", "null_values")


@dataclass
class Counters:
    """Counts only, never content. Merged across chunks, batches and partitions."""

    records: int = 0
    word_tokens: int = 0
    other_tokens: int = 0
    perturbed: int = 0
    unchanged: int = 0
    oov: int = 0
    errors_skipped: int = 0
    errors_kept: int = 0
    null_values: int = 0
    # histogram of perturbed tokens per document: doc_hist[c] = number of documents with c
    doc_hist: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    def merge(self, other: Counters) -> Counters:
        """Add `other` into these counters (in place) and return self, so merges chain."""
        for name in SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        size = max(len(self.doc_hist), len(other.doc_hist))
        merged = np.zeros(size, dtype=np.int64)
        merged[: len(self.doc_hist)] += self.doc_hist
        merged[: len(other.doc_hist)] += other.doc_hist
        self.doc_hist = merged
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain ints and a list: JSON-safe. Trailing empty histogram bins are dropped."""
        hist = np.asarray(self.doc_hist, dtype=np.int64)
        nonzero = np.flatnonzero(hist)
        hist = hist[: int(nonzero.max()) + 1] if len(nonzero) else hist[:1]
        out: dict[str, Any] = {name: int(getattr(self, name)) for name in SCALARS}
        out["doc_hist"] = [int(v) for v in hist.tolist()]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Counters:
        """The inverse of `to_dict`; refuses unknown keys and negative counts."""
        unknown = set(data) - set(SCALARS) - {"doc_hist"}
        if unknown:
            raise UsageError(f"unknown counter(s) {', '.join(sorted(unknown))}; "
                             f"expected the keys of Counters.to_dict(): {', '.join(SCALARS)}, doc_hist")
        values: dict[str, Any] = {}
        for name in SCALARS:
            value = data.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise UsageError(f"counter {name!r} must be a non-negative integer")
            values[name] = int(value)
        hist = data.get("doc_hist", [0])
        try:
            array = np.asarray(hist, dtype=np.int64)
        except (TypeError, ValueError):
            raise UsageError("counter 'doc_hist' must be a list of non-negative integers") from None
        if array.ndim != 1 or len(array) == 0 or (array < 0).any():
            raise UsageError("counter 'doc_hist' must be a non-empty list of non-negative integers")
        return cls(**values, doc_hist=array)

    @classmethod
    def sum(cls, many: Any) -> Counters:
        """Merge an iterable of Counters (or their dicts) into a fresh object."""
        total = cls()
        for item in many:
            total.merge(item if isinstance(item, Counters) else cls.from_dict(item))
        return total

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Counters):
            return NotImplemented
        return self.to_dict() == other.to_dict()
