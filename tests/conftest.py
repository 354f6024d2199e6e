"""Shared fixtures: tiny generated vocabularies and the real default embedding at a small size."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from privtext.embeddings import CleanVocabulary, EmbeddingSource
from privtext.index import EmbeddingIndex, IndexSpec, ensure_index, write_index

SMALL_DEFAULT_VOCAB = 2000


def make_index(path: Path, vectors: np.ndarray, words: list[str] | None = None,
               neighbors: int = 64) -> EmbeddingIndex:
    """An index over explicit vectors (tiny vocabularies for exact and statistical tests)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if words is None:
        words = [f"w{i}" for i in range(len(vectors))]
    return write_index(CleanVocabulary(words=words, vectors=vectors), path, neighbors, progress=False)


@pytest.fixture
def index_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    """make_index bound to a fresh directory per call: index_factory(vectors, neighbors=...)."""
    counter = iter(range(1_000_000))

    def factory(vectors: np.ndarray, words: list[str] | None = None, neighbors: int = 64) -> EmbeddingIndex:
        return make_index(tmp_path / f"index-{next(counter)}", vectors, words, neighbors)

    return factory


@pytest.fixture
def tiny_index(tmp_path: Path) -> EmbeddingIndex:
    """12 random words in 3 dimensions, a table as wide as the vocabulary."""
    rng = np.random.default_rng(20261121)
    return make_index(tmp_path / "tiny", rng.normal(size=(12, 3)) * 2.0, neighbors=12)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("privtext-cache")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(cache_root: Path) -> None:
    """Library calls without an explicit cache directory use the session's, not the user's."""
    os.environ["PRIVTEXT_CACHE"] = str(cache_root)


@pytest.fixture(scope="session")
def glove_small(cache_root: Path) -> EmbeddingIndex:
    """The real packaged GloVe 6B 50d, limited to its most frequent rows."""
    return ensure_index(IndexSpec(EmbeddingSource(), SMALL_DEFAULT_VOCAB, 64), cache_root, progress=False).index
