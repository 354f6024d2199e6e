"""Tokenising, looking up, perturbing and detokenising documents, a whole chunk at a time.

A chunk of documents is handled as one array of code points (UTF-32), not token by token in
Python: each code point gets word/extender/space flags from a per-process table, word boundaries
come from a few numpy passes, the words go to the vocabulary lookup as one string split once, and
the output is assembled by copying runs of code points (the unchanged text between words and the
replacement words) into one array that is decoded once per chunk. Everything outside words is
copied code point for code point, so whitespace, punctuation, emoji and any other bytes survive
exactly; joining `tokenize(text)` gives back `text`.

What a word is (letters and digits, then any combining marks and ZWNJ/ZWJ that follow) is defined
once in privtext.embeddings, which also decides which vocabulary entries are word-like; words are
looked up lower-case in NFC. A replacement takes the original's case pattern (lower, Title,
UPPER).
"""

from __future__ import annotations

import codecs
import re
import threading
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from privtext.counters import Counters as ChunkCounters
from privtext.embeddings import is_word_char, is_word_extender
from privtext.lookup import PACKED_CHARS, PackedVocabulary, unpacked_keys
from privtext.settings import DEFAULT_MASK_TOKEN, OovPolicy

if TYPE_CHECKING:  # annotations only: importing text.py does not load the index or mechanisms
    from privtext.index import EmbeddingIndex
    from privtext.mechanisms.base import Mechanism



# Case patterns a replacement can take from the original word.
_AS_IS, _TITLE, _UPPER_ALL = 0, 1, 2


def case_pattern(original: str) -> int:
    if original.isupper() and len(original) > 1:
        return _UPPER_ALL
    if original[:1].isupper():
        return _TITLE
    return _AS_IS


def apply_case(pattern: int, word: str) -> str:
    if pattern == _UPPER_ALL:
        return word.upper()
    if pattern == _TITLE:
        return word[:1].upper() + word[1:]
    return word


def restore_case(original: str, replacement: str) -> str:
    return apply_case(case_pattern(original), replacement)


# Code point flags. _BREAK marks the separator placed between documents of a chunk: no word,
# extender or run of other characters continues across it.
# _UPPER and _LOWER_OR_TITLE are the per-character facts str.isupper() combines over a word.
_WORD, _EXTEND, _SPACE, _BREAK, _UPPER, _LOWER_OR_TITLE = 1, 2, 4, 8, 16, 32
_UNSET = 255
_SPACE_CP = 32  # separates words in the lookup string; never inside a word
# Bump when the spelling or lookup tables change meaning (their cached files are then rebuilt).
_TABLES_FORMAT = 1
_LOOKUP_PADDING = " " * PACKED_CHARS  # PackedVocabulary reads 16 code points from each start


def _flags_of(ch: str) -> int:
    if is_word_char(ch):
        flags = _WORD
    elif is_word_extender(ch):
        flags = _EXTEND
    else:
        # str.isspace is the whitespace str.split() uses, which defines "other tokens" below.
        flags = _SPACE if ch.isspace() else 0
    # A word is upper-case (str.isupper) when some character is upper and none is lower or
    # title case; for one character, istitle() means upper or title.
    if ch.isupper():
        flags |= _UPPER
    elif ch.islower() or ch.istitle():
        flags |= _LOWER_OR_TITLE
    return flags


class _CodePointTable:
    """Flags per code point, computed on first sight: a process pays only for what it meets."""

    def __init__(self) -> None:
        self.flags = np.full(0x110000, _UNSET, dtype=np.uint8)
        self.flags[:128] = [_flags_of(chr(c)) for c in range(128)]

    def lookup(self, cps: np.ndarray) -> np.ndarray:
        flags = self.flags.take(cps)
        unset = flags == _UNSET
        if unset.any():
            for cp in set(cps[unset].tolist()):
                self.flags[cp] = _flags_of(chr(cp))
            flags = self.flags.take(cps)
        return flags


