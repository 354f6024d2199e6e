"""Where randomness comes from: OS entropy by default, a seed only on request, keyed by chunk.

A chunk's Generator depends only on (run key, input identity, chunk index), never on which worker
runs it, so output is identical for any number of workers and a resumed run reproduces it.
Only a hash commitment of a user seed is ever recorded. A known seed lets anyone re-run the noise,
which voids the privacy of that run: seeds are for testing and reproducible research.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

_SEED_DOMAIN = b"privtext-seed-v1\x00"


def run_key(seed: str | int | None) -> int:
    """A 256-bit run key: fresh OS entropy when `seed` is None, else derived from the seed."""
    if seed is None:
        return secrets.randbits(256)
    digest = hashlib.sha256(_SEED_DOMAIN + str(seed).encode("utf-8")).digest()
    return int.from_bytes(digest, "big")


def seed_commitment(seed: str | int | None) -> str | None:
    """SHA-256 of the seed (domain-separated) for the report. A short or guessable seed can be
    recovered from it by trying candidates, so the report never pretends this hides the seed."""
    if seed is None:
        return None
    return hashlib.sha256(b"privtext-seed-commitment-v1\x00" + str(seed).encode("utf-8")).hexdigest()


def chunk_rng(key: int, input_id: int, chunk_index: int) -> np.random.Generator:
    """The Generator for one chunk of one input of a run."""
    seq = np.random.SeedSequence(entropy=key, spawn_key=(int(input_id), int(chunk_index)))
    return np.random.Generator(np.random.PCG64(seq))
