"""What every mechanism is: typed parameters, a privacy map beside the sampler, batched ids in/out.

A mechanism never touches global random state: every sampling call receives an injected
`numpy.random.Generator`. It works on integer word ids of a whole chunk at once and releases only
the chosen output ids — never noisy vectors, scores or per-token diagnostics.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from privtext.errors import ParameterError
from privtext.index import EmbeddingIndex, Geometry


@dataclass(frozen=True)
class Guarantee:
    """The statement a mechanism's privacy map derives; the report prints exactly this."""

    kind: str  # "metric" (d_X-privacy), "pure" (ε-DP), or "relaxed" (see statement)
    rate: float  # ε: per unit of `metric` distance for kind "metric", per token for "pure"
    metric: str | None  # the distance the rate is measured in, None for pure DP
    per_token_pure_bound: float | None  # rate · Δ_max for metric guarantees; None if unbounded
    statement: str  # one plain sentence
    conditions: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    approximate: bool = False  # True when the sampler only approximates the stated distribution

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MechanismParams:
    """Base for a mechanism's options. Subclasses declare fields with `param(...)` metadata."""

    def validate(self, geometry: Geometry) -> None:
        """Raise ParameterError naming the valid range; default checks the declared bounds."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ParameterError(
                    f"--param {f.name}={value} is not valid; choose one of {', '.join(map(str, choices))}"
                )
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ParameterError(f"--param {f.name} must be a finite number")
                low_ok = lo is None or (value > lo if f.metadata.get("min_open") else value >= lo)
                high_ok = hi is None or (value < hi if f.metadata.get("max_open") else value <= hi)
                if not (low_ok and high_ok):
                    raise ParameterError(f"--param {f.name}={value} is out of range; valid: {describe_range(f)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


def describe_range(f: dataclasses.Field[Any]) -> str:
    if "choices" in f.metadata:
        return " | ".join(map(str, f.metadata["choices"]))
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    left = "(" if f.metadata.get("min_open") else "["
    right = ")" if f.metadata.get("max_open") else "]"
    if lo is None and hi is None:
        return "any"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def parse_params(params_cls: type[MechanismParams], raw: dict[str, Any]) -> MechanismParams:
    """Build a params object from KEY=VALUE strings (CLI) or TOML values, converting by type."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ParameterError(f"unknown parameter {key!r}; this mechanism takes: {known}")
        values[key] = _convert(key, value, hints[key])
    return params_cls(**values)


def _convert(key: str, value: Any, hint: Any) -> Any:
    target = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        target = args[0]
    if not isinstance(value, str):
        if target is float and isinstance(value, int):
            return float(value)
        return value
    try:
        if target is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float):
            return target(value)
    except ValueError:
        raise ParameterError(
            f"--param {key}: cannot read the value as {target.__name__}; give e.g. {key}=1"
        ) from None
    return value


class Mechanism(ABC):
    """A word-level perturbation mechanism. Subclasses register with `@register`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    # The guarantee in words, for listings; the exact statement for given ε, params and index
    # is what `privacy_map` returns (and what the report prints).
    guarantee_summary: ClassVar[str] = "see the report of a run for the exact statement"
    Params: ClassVar[type[MechanismParams]] = MechanismParams

    def __init__(self, index: EmbeddingIndex, epsilon: float, params: MechanismParams | None = None):
        validate_epsilon(epsilon)
        self.index = index
        self.epsilon = float(epsilon)
        self.params = params if params is not None else self.Params()
        self.params.validate(index.geometry)
        self.guarantee = self.privacy_map(self.epsilon, self.params, index.geometry)

    @classmethod
    @abstractmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        """The guarantee this mechanism states for (ε, params, index geometry)."""

    @classmethod
    def feasible_epsilon(cls, params: MechanismParams, geometry: Geometry) -> tuple[float, float]:
        """The open interval (low, high) of ε this mechanism accepts on an index.

        Tools that search over ε (`privtext calibrate`) start inside it. The default is
        (0, inf); a mechanism whose calibration only exists above a floor overrides this
        (truncated Gumbel: ε must exceed ε_∞ of the index).
        """
        return 0.0, math.inf

    def derived(self) -> dict[str, Any]:
        """Values derived from ε and the index (e.g. a noise scale) for the report."""
        return {}

    def prepare(self) -> None:
        """Build per-index artifacts (cached); called once in the parent before workers start."""

    @abstractmethod
    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Map a 1-D array of vocabulary ids to perturbed ids (same shape, int64)."""


def validate_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ParameterError(f"--epsilon must be a positive finite number, got {epsilon}")