_TABLE: _CodePointTable | None = None


def _table() -> _CodePointTable:
    global _TABLE
    if _TABLE is None:
        _TABLE = _CodePointTable()
    return _TABLE


def _utf32(text: str) -> np.ndarray:
    # surrogatepass: a library caller's lone surrogate is carried through as a non-word character.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


@dataclass
class _Segmentation:
    """Where the words are in a chunk's code points, framed by non-word BREAK positions: either
    documents joined as BREAK + doc0 + BREAK + doc1 + ... + BREAK, or one buffer in which
    everything outside the given spans is marked BREAK."""

    cps: np.ndarray  # uint32 code points of the joined chunk
    flags: np.ndarray  # uint8 flags per code point
    in_word: np.ndarray  # bool per code point
    breaks: np.ndarray  # (docs + 1,) the BREAK before each document, then the last one (joined form)
    starts: np.ndarray  # (words,) first code point of each word
    ends: np.ndarray  # (words,) one past its last code point
    doc_words: np.ndarray  # (docs + 1,) index of the first word of each document, then the total
    other_tokens: int  # whitespace-separated runs of non-word characters outside words


def _segment(texts: list[str]) -> _Segmentation:
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    breaks = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=breaks[1:])
    # The separator's code point (NUL) is only a placeholder: its flags are overridden below, so a
    # NUL inside a document is still an ordinary non-word character.
    cps = _utf32("\x00".join(["", *texts, ""]))
    flags = _table().lookup(cps)
    flags[breaks] = _BREAK
    return _find_words(cps, flags, breaks, breaks)


