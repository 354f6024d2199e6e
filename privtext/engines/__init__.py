"""Adapters that run an `Anonymizer` inside a distributed data engine (optional extras).

    from privtext.engines.spark import perturb_dataframe   # pip install 'privtext[spark]'
    from privtext.engines.ray import perturb_dataset       # pip install 'privtext[ray]'

Both are thin: the executors restore the pickled Anonymizer (spec + run key; the index is opened
by memory map from a shared path or from the engine's own file shipping), limit FAISS/BLAS to one
thread, perturb each batch with a stream id derived from its position in the data (so a seeded
run with fixed partitioning is reproducible), and report per-partition counters keyed by that
position. The driver merges them into one epsilon report with `privtext.build_report`; a retried
or recomputed partition overwrites its own entry with identical counts instead of adding twice.
"""

from __future__ import annotations

from typing import Any

from privtext.counters import Counters
from privtext.errors import UsageError


def merge_keyed(parts: dict[Any, dict[str, Any]], expected: int | None = None) -> Counters:
    """Merge per-partition counters keyed by partition; check none is missing."""
    if expected is not None and len(parts) != expected:
        raise UsageError(f"the engine reported counters for {len(parts)} of {expected} partitions; "
                         "re-run the job (a partition was lost before it reported)")
    return Counters.sum(parts[k] for k in sorted(parts))


def require(module: str, extra: str) -> Any:
    """Import an engine package or fail with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed; install it with pip install 'privtext[{extra}]'") from None
