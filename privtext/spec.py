"""What identifies an anonymisation run, apart from its secret key: mechanism, ε, parameters,
OOV policy and the index it runs on (path and manifest digest), plus the public facts the epsilon
report prints (guarantee, derived values, embedding identity, geometry).

A spec is plain data (JSON-safe through `to_dict`), small, and never holds arrays or the run key,
so it can travel to executors and into reports. The report is built from a spec and merged
counters alone: no index or mechanism has to be opened where the report is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtext.randomness import seed_commitment

if TYPE_CHECKING:
    from privtext.mechanisms.base import Mechanism


def manifest_digest(index_path: str | Path) -> str:
    """SHA-256 of an index cache's manifest.json: the identity an executor checks on unpickling.
    The manifest records the source hash, sizes and geometry, so two caches with the same digest
    hold the same index."""
    return hashlib.sha256((Path(index_path) / "manifest.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class RunSpec:
    mechanism: str
    epsilon: float
    params: dict[str, Any]
    oov: str
    mask_token: str
    seeded: bool
    seed_sha256: str | None
    index_path: str
    index_digest: str
    # public facts for the report, computed once where the mechanism was created
    reference: str = ""
    derived: dict[str, Any] = field(default_factory=dict)
    guarantee: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mechanism(cls, mech: Mechanism, oov: str, mask_token: str, seed: str | int | None) -> RunSpec:
        index = mech.index
        return cls(
            mechanism=mech.name,
            epsilon=mech.epsilon,
            params=mech.params.to_dict(),
            oov=str(getattr(oov, "value", oov)),
            mask_token=mask_token,
            seeded=seed is not None,
            seed_sha256=seed_commitment(seed),
            index_path=str(index.path),
            index_digest=manifest_digest(index.path),
            reference=mech.reference,
            derived=mech.derived(),
            guarantee=mech.guarantee.to_dict(),
            embedding=index.identity(),
            geometry=index.geometry.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**data)