def _segment_spans(text: str, span_starts: np.ndarray, span_ends: np.ndarray) -> _Segmentation:
    """The segmentation of `text` framed by a BREAK at each end (positions shift by one), in
    which only the code points of the spans [span_starts[i], span_ends[i]) can be words: every
    code point outside them is a BREAK. A span's words are then exactly those of the span's
    text segmented on its own, as `_segment` does for a list of documents: a word never crosses
    a span's edge, and an extender at a span's first position has a BREAK before it."""
    cps = _utf32("\x00" + text + "\x00")
    flags = _table().lookup(cps)
    # Alternating runs: outside (the frame and the gaps) and inside (the spans).
    bounds = np.empty(2 * len(span_starts) + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, len(cps)
    bounds[1:-1:2] = span_starts + 1
    bounds[2:-1:2] = span_ends + 1
    outside = np.zeros(len(bounds) - 1, dtype=np.bool_)
    outside[0::2] = True
    np.putmask(flags, np.repeat(outside, np.diff(bounds)), _BREAK)
    doc_bounds = np.append(span_starts + 1, len(cps))
    return _find_words(cps, flags, doc_bounds, doc_bounds)


def _find_words(cps: np.ndarray, flags: np.ndarray, breaks: np.ndarray, doc_bounds: np.ndarray) -> _Segmentation:
    """Word boundaries from the code points' flags; `doc_bounds` (ascending, one per document
    and a last one past every word) split the words into documents."""
    in_word = (flags & _WORD).view(np.bool_)
    extenders = np.flatnonzero(flags & _EXTEND)
    if extenders.size:
        # An extender belongs to a word exactly when the last non-extender before it is a word
        # character. Runs of extenders share that owner; position 0 is a BREAK, so it exists.
        in_word = in_word.copy()
        run_first = np.ones(extenders.size, dtype=np.bool_)
        np.not_equal(extenders[1:], extenders[:-1] + 1, out=run_first[1:])
        owner = extenders[run_first] - 1
        run_lengths = np.diff(np.append(np.flatnonzero(run_first), extenders.size))
        in_word[extenders] = np.repeat(in_word[owner], run_lengths)

    as_int = in_word.view(np.int8)
    edges = np.flatnonzero(as_int[1:] != as_int[:-1]) + 1  # BREAKs at both ends: edges pair up
    starts, ends = edges[0::2], edges[1::2]

    # Other tokens: maximal runs of characters that are neither in a word, nor whitespace, nor a
    # BREAK (what str.split() finds in the text between words, document by document).
    other = ~in_word & ((flags & (_SPACE | _BREAK)) == 0)
    other_tokens = int(np.count_nonzero(other[1:] & ~other[:-1]))
    doc_words = np.searchsorted(starts, doc_bounds)
    return _Segmentation(cps, flags, in_word, breaks, starts, ends, doc_words, other_tokens)


def _case_patterns(seg: _Segmentation, words: np.ndarray) -> np.ndarray:
    """case_pattern() of the given words (indices into seg.starts), from the character flags."""
    if words.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts, ends = seg.starts[words], seg.ends[words]
    # OR of the flags over each word: reduceat over [start, end) pairs; the odd results cover the
    # text between words and are dropped. ends[i] < len(flags): a BREAK always follows.
    seen = np.bitwise_or.reduceat(seg.flags, np.column_stack([starts, ends]).ravel())[0::2]
    upper = ((seen & _UPPER) != 0) & ((seen & _LOWER_OR_TITLE) == 0) & (ends - starts > 1)
    title = (seg.flags[starts] & _UPPER) != 0
    return np.where(upper, _UPPER_ALL, np.where(title, _TITLE, _AS_IS))


def tokenize(text: str) -> list[str]:
    """Alternating segments [sep, word, sep, word, ..., sep]; words at odd positions.

    The same segmentation `TextPerturber.perturb_texts` applies to a chunk, for one text.
    """
    seg = _segment([text])
    bounds = [0, *np.column_stack([seg.starts - 1, seg.ends - 1]).ravel().tolist(), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


# np.unique is avoided on purpose: its first call imports numpy.ma (tens of milliseconds of a
# one-record run's start-up), and these inputs are small or already sorted.
def _distinct_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values of an already sorted array."""
    if values.size == 0:
        return values
    first = np.ones(values.size, dtype=np.bool_)
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return values[first]


def _gather_runs(base: np.ndarray, run_start: np.ndarray, run_length: np.ndarray,
                 block: int = 1 << 18) -> np.ndarray:
    """The concatenation of base[run_start[i] : run_start[i] + run_length[i]] over all i.

    An index array built by a cumulative sum (+1 inside a run, a jump where a run begins) and one
    gather: a few passes over the output, whatever the number of runs. Runs are taken in blocks of
    about `block` output positions so the int64 index array stays small beside the text.
    """
    keep = run_length > 0
    if not keep.all():
        run_start, run_length = run_start[keep], run_length[keep]
    run_end = np.cumsum(run_length)
    out = np.empty(int(run_end[-1]) if len(run_end) else 0, dtype=base.dtype)
    cuts = np.searchsorted(run_end, np.arange(block, len(out), block), side="right")
    bounds = _distinct_sorted(np.concatenate(([0], cuts, [len(run_end)]))).tolist()
    for lo, hi in pairwise(bounds):
        first = int(run_end[lo] - run_length[lo])
        starts, lengths = run_start[lo:hi], run_length[lo:hi]
        step = np.ones(int(run_end[hi - 1]) - first, dtype=np.int64)
        step[0] = starts[0]
        step[np.cumsum(lengths[:-1])] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
        out[first : first + len(step)] = base.take(np.cumsum(step, out=step))
    return out


class _Vocabulary:
    """The vocabulary as UTF-32 code points, followed by room for one chunk and its extra words.

    Output text is gathered from this one buffer: replacement words, in the case they take, from
    the vocabulary part; the text between words (and kept OOV words) from the chunk's copy; the
    mask token from after it.
    """

    def __init__(self, cps: np.ndarray, lengths: np.ndarray):
        # Three spellings of every word, one after the other: as is, Title and UPPER (rows
        # _AS_IS, _TITLE, _UPPER_ALL), so re-casing a replacement is a table lookup, not Python
        # per word. A spelling may change length (ß → SS), hence per-spelling lengths.
        self.cps = cps
        self.lengths = lengths
        flat = lengths.ravel()
        self.offsets = (np.cumsum(flat) - flat).reshape(lengths.shape)
        self.size = len(cps)
        # One buffer per thread: a perturber shared by threads (an engine's executor, a library
        # user's thread pool) must not have two chunks written into the same scratch space.
        self._local = threading.local()

    @staticmethod
    def spell(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(code points of the three spellings, one after the other; their (3, n) lengths)."""
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        as_is = _utf32("".join(words))
        uppers = "\n".join(words).upper().split("\n")  # per word: ß → SS changes a length
        upper_lengths = np.fromiter(map(len, uppers), dtype=np.int64, count=len(words))
        starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        firsts = codecs.utf_32_le_decode(as_is[starts], "surrogatepass", True)[0].upper()
        if len(firsts) == len(starts):  # every first letter keeps its length: no Python per word
            title = as_is.copy()
            title[starts] = _utf32(firsts)
            title_lengths = lengths
        else:
            titles = [apply_case(_TITLE, w) for w in words]
            title = _utf32("".join(titles))
            title_lengths = np.fromiter(map(len, titles), dtype=np.int64, count=len(words))
        cps = np.concatenate([as_is, title, _utf32("".join(uppers))])
        return cps, np.stack([lengths, title_lengths, upper_lengths])

    def with_chunk(self, chunk: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """This thread's buffer holding the vocabulary, then `chunk` at `self.size`, then `pool`."""
        needed = self.size + len(chunk) + len(pool)
        buffer: np.ndarray | None = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < needed:
            # Grown geometrically and kept, so steady state copies only the chunk and the pool.
            buffer = np.empty(max(needed, 2 * (0 if buffer is None else len(buffer))), dtype=np.uint32)
            buffer[: self.size] = self.cps
            self._local.buffer = buffer
        buffer[self.size : self.size + len(chunk)] = chunk
        buffer[self.size + len(chunk) : needed] = pool
        return buffer


# Documents longer than this are perturbed piece by piece; a piece ends just before whitespace,
# which never belongs to a word, so no word is ever cut.
LONG_DOCUMENT_CHARS = 1 << 18
PIECE_CHARS = 1 << 16
_WHITESPACE = re.compile(r"\s")


def iter_pieces(text: str, piece: int = PIECE_CHARS) -> Iterator[str]:
    """Pieces of about `piece` characters, each cut just before a whitespace character; made
    one at a time, so only one piece's copy exists beside the text."""
    start = 0
    while len(text) - start > piece:
        cut = max(text.rfind(c, start + 1, start + piece) for c in " \n\t\r")
        if cut <= start:
            match = _WHITESPACE.search(text, start + piece)
            if match is None:
                break
            cut = match.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


class TextPerturber:
    """Applies a mechanism to the word tokens of many documents in one vectorised call."""

    def __init__(self, index: EmbeddingIndex, mechanism: Mechanism,
                 oov: OovPolicy | str = OovPolicy.MASK, mask_token: str = DEFAULT_MASK_TOKEN):
        self.mechanism = mechanism
        self.oov = OovPolicy(oov)
        self.mask_token = mask_token
        self._index = index
        self._mask_cps = _utf32(mask_token)
        self._packed_vocabulary: PackedVocabulary | None = None
        self._nfc_vocabulary: PackedVocabulary | None = None
        self._vocab: _Vocabulary | None = None
        self._json_plain: bool | None = None

    def _vocabulary(self) -> _Vocabulary:
        if self._vocab is None:
            cps, lengths = self._derived("spellings", lambda: _Vocabulary.spell(self._index.words))
            self._vocab = _Vocabulary(cps, lengths)
        return self._vocab

    def perturb_documents(self, texts: list[str], rng: np.random.Generator,
                          long_chars: int = LONG_DOCUMENT_CHARS) -> tuple[list[str], ChunkCounters]:
        """`perturb_texts`, with documents longer than `long_chars` perturbed piece by piece
        (each still counted as one document), so memory follows a bounded piece rather than the
        largest record: one 30 MB record does not turn into gigabytes of token arrays. The CLI's
        chunks and the library's batches both come through here, so they draw the same noise."""
        if all(len(t) <= long_chars for t in texts):
            return self.perturb_texts(texts, rng)
        out: list[str] = list(texts)
        total = ChunkCounters()
        short = [i for i, t in enumerate(texts) if len(t) <= long_chars]
        if short:
            done, counters = self.perturb_texts([texts[i] for i in short], rng)
            for i, new in zip(short, done):
                out[i] = new
            total.merge(counters)
        for i, text in enumerate(texts):
            if len(text) <= long_chars:
                continue
            parts: list[str] = []
            perturbed = 0
            for piece in iter_pieces(text):
                (new,), counters = self.perturb_texts([piece], rng)
                parts.append(new)
                perturbed += counters.perturbed
                counters.records = 0
                counters.doc_hist = np.zeros(1, dtype=np.int64)
                total.merge(counters)
            out[i] = "".join(parts)
            hist = np.zeros(perturbed + 1, dtype=np.int64)
            hist[perturbed] = 1
            total.merge(ChunkCounters(records=1, doc_hist=hist))
        return out, total

    def perturb_texts(self, texts: list[str], rng: np.random.Generator) -> tuple[list[str], ChunkCounters]:
        counters = ChunkCounters(records=len(texts))
        seg = _segment(texts)
        if len(seg.starts) == 0:
            return list(texts), self._count_empty(counters, seg, len(texts))
        text, growth = self._perturb_words(seg, rng, counters)
        doc_at = (seg.breaks + growth[seg.doc_words]).tolist()
        return [text[a + 1 : b] for a, b in pairwise(doc_at)], counters

    def perturb_spans(self, text: str, starts: np.ndarray, ends: np.ndarray,
                      rng: np.random.Generator) -> tuple[str, np.ndarray, np.ndarray, ChunkCounters]:
        """The documents text[starts[i]:ends[i]] perturbed in place: (the new text, the new
        spans, counters). Everything outside the spans is kept as is. Spans are ascending with at
        least one code point between two of them (that code point is what keeps a word from
        running from one document into the next).

        The same as `perturb_documents([text[s:e] for s, e in spans], rng)` spliced back into
        `text`, with the same draws from `rng`, but with no Python per document: a codec whose
        records sit in one buffer (a JSONL chunk) perturbs their values without cutting them
        out and joining them back."""
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        if len(starts) and not (starts[0] >= 0 and ends[-1] <= len(text) and (ends >= starts).all()
                                and (starts[1:] > ends[:-1]).all()):
            raise ValueError("spans must be ascending, within the text, with a gap between two spans")
        if len(starts) and int((ends - starts).max()) > LONG_DOCUMENT_CHARS:
            return self._perturb_spans_in_pieces(text, starts, ends, rng)
        counters = ChunkCounters(records=len(starts))
        seg = _segment_spans(text, starts, ends)
        if len(seg.starts) == 0:
            return text, starts, ends, self._count_empty(counters, seg, len(starts))
        framed, growth = self._perturb_words(seg, rng, counters)
        return (framed[1:-1], starts + growth[seg.doc_words[:-1]], ends + growth[seg.doc_words[1:]],
                counters)

    def _perturb_spans_in_pieces(self, text: str, starts: np.ndarray, ends: np.ndarray,
                                 rng: np.random.Generator) -> tuple[str, np.ndarray, np.ndarray, ChunkCounters]:
        """perturb_spans when a span is long enough to be perturbed piece by piece."""
        bounds = np.column_stack([starts, ends]).ravel().tolist()
        docs = [text[a:b] for a, b in zip(bounds[0::2], bounds[1::2])]
        new_docs, counters = self.perturb_documents(docs, rng)
        between = [text[a:b] for a, b in pairwise([0, *bounds, len(text)])][0::2]
        pieces = [between[0]]
        new_starts, new_ends, at = [], [], len(between[0])
        for doc, after in zip(new_docs, between[1:]):
            new_starts.append(at)
            at += len(doc)
            new_ends.append(at)
            pieces += [doc, after]
            at += len(after)
        return ("".join(pieces), np.array(new_starts, dtype=np.int64), np.array(new_ends, dtype=np.int64),
                counters)

    @staticmethod
    def _count_empty(counters: ChunkCounters, seg: _Segmentation, docs: int) -> ChunkCounters:
        counters.other_tokens = seg.other_tokens
        counters.doc_hist = np.bincount(np.zeros(docs, np.int64), minlength=1)
        return counters

    def _perturb_words(self, seg: _Segmentation, rng: np.random.Generator,
                       counters: ChunkCounters) -> tuple[str, np.ndarray]:
        """The segmented chunk with its words perturbed, as one string (BREAK positions
        included), and `growth`: the change in length before each word (then the total)."""
        starts, ends = seg.starts, seg.ends
        n_words = len(starts)
        counters.word_tokens = n_words
        counters.other_tokens = seg.other_tokens

        ids, recased = self._look_up(seg)
        known = ids >= 0
        out_ids = ids.copy()
        out_ids[known] = self.mechanism.perturb_ids(ids[known], rng)

        counters.perturbed = int(known.sum())
        counters.unchanged = int((out_ids[known] == ids[known]).sum())
        counters.oov = n_words - counters.perturbed
        # Per-document perturbed counts feed the document-level bound statistics.
        known_before = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(known, out=known_before[1:])
        counters.doc_hist = np.bincount(np.diff(known_before[seg.doc_words]))

        # Each word's replacement is a run in the buffer of _Vocabulary.with_chunk: a spelling of
        # a vocabulary word (as is, Title or UPPER, after the original's case), the word itself in
        # the chunk's copy (OOV kept), or the mask token placed after the chunk.
        vocab = self._vocabulary()
        chunk_at = vocab.size
        pool_at = chunk_at + len(seg.cps)
        safe_ids = np.where(known, out_ids, 0)
        src_start = vocab.offsets[_AS_IS, safe_ids]
        new_lengths = vocab.lengths[_AS_IS, safe_ids]

        oov_at = np.flatnonzero(~known)
        if oov_at.size:
            if self.oov is OovPolicy.KEEP:
                src_start[oov_at] = chunk_at + starts[oov_at]
                new_lengths[oov_at] = ends[oov_at] - starts[oov_at]
            elif self.oov is OovPolicy.DROP:
                new_lengths[oov_at] = 0
            else:
                src_start[oov_at] = pool_at
                new_lengths[oov_at] = len(self.mask_token)

        pattern = _case_patterns(seg, recased)
        src_start[recased] = vocab.offsets[pattern, out_ids[recased]]
        new_lengths[recased] = vocab.lengths[pattern, out_ids[recased]]

        # Output runs alternate: text before word 0 (from the chunk), word 0, text between words 0
        # and 1, ..., text after the last word. BREAKs are part of that text, so they land in the
        # output too and give the document boundaries.
        buffer = vocab.with_chunk(seg.cps, self._mask_cps)
        run_start = np.empty(2 * n_words + 1, dtype=np.int64)
        run_length = np.empty(2 * n_words + 1, dtype=np.int64)
        run_start[0] = chunk_at
        run_start[2::2] = ends + chunk_at
        run_length[0:-1:2] = starts
        run_length[-1] = len(seg.cps)
        run_length[0::2] -= run_start[0::2] - chunk_at
        run_start[1::2] = src_start
        run_length[1::2] = new_lengths
        text = codecs.utf_32_le_decode(_gather_runs(buffer, run_start, run_length), "surrogatepass", True)[0]

        growth = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(new_lengths - (ends - starts), out=growth[1:])
        return text, growth


    def _look_up(self, seg: _Segmentation) -> tuple[np.ndarray, np.ndarray]:
        """(vocabulary id or -1 per word, indices of in-vocabulary words that carry case).

        All words of the chunk become one string "w0 w1 ... wn " (a space never occurs in a
        word), lower-cased and NFC-normalised as a whole, then looked up all at once by
        `PackedVocabulary` (no per-word key strings but for long or non-Latin-1 words).
        """
        starts, ends = seg.starts, seg.ends
        lengths = ends - starts
        selected = seg.in_word.copy()
        selected[ends] = True  # one slot after each word, for the space
        word_cps = seg.cps[selected]
        del selected
        space_at = np.cumsum(lengths + 1) - 1
        word_cps[space_at] = _SPACE_CP
        original = codecs.utf_32_le_decode(word_cps, "strict", True)[0]
        lowered = original.lower()
        ascii_keys = lowered.isascii()
        keys = lowered if ascii_keys else unicodedata.normalize("NFC", lowered)
        key_cps = _utf32(keys + _LOOKUP_PADDING)
        if keys is lowered and len(lowered) == len(original):
            key_ends = space_at
        else:  # lower-casing or NFC may have moved the words: find them again
            key_ends = np.flatnonzero(key_cps[: len(keys)] == _SPACE_CP)
        key_starts = np.empty_like(key_ends)
        key_starts[0] = 0
        key_starts[1:] = key_ends[:-1] + 1
        ids = self._packed(nfc=not ascii_keys).look_up(key_cps, key_starts, key_ends - key_starts, keys)
        del keys

        if lowered == original:
            return ids, np.zeros(0, dtype=np.int64)
        if len(lowered) == len(original):
            lowered_cps = key_cps[: len(lowered)] if ascii_keys else _utf32(lowered)
            differs = np.flatnonzero(word_cps != lowered_cps)
            candidates = _distinct_sorted(np.searchsorted(space_at, differs))
        else:  # a character lower-cased to several (İ): compare word by word
            pairs = zip(original.split(" "), lowered.split(" "))
            candidates = np.array([j for j, (a, b) in enumerate(pairs) if a != b], dtype=np.int64)
        return ids, candidates[ids[candidates] >= 0]

    def writes_json_plain(self) -> bool:
        """Whether no replacement this perturber writes holds a character that a JSON string
        must escape ('"', '\\', below U+0020): the vocabulary in all its spellings and the mask
        token. A kept OOV word is one of the input's own words, which hold none. The
        vocabulary's answer is a cached derived file, so a worker reads one number."""
        if self._json_plain is None:
            def scan(_index: EmbeddingIndex) -> np.ndarray:
                cps = self._vocabulary().cps
                return np.array([not ((cps < 0x20) | (cps == ord('"')) | (cps == ord("\\"))).any()])

            vocabulary_plain = self._index.derived_artifact(
                "text-json-plain", {"format": _TABLES_FORMAT}, scan, uncached_if_read_only=True)
            mask_plain = not any(c in '"\\' or c < " " for c in self.mask_token)
            self._json_plain = bool(vocabulary_plain[0]) and mask_plain
        return self._json_plain

    def prepare(self) -> None:
        """Build the cached lookup and spelling tables now (in the parent, before workers)."""
        self._vocabulary()
        self._packed()
        self._vocabulary_is_nfc()
        self.writes_json_plain()

    def _derived(self, name: str,
                 build: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Two arrays computed from the vocabulary alone, cached with the index as derived files
        and memory-mapped: a worker then starts without ~70 ms of building them."""
        made: list[tuple[np.ndarray, np.ndarray]] = []

        def part(i: int) -> Callable[[EmbeddingIndex], np.ndarray]:
            def make(_index: EmbeddingIndex) -> np.ndarray:
                if not made:
                    made.append(build())
                return made[0][i]
            return make

        params = {"format": _TABLES_FORMAT}
        first = self._index.derived_artifact(f"text-{name}-0", params, part(0), uncached_if_read_only=True)
        second = self._index.derived_artifact(f"text-{name}-1", params, part(1), uncached_if_read_only=True)
        return first, second

    def _packed(self, nfc: bool = False) -> PackedVocabulary:
        """The lookup table, in the priority of `index.word_to_id` (aliases over words). With
        `nfc` (a chunk with non-ASCII keys: lookup is in NFC), a vocabulary entry stored in
        another normal form is also reachable under its NFC spelling (an entry that is already
        NFC wins a collision); for a vocabulary already in NFC (GloVe) it is the same table.
        Which table a chunk uses depends on the chunk alone, never on earlier chunks. No str → id
        dictionary of the whole vocabulary is built (~13 MiB a worker)."""
        if nfc:
            if self._nfc_vocabulary is None:
                if self._vocabulary_is_nfc():
                    self._nfc_vocabulary = self._packed()
                else:  # rare, so built in memory and never cached
                    entries = self._entries(self._index.aliases(), self._index.words)
                    nfc_keys = [(unicodedata.normalize("NFC", k), i) for keys, ids in entries
                                for k, i in zip(keys, ids.tolist())]
                    entries.append(([k for k, _ in nfc_keys],
                                    np.array([i for _, i in nfc_keys], dtype=np.int64)))
                    self._nfc_vocabulary = PackedVocabulary.build(*entries)[0]
            return self._nfc_vocabulary
        if self._packed_vocabulary is None:
            def build() -> tuple[np.ndarray, np.ndarray]:
                table, unpacked_at = PackedVocabulary.build(*self._entries(self._index.aliases(), self._index.words))
                return table.table, unpacked_at

            table, unpacked_at = self._derived("lookup", build)

            def build_unpacked() -> tuple[np.ndarray, np.ndarray]:
                # The keys that cannot be packed (long or non-Latin-1 words), in priority order,
                # with their ids: a worker then never reads the whole word list.
                entries = self._entries(self._index.aliases(), self._index.words)
                keys = [k for group, _ in entries for k in group]
                ids = np.concatenate([group_ids for _, group_ids in entries])
                at = unpacked_at.tolist()
                return _utf32("\n".join(keys[i] for i in at)), ids[unpacked_at]

            unpacked: dict[str, int] = {}
            if len(unpacked_at):
                key_cps, key_ids = self._derived("lookup-unpacked", build_unpacked)
                keys = codecs.utf_32_le_decode(key_cps, "surrogatepass", True)[0].split("\n")
                unpacked = unpacked_keys(keys, np.asarray(key_ids), np.arange(len(keys)))
            self._packed_vocabulary = PackedVocabulary(table, unpacked)
        return self._packed_vocabulary

    def _vocabulary_is_nfc(self) -> bool:
        """Whether every vocabulary key is in NFC (then the NFC lookup is the plain one), as a
        cached derived file: a worker does not read the word list to learn it."""
        def check(_index: EmbeddingIndex) -> np.ndarray:
            keys = "\n".join([*self._index.aliases(), *self._index.words])
            return np.array([unicodedata.is_normalized("NFC", keys)])

        return bool(self._index.derived_artifact("text-vocabulary-nfc", {"format": _TABLES_FORMAT}, check,
                                                 uncached_if_read_only=True)[0])

    @staticmethod
    def _entries(aliases: dict[str, int], words: list[str]) -> list[tuple[list[str], np.ndarray]]:
        return [(list(aliases), np.fromiter(aliases.values(), dtype=np.int64, count=len(aliases))),
                (words, np.arange(len(words), dtype=np.int64))]
