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

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from privtext import errors
from privtext.counters import Counters
from privtext.errors import PrivtextError, UsageError

# how a privtext error raised on an executor appears in the engine's exception text
_REMOTE_ERROR = re.compile(r"privtext\.errors\.(\w+): ([^\n]*)")


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


@contextlib.contextmanager
def executor_errors() -> Iterator[None]:
    """Turn a privtext error raised on an executor (which the engine wraps in its own exception
    with a remote traceback) back into that privtext error on the driver: one line naming the fix
    (e.g. a missing index cache), not a page of JVM or Ray frames."""
    try:
        yield
    except PrivtextError:
        raise
    except Exception as exc:
        found = _REMOTE_ERROR.search(str(exc))
        cls = getattr(errors, found.group(1), None) if found else None
        if found and isinstance(cls, type) and issubclass(cls, PrivtextError):
            raise cls(found.group(2).strip()) from None
        raise
