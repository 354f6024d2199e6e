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
    # The uniform floor (mechanisms.md §9) of gumbel and custext: the realised probability α
    # (None when the mechanism has no floor parameter) and the q̄ ≥ max Q(y|x) its bound uses.
    floor: float | None = None
    floor_qbar: float | None = None
    # gumbel: whether the published metric statement at rate ε holds for every pair (None when
    # the mechanism has no published statement to cover).
    published_statement_covered: bool | None = None
    # Plain warnings a user must see (each one line): the report flags them and the CLI prints them.
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExponentialForm:
    """A closed form of P[y|x] over the whole vocabulary (santext, tem, density exact):

        Q(y|x) ∝ exp(log_prior(y) − scale·min(d(x, y), clamp))   for y in [lo, n),

    a word x < lo is kept with probability `keep` and otherwise replaced by a draw from Q (SanText+),
    and P = (1 − floor)·that + floor/n. `log_prior` covers [lo, n) (None = flat)."""

    scale: float
    clamp: float | None = None
    log_prior: np.ndarray | None = None
    lo: int = 0
    keep: float = 0.0
    floor: float = 0.0


@dataclass(frozen=True)
class GroupForm:
    """A closed form where each word's output lies in a small public set (custext): row x of
    `members` ((n, K) ids, −1 padding) carries probabilities `probabilities` (0 on padding);
    P = (1 − floor)·that + floor/n."""

    members: np.ndarray
    probabilities: np.ndarray
    floor: float = 0.0


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
    range_text: str | None = None,
) -> Any:
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "max_open": max_open}
    if choices is not None:
        meta["choices"] = choices
    if range_text is not None:  # a value the class checks itself (e.g. "auto | [0, 1]")
        meta["range_text"] = range_text
    return field(default=default, metadata=meta)


def describe_range(f: dataclasses.Field[Any]) -> str:
    if "range_text" in f.metadata:
        return str(f.metadata["range_text"])
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

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """The executable privacy map: for each pair (x_ids[i], x2_ids[i]), the stated bound in
        nats on |ln P[y|x] − ln P[y|x']| over every output y; inf where none is stated, 0 for
        x = x'. Tools (report, audit, risk, exact tests) read this, never the statement text.

        This default reads the Guarantee (metric in the index's own metric: rate·d; pure: rate),
        so a plugin that only declares its map is audited and reported; every built-in mechanism
        overrides it beside its sampler."""
        g = self.guarantee
        x, x2 = pair_ids(x_ids, x2_ids)
        if g.kind == "metric" and g.metric == self.index.geometry.metric:
            out = g.rate * pair_distances(self.index, x, x2)
        elif g.kind == "pure":
            out = np.full(len(x), g.rate, dtype=np.float64)
        else:
            out = np.full(len(x), np.inf)
        out[x == x2] = 0.0
        return out

    def privacy_loss_on_outputs(self, x_ids: np.ndarray, x2_ids: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray | None]:
        """(bounds, outputs): like `privacy_loss`, but a relaxed guarantee may state a finite
        bound that holds only for outputs y in a public set (boolean mask over the vocabulary;
        None = every output). SanText+ overrides it; `privacy_loss` is always the every-output
        bound."""
        return self.privacy_loss(x_ids, x2_ids), None

    def closed_form(self) -> Any:
        """An exact description of P[y|x] that `privtext.analysis.risk` can evaluate blockwise (see
        `privtext.analysis.risk.ExponentialForm` and `GroupForm`), or None when the output distribution
        has no closed form (nearest word to a continuous noisy point; truncated Gumbel)."""
        return None

    def prepare(self) -> None:
        """Build per-index artifacts (cached); called once in the parent before workers start."""

    @abstractmethod
    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Map a 1-D array of vocabulary ids to perturbed ids (same shape, int64)."""


def pair_ids(x_ids: np.ndarray, x2_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.atleast_1d(np.asarray(x_ids, dtype=np.int64))
    x2 = np.atleast_1d(np.asarray(x2_ids, dtype=np.int64))
    if x.shape != x2.shape or x.ndim != 1:
        raise ValueError("privacy_loss takes two 1-D id arrays of the same length")
    return x, x2


def pair_distances(index: EmbeddingIndex, x: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """Euclidean d(x_i, x2_i) in float64 (the raw vectors, as every calibration uses)."""
    a = np.asarray(index.vectors[np.asarray(x, dtype=np.int64)], dtype=np.float64)
    b = np.asarray(index.vectors[np.asarray(x2, dtype=np.int64)], dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", a - b, a - b))


def validate_epsilon(epsilon: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ParameterError(f"--epsilon must be a positive finite number, got {epsilon}")
