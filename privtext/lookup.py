"""Exact, vectorised lookup of a chunk's words in the vocabulary (issue 11 §1).

A dictionary lookup costs about 90 ns per word in CPython, plus ~45 ns to create the key string:
more than the mechanism. Most words are short and Latin-1, and such a word *is* a 16-byte
value: its code points as bytes, zero-padded (no word character is NUL, so the padding cannot
be confused with a character, and the value determines the word). `PackedVocabulary` keeps the
vocabulary's keys of that shape in an open-addressing hash table over their two 64-bit halves, and
looks up a whole chunk with a few numpy passes:

1. the chunk's keys, as code points with one space after each word (the lookup string that
   `TextPerturber` builds), are cut into 16-byte windows at the word starts and masked to the
   word length, which gives each word's packed value;
2. the values are hashed and probed in rounds; a probe compares the full 16-byte value, so a
   match is an exact string match (no hash collision can map one word to another);
3. the few words that cannot be packed (longer than 16 characters, or a code point above 255)
   are looked up in the dictionary, one by one.

The table holds every packable key of the mapping and nothing else, so a packable word that is not
in the table is not in the mapping: the result is exactly `mapping.get(word, -1)` for every word.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PACKED_CHARS = 16
_EMPTY = -1
_MIX_LO = np.uint64(0x9E3779B97F4A7C15)
_MIX_HI = np.uint64(0xC2B2AE3D27D4EB4F)
_SHIFT_32 = np.uint64(32)


# _KEEP[n]: the 16-byte mask that keeps a word's first n bytes, as two little-endian uint64.
_KEEP = np.array([[np.uint64((1 << (8 * min(n, 8))) - 1), np.uint64((1 << (8 * max(n - 8, 0))) - 1)]
                  for n in range(PACKED_CHARS + 1)], dtype=np.uint64)


def _pack(cps: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packable mask, low and high uint64 halves) of the words cps[start : start + length];
    the halves of a word that cannot be packed are 0, which no packed word equals.

    `cps` must hold at least PACKED_CHARS code points after the last start (callers pad)."""
    packable = lengths <= PACKED_CHARS
    if cps.size and int(cps.max()) > 255:
        wide = np.zeros(cps.size + 1, dtype=np.int64)
        np.cumsum(cps > 255, out=wide[1:])
        packable &= wide[np.minimum(starts + lengths, cps.size)] == wide[starts]
    window = np.lib.stride_tricks.sliding_window_view(cps.astype(np.uint8), PACKED_CHARS)
    packed = window[np.minimum(starts, len(window) - 1)].view(np.uint64)  # a (words, 2) copy
    packed &= _KEEP[np.where(packable, lengths, 0)]
    return packable, packed[:, 0], packed[:, 1]


def _slot(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    h = lo * _MIX_LO
    h ^= hi * _MIX_HI
    h ^= h >> _SHIFT_32
    h *= _MIX_LO
    return (h >> np.uint64(64 - bits)).astype(np.int64)


class PackedVocabulary:
    """`mapping.get(word, -1)` for a whole chunk of words at once (see the module docstring)."""

    def __init__(self, mapping: Mapping[str, int]):
        # A key with a space or a NUL is never a word of the text: it cannot be asked for, and NUL
        # would be confused with the padding.
        keys = [k for k in mapping if 0 < len(k) <= PACKED_CHARS and " " not in k and "\x00" not in k]
        joined = " ".join(keys) + " " * (PACKED_CHARS + 1)
        cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        starts = np.cumsum(lengths + 1) - lengths - 1
        packable, lo, hi = _pack(cps, starts, lengths)
        lo, hi = lo[packable], hi[packable]
        ids = np.fromiter((mapping[k] for k, ok in zip(keys, packable.tolist()) if ok),
                          dtype=np.int64, count=int(packable.sum()))
        # Only a word that cannot be packed is asked of a dictionary, and it can only equal a
        # key that cannot be packed either: these few keys are all that is kept of `mapping`.
        packed_keys = {k for k, ok in zip(keys, packable.tolist()) if ok}
        self.unpacked = {k: v for k, v in mapping.items() if k not in packed_keys}
        self.bits = max(4, int(len(ids) * 2 - 1).bit_length())  # load factor at most 1/2
        size = 1 << self.bits
        self.lo = np.zeros(size, dtype=np.uint64)  # (0, 0): an empty slot; no word packs to it
        self.hi = np.zeros(size, dtype=np.uint64)
        self.ids = np.full(size, _EMPTY, dtype=np.int64)
        # Insertion in rounds of linear probing: each round places, for every free slot wanted,
        # the first key that wants it; the others move one slot on.
        slot = _slot(lo, hi, self.bits)
        pending = np.arange(len(ids))
        while pending.size:
            free = self.ids[slot] == _EMPTY
            wanted, first = np.unique(slot[free], return_index=True)
            placed = np.flatnonzero(free)[first]
            self.lo[wanted] = lo[pending[placed]]
            self.hi[wanted] = hi[pending[placed]]
            self.ids[wanted] = ids[pending[placed]]
            keep = np.ones(pending.size, dtype=np.bool_)
            keep[placed] = False
            pending, slot = pending[keep], (slot[keep] + 1) & (size - 1)

    def look_up(self, cps: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                text: str) -> np.ndarray:
        """Ids (−1: not in the mapping) of the words text[start : start + length], where `cps`
        are the code points of `text` followed by at least PACKED_CHARS padding code points."""
        packable, lo, hi = _pack(cps, starts, lengths)
        slot = _slot(lo, hi, self.bits)
        mask = len(self.ids) - 1
        # The first probe, for every word at once: most words end here.
        hit = (self.lo[slot] == lo) & (self.hi[slot] == hi)
        out = np.where(hit, self.ids[slot], _EMPTY)
        which = np.flatnonzero(~hit & packable & (self.ids[slot] != _EMPTY))
        while which.size:  # an occupied slot with another key: probe on
            slot_on = (slot[which] + 1) & mask
            slot[which] = slot_on
            hit = (self.lo[slot_on] == lo[which]) & (self.hi[slot_on] == hi[which])
            out[which[hit]] = self.ids[slot_on[hit]]
            which = which[~hit & (self.ids[slot_on] != _EMPTY)]
        get = self.unpacked.get
        for i in np.flatnonzero(~packable).tolist():
            start = int(starts[i])
            out[i] = get(text[start : start + int(lengths[i])], _EMPTY)
        return out
