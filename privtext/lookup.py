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
_SPACE = 32
_MIX_LO = np.uint64(0x9E3779B97F4A7C15)
_MIX_HI = np.uint64(0xC2B2AE3D27D4EB4F)


# _KEEP[n]: the 16-byte mask that keeps a word's first n bytes, as two little-endian uint64.
_KEEP = np.array([[np.uint64((1 << (8 * min(n, 8))) - 1), np.uint64((1 << (8 * max(n - 8, 0))) - 1)]
                  for n in range(PACKED_CHARS + 1)], dtype=np.uint64)


def _pack(cps: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packable mask, low and high uint64 halves) of the words cps[start : start + length];
    the halves of a word that cannot be packed are 0, which no packed word equals.

    `cps` must hold at least PACKED_CHARS code points after the last start (callers pad)."""
    packable = lengths <= PACKED_CHARS
    wide_at = np.flatnonzero(cps > 255)  # usually few: mark the words that hold them
    if wide_at.size:
        holder = np.searchsorted(starts, wide_at, side="right") - 1
        inside = (holder >= 0) & (wide_at < starts[np.maximum(holder, 0)] + lengths[np.maximum(holder, 0)])
        packable[holder[inside]] = False
    window = np.lib.stride_tricks.sliding_window_view(cps.astype(np.uint8), PACKED_CHARS)
    packed = window[np.minimum(starts, len(window) - 1)].view(np.uint64)  # a (words, 2) copy
    packed &= _KEEP[np.where(packable, lengths, 0)]
    return packable, packed[:, 0], packed[:, 1]


def _slot(lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    # Multiplicative (Fibonacci) hashing: the top bits of the product mix every input bit.
    h = hi * _MIX_HI
    h ^= lo
    h *= _MIX_LO
    h >>= np.uint64(64 - bits)
    return h.view(np.int64)  # below 2**bits: the same value as a signed integer


def unpacked_keys(keys: list[str], ids: np.ndarray, positions: np.ndarray) -> dict[str, int]:
    """The dictionary of the keys at `positions`, the first of equal keys winning."""
    table: dict[str, int] = {}
    for i in positions.tolist():
        table.setdefault(keys[i], int(ids[i]))
    return table


class PackedVocabulary:
    """`mapping.get(word, -1)` for a whole chunk of words at once (see the module docstring).

    `table` holds the slots as three uint64 rows: the two packed halves and the id (−1 as
    uint64: empty). `unpacked` maps the few keys that cannot be packed. Both come from `build`,
    and the table is plain numbers, so it can be cached in a file and memory-mapped."""

    def __init__(self, table: np.ndarray, unpacked: dict[str, int]):
        self.table = table
        self.lo, self.hi = table[0], table[1]
        self.ids = table[2].view(np.int64)
        self.bits = len(self.ids).bit_length() - 1
        self.unpacked = unpacked

    @classmethod
    def build(cls, *entries: tuple[list[str], np.ndarray]) -> tuple[PackedVocabulary, np.ndarray]:
        """The table of (keys, ids) entries in priority order: a key given twice keeps its first
        id, as a dictionary filled in the reverse order would. No dictionary of all keys is
        built. Also returns the positions (in the entries, concatenated) of the unpacked keys."""
        keys = [k for group, _ in entries for k in group]
        ids = np.concatenate([np.asarray(group_ids, dtype=np.int64) for _, group_ids in entries])
        joined = " ".join(keys) + " " * (PACKED_CHARS + 1)
        cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        starts = np.cumsum(lengths + 1) - lengths - 1
        packable, lo, hi = _pack(cps, starts, lengths)
        # A key with a space or a NUL is never a word of the text: it cannot be asked for, and
        # NUL would be confused with the padding. Such keys stay out of the table.
        packable &= lengths > 0
        if joined.count(" ") != len(keys) + PACKED_CHARS or "\x00" in joined:  # rare: look closer
            odd = np.zeros(cps.size + 1, dtype=np.int64)
            np.cumsum((cps == 0) | (cps == _SPACE), out=odd[1:])
            packable &= odd[starts + lengths] == odd[starts]
        # Only a word that cannot be packed is asked of a dictionary, and it can only equal a
        # key that cannot be packed either: these few keys are all that is kept as strings.
        unpacked_at = np.flatnonzero(~packable)
        unpacked = unpacked_keys(keys, ids, unpacked_at)
        lo, hi, ids = lo[packable], hi[packable], ids[packable]
        bits = max(4, int(len(ids) * 2 - 1).bit_length())  # load factor at most 1/2
        size = 1 << bits
        table = np.zeros((3, size), dtype=np.uint64)  # (0, 0): an empty slot; no word packs to it
        table[2] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # id −1
        slot_lo, slot_hi, slot_ids = table[0], table[1], table[2].view(np.int64)
        # Insertion in rounds of linear probing: each round places, for every free slot wanted,
        # the earliest key that wants it; the others move one slot on. Two copies of a key
        # probe the same slots in lockstep, so the earlier one always sits first on the chain
        # and is the one a lookup finds.
        slot = _slot(lo, hi, bits)
        pending = np.arange(len(ids))
        while pending.size:
            free = np.flatnonzero(slot_ids[slot] == _EMPTY)
            order = np.argsort(slot[free], kind="stable")
            wanted = slot[free][order]
            first = np.ones(wanted.size, dtype=np.bool_)
            np.not_equal(wanted[1:], wanted[:-1], out=first[1:])
            placed = free[order[first]]
            slot_lo[wanted[first]] = lo[pending[placed]]
            slot_hi[wanted[first]] = hi[pending[placed]]
            slot_ids[wanted[first]] = ids[pending[placed]]
            keep = np.ones(pending.size, dtype=np.bool_)
            keep[placed] = False
            pending, slot = pending[keep], (slot[keep] + 1) & (size - 1)
        return cls(table, unpacked), unpacked_at

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, int]) -> PackedVocabulary:
        keys = list(mapping)
        return cls.build((keys, np.fromiter(mapping.values(), dtype=np.int64, count=len(keys))))[0]

    def look_up(self, cps: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                text: str) -> np.ndarray:
        """Ids (−1: not in the mapping) of the words text[start : start + length], where `cps`
        are the code points of `text` followed by at least PACKED_CHARS padding code points."""
        packable, lo, hi = _pack(cps, starts, lengths)
        slot = _slot(lo, hi, self.bits)
        mask = len(self.ids) - 1
        # The first probe, for every word at once: most words end here.
        found = self.ids[slot]
        hit = (self.lo[slot] == lo) & (self.hi[slot] == hi)
        out = np.where(hit, found, _EMPTY)
        which = np.flatnonzero(~hit & (found != _EMPTY) & packable)
        while which.size:  # an occupied slot with another key: probe on
            slot_on = (slot[which] + 1) & mask
            slot[which] = slot_on
            found = self.ids[slot_on]
            hit = (self.lo[slot_on] == lo[which]) & (self.hi[slot_on] == hi[which])
            out[which[hit]] = found[hit]
            which = which[~hit & (found != _EMPTY)]
        get = self.unpacked.get
        for i in np.flatnonzero(~packable).tolist():
            start = int(starts[i])
            out[i] = get(text[start : start + int(lengths[i])], _EMPTY)
        return out
