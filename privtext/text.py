"""Tokenising, looking up, perturbing and detokenising documents, a whole chunk at a time.

The tokenizer splits a document into alternating separator and word segments with one regex, so
joining the segments gives back the exact original: whitespace and punctuation are kept byte for
byte. A word token is a maximal run of Unicode letters and digits (the same pattern that decides
which vocabulary entries are word-like), looked up lower-case. A replacement takes the original's
case pattern (lower, Title, UPPER).
"""

from __future__ import annotations

import re
from enum import Enum
from itertools import repeat

import numpy as np

from privtext.counters import Counters as ChunkCounters
from privtext.embeddings import WORD_PATTERN
from privtext.index import EmbeddingIndex
from privtext.mechanisms.base import Mechanism

_SPLIT = re.compile(f"({WORD_PATTERN})")
_JOIN = "\x00"  # cannot occur inside a word token, so it round-trips through str.lower()
DEFAULT_MASK_TOKEN = "[OOV]"


class OovPolicy(str, Enum):
    MASK = "mask"  # replace by a fixed placeholder (default)
    DROP = "drop"  # remove the token
    KEEP = "keep"  # pass it through unchanged: explicit opt-in, warned and flagged in the report


def tokenize(text: str) -> list[str]:
    """Alternating segments [sep, word, sep, word, ..., sep]; words at odd positions."""
    return _SPLIT.split(text)


def restore_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


class TextPerturber:
    """Applies a mechanism to the word tokens of many documents in one vectorised call."""

    def __init__(self, index: EmbeddingIndex, mechanism: Mechanism,
                 oov: OovPolicy | str = OovPolicy.MASK, mask_token: str = DEFAULT_MASK_TOKEN):
        self.mechanism = mechanism
        self.oov = OovPolicy(oov)
        self.mask_token = mask_token
        self._lookup = index.word_to_id.get
        self._words = index.words

    def perturb_texts(self, texts: list[str], rng: np.random.Generator) -> tuple[list[str], ChunkCounters]:
        counters = ChunkCounters(records=len(texts))
        segments = [tokenize(t) for t in texts]
        words: list[str] = []
        separators: list[str] = []
        per_doc: list[int] = []
        for parts in segments:
            doc_words = parts[1::2]
            words.extend(doc_words)
            separators.extend(parts[::2])
            per_doc.append(len(doc_words))
        counters.word_tokens = len(words)
        # Other tokens (punctuation, symbols) are the whitespace-separated runs inside the
        # separators; str.split is far cheaper than a regex over the whole text.
        counters.other_tokens = len(" ".join(separators).split())
        if not words:
            counters.doc_hist = np.bincount(np.zeros(len(texts), np.int64), minlength=1)
            return list(texts), counters

        lowered = _JOIN.join(words).lower().split(_JOIN)
        ids = np.fromiter(map(self._lookup, lowered, repeat(-1)), dtype=np.int64, count=len(words))
        known = ids >= 0
        out_ids = ids.copy()
        out_ids[known] = self.mechanism.perturb_ids(ids[known], rng)

        counters.perturbed = int(known.sum())
        counters.unchanged = int((out_ids[known] == ids[known]).sum())
        counters.oov = len(words) - counters.perturbed

        vocab = self._words
        out_words = [vocab[i] for i in out_ids.tolist()]  # OOV (-1) fixed up just below
        for j in np.flatnonzero(~known).tolist():
            out_words[j] = self._oov_replacement(words[j])
        for j in np.flatnonzero(known).tolist():
            if words[j] != lowered[j]:
                out_words[j] = restore_case(words[j], out_words[j])

        # Per-document perturbed counts feed the document-level bound statistics.
        doc_index = np.repeat(np.arange(len(texts)), per_doc)
        counters.doc_hist = np.bincount(np.bincount(doc_index[known], minlength=len(texts)))

        result: list[str] = []
        pos = 0
        for parts, count in zip(segments, per_doc):
            parts[1::2] = out_words[pos : pos + count]
            pos += count
            result.append("".join(parts))
        return result, counters

    def _oov_replacement(self, word: str) -> str:
        if self.oov is OovPolicy.MASK:
            return self.mask_token
        if self.oov is OovPolicy.DROP:
            return ""
        return word
