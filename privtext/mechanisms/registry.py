"""Name → mechanism class. Built-ins and third-party plugins register through the same path.

A plugin package declares an entry point in the group ``privtext.mechanisms`` whose object is a
`Mechanism` subclass; importing it is enough if the class uses `@register`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from privtext.errors import UsageError

if TYPE_CHECKING:
    from privtext.index import EmbeddingIndex
    from privtext.mechanisms.base import Mechanism

_REGISTRY: dict[str, type[Mechanism]] = {}
_BUILTINS = ("laplace", "gumbel", "tem", "mahalanobis", "vickrey", "density", "santext", "custext")
_loaded = False


def register(cls: type[Mechanism]) -> type[Mechanism]:
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise UsageError(f"two mechanisms are registered under the name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTINS:
        importlib.import_module(f"privtext.mechanisms.{module}")
    from importlib.metadata import entry_points  # ~14 ms: only when plugins are looked up

    for ep in entry_points(group="privtext.mechanisms"):
        register(ep.load())


def available() -> dict[str, type[Mechanism]]:
    _load()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Mechanism]:
    if name in _BUILTINS:  # one module, no plugin lookup: a run starts faster
        importlib.import_module(f"privtext.mechanisms.{name}")
        return _REGISTRY[name]
    mechanisms = available()
    if name not in mechanisms:
        raise UsageError(
            f"unknown mechanism {name!r}; choose one of {', '.join(mechanisms)} "
            "(privtext mechanisms lists them)"
        )
    return mechanisms[name]


def create(name: str, index: EmbeddingIndex, epsilon: float, raw_params: dict[str, Any]) -> Mechanism:
    """Instantiate a mechanism from its name, ε and raw (string or TOML) parameter values."""
    from privtext.mechanisms.base import parse_params

    cls = get(name)
    return cls(index, epsilon, parse_params(cls.Params, raw_params))
