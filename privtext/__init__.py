"""privtext: word-level differentially private text anonymisation.

The library is the product; the ``privtext`` command and the engine adapters are thin layers over
it. One import is enough:

    import privtext
    anon = privtext.Anonymizer("gumbel", epsilon=300)
    anon.perturb(["The patient called on Monday.", None])
    anon.report()

`import privtext` stays cheap: the heavy names (numpy, FAISS, the index) load on first use.
"""

from importlib import import_module
from typing import Any

from privtext.errors import (
    EmbeddingError,
    IndexCacheError,
    InfeasibleEpsilonError,
    InputFormatError,
    InputTypeError,
    ParameterError,
    PrivtextError,
    UsageError,
)

# public name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "Anonymizer": "privtext.api",
    "open_index": "privtext.api",
    "list_mechanisms": "privtext.api",
    "restore": "privtext.api",
    "Counters": "privtext.counters",
    "build_report": "privtext.report",
    "RunSpec": "privtext.spec",
    "limit_threads": "privtext.threads",
}

__all__ = [
    "Anonymizer",
    "Counters",
    "EmbeddingError",
    "IndexCacheError",
    "InfeasibleEpsilonError",
    "InputFormatError",
    "InputTypeError",
    "ParameterError",
    "PrivtextError",
    "RunSpec",
    "UsageError",
    "__version__",
    "build_report",
    "limit_threads",
    "list_mechanisms",
    "open_index",
    "restore",
]


def _version() -> str:
    # importlib.metadata costs ~20 ms of every launch; only a report or --version needs it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("privtext")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value = globals()["__version__"] = _version()
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'privtext' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
