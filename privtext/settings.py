"""One typed, validated settings object for a perturb run, built from a TOML config and flags.

Every value goes through the same coercion whether it came from the command line (a string, or a
value click already typed) or from the config file (a TOML value), so `workers = 0` and
`--workers 0` mean the same thing, and a config value of the wrong type is a one-line usage error
naming the key, never a traceback deep in the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from dataclasses import field as dc_field
from enum import Enum
from pathlib import Path
from typing import Any

from privtext.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class OnError(str, Enum):
    FAIL = "fail"  # stop at the first unreadable record (default)
    SKIP = "skip"  # drop it from the output
    KEEP = "keep"  # copy it unchanged (unprotected: flagged in the report)


DEFAULT_MASK_TOKEN = "[OOV]"


class OovPolicy(str, Enum):
    MASK = "mask"  # replace by a fixed placeholder (default)
    DROP = "drop"  # remove the token
    KEEP = "keep"  # pass it through unchanged: explicit opt-in, warned and flagged in the report


class Format(str, Enum):
    JSONL = "jsonl"
    PARQUET = "parquet"
    TEXT = "text"


EMBEDDINGS_FORMATS = ("auto", "glove", "word2vec", "word2vec-bin", "fasttext-vec", "kv")
DEFAULT_CHUNK_SIZE = 1000
# A chunk also ends once it holds this many bytes, so a chunk of long records does not hold
# chunk_size of them in memory at once: memory follows the largest record, not the chunk size.
# 256 KiB: a worker's working set then stays in its core's cache, which made the chunk path ~6%
# faster per CPU-second than 1 MiB on 20 Newsgroups, and halves its transient memory.
CHUNK_BYTES = 1 << 18


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class PerturbSettings:
    """What a perturb run does. Construct directly (library) or through `from_sources` (CLI)."""

    mechanism: str
    epsilon: float
    params: dict[str, Any] = dc_field(default_factory=dict)
    field: str = "text"
    oov: OovPolicy = OovPolicy.MASK
    mask_token: str = DEFAULT_MASK_TOKEN
    on_error: OnError = OnError.FAIL
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workers: int = 0  # 0: one per available core
    seed: str | None = None
    format: Format | None = None  # None: inferred from the file extensions
    embeddings: str = "default"
    embeddings_format: str = "auto"
    vocab_size: int = 100_000
    neighbors: int = 64
    max_rows_per_file: int | None = None  # Parquet output: split into files of at most N rows

    def __post_init__(self) -> None:
        # Library callers may pass plain strings and ints; coerce them exactly as the CLI does.
        for f in fields(self):
            coerce = _COERCE.get(f.name)
            if coerce is not None:
                setattr(self, f.name, coerce(f.name, getattr(self, f.name), "setting"))

    def validate(self) -> None:
        """Kept for callers of the old API: construction already validated everything."""
        self.__post_init__()

    @property
    def field_path(self) -> list[str]:
        return self.field.split(".")

    @classmethod
    def from_sources(cls, config: Mapping[str, Any], flags: Mapping[str, Any],
                     config_name: str = "config") -> PerturbSettings:
        """`flags` holds only the options given on the command line (they win over the config);
        `config` the parsed TOML. Unknown config keys are refused so a typo does not pass."""
        unknown = set(config) - CONFIG_KEYS
        if unknown:
            raise UsageError(f"unknown key(s) in {config_name}: {', '.join(sorted(unknown))}; "
                             f"valid keys: {', '.join(sorted(CONFIG_KEYS))}")
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key == "params":
                continue
            values[key] = _COERCE[key](key, value, config_name)
        params = config.get("params", {})
        if not isinstance(params, dict):
            raise UsageError(f"'params' in {config_name} must be a table ([params]); see privtext mechanisms")
        merged_params = {str(k): v for k, v in params.items()}
        for key, value in flags.items():
            if key == "params":
                merged_params.update(value)
            elif value is not None:
                values[key] = _COERCE[key](key, value, "option")
        if values.get("epsilon") is None:
            raise UsageError("--epsilon is required (or set epsilon in --config); see privtext mechanisms")
        if "mechanism" not in values:
            values["mechanism"] = "gumbel"
        return cls(params=merged_params, **values)

    def with_(self, **changes: Any) -> PerturbSettings:
        return replace(self, **changes)

    def effective_workers(self) -> int:
        return self.workers or default_workers()

    def output_contract(self) -> dict[str, Any]:
        """Every setting that changes the output bytes (the journal refuses a resume that differs)."""
        return {
            "mechanism": self.mechanism, "epsilon": self.epsilon,
            "params": {k: str(v) for k, v in sorted(self.params.items())},
            "field": self.field, "oov": self.oov.value, "mask_token": self.mask_token,
            "on_error": self.on_error.value, "chunk_size": self.chunk_size, "chunk_bytes": CHUNK_BYTES,
            "max_rows_per_file": self.max_rows_per_file,
        }


def load_config(path: Path | str | None) -> dict[str, Any]:
    """A TOML config as a dict; every way it can be unreadable is a one-line usage error."""
    if path is None:
        return {}
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"config path {path} is a directory; pass a .toml file") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path} ({exc.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {exc.start}); "
                         "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML ({exc})") from None


# --- coercion: one function per key, used for flags, config values and library arguments -------


def _where(key: str, origin: str) -> str:
    return f"--{key.replace('_', '-')}" if origin == "option" else f"{key!r} in {origin}"


def _str(key: str, value: Any, origin: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{_where(key, origin)} must be a string, got {type(value).__name__}")
    return value


def _int(minimum: int) -> Callable[[str, Any, str], int]:
    def coerce(key: str, value: Any, origin: str) -> int:
        if isinstance(value, bool):
            number = None
        elif isinstance(value, int):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        else:
            number = None
        if number is None:
            raise UsageError(f"{_where(key, origin)} must be a whole number, got {_show(value)}")
        if number < minimum:
            raise UsageError(f"{_where(key, origin)} must be at least {minimum}, got {number}")
        return number

    return coerce


def _float(key: str, value: Any, origin: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or math.isnan(number):
        raise UsageError(f"{_where(key, origin)} must be a number, got {_show(value)}")
    return number


def _optional(inner: Callable[[str, Any, str], Any]) -> Callable[[str, Any, str], Any]:
    def coerce(key: str, value: Any, origin: str) -> Any:
        return None if value is None else inner(key, value, origin)

    return coerce


def _enum(enum: type[Enum]) -> Callable[[str, Any, str], Any]:
    choices = [e.value for e in enum]  # type: ignore[attr-defined]

    def coerce(key: str, value: Any, origin: str) -> Any:
        if value is None and enum is Format:
            return None
        if isinstance(value, enum):
            return value
        if isinstance(value, str) and value in choices:
            return enum(value)
        raise UsageError(f"{_where(key, origin)} must be one of {', '.join(choices)}, got {_show(value)}")

    return coerce


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any, str], str]:
    def coerce(key: str, value: Any, origin: str) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise UsageError(f"{_where(key, origin)} must be one of {', '.join(choices)}, got {_show(value)}")

    return coerce


def _field(key: str, value: Any, origin: str) -> str:
    text = _str(key, value, origin)
    if not text or any(not part for part in text.split(".")):
        raise UsageError(f"{_where(key, origin)} must be a field name or a dotted path such as meta.text")
    return text


def _seed(key: str, value: Any, origin: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise UsageError(f"{_where(key, origin)} must be a string or a whole number")


def _params(key: str, value: Any, origin: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{_where(key, origin)} must be a table of mechanism parameters")
    return {str(k): v for k, v in value.items()}


def _show(value: Any) -> str:
    """Config values are the user's own settings, not corpus text; still keep them short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_COERCE: dict[str, Callable[[str, Any, str], Any]] = {
    "mechanism": _str,
    "epsilon": _float,
    "params": _params,
    "field": _field,
    "oov": _enum(OovPolicy),
    "mask_token": _str,
    "on_error": _enum(OnError),
    "chunk_size": _int(1),
    "workers": _int(0),
    "seed": _seed,
    "format": _enum(Format),
    "embeddings": _str,
    "embeddings_format": _choice(EMBEDDINGS_FORMATS),
    "vocab_size": _int(2),
    "neighbors": _int(2),
    "max_rows_per_file": _optional(_int(1)),
}

# Keys a config file may set (the seed is a command-line matter: a config is often shared).
CONFIG_KEYS = frozenset(_COERCE) - {"seed"}
