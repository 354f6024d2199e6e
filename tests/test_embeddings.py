import numpy as np
import pytest
from gensim.test.utils import datapath

from privtext.embeddings import (
    EmbeddingSource,
    RawEmbedding,
    clean_vocabulary,
    detect_format,
    load_vocabulary,
)
from privtext.errors import EmbeddingError


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("test_glove.txt", "glove"), ("euclidean_vectors.bin", "word2vec-bin"), ("lee_fasttext.vec", "fasttext-vec")],
)
def test_gensim_test_files_load_with_detected_format(name: str, fmt: str) -> None:
    path = datapath(name)
    assert detect_format(__import__("pathlib").Path(path)) == fmt
    vocab = load_vocabulary(EmbeddingSource(path), None)
    assert len(vocab.words) > 5
    assert vocab.vectors.dtype == np.float32
    assert vocab.vectors.shape == (len(vocab.words), vocab.vectors.shape[1])
    assert all(w == w.lower() for w in vocab.words)
    assert np.isfinite(vocab.vectors).all()


def test_glove_text_matches_the_file_values() -> None:
    path = datapath("test_glove.txt")
    first = open(path, encoding="utf-8").readline().split()
    vocab = load_vocabulary(EmbeddingSource(path, "glove"), 10)
    assert vocab.words[0] == first[0]
    np.testing.assert_allclose(vocab.vectors[0], np.array(first[1:], dtype=np.float32))


def test_default_embedding_small_vocabulary() -> None:
    vocab = load_vocabulary(EmbeddingSource(), 500)
    assert vocab.vectors.shape[1] == 50
    assert vocab.words[0] == "the"
    # punctuation rows such as "," and "." are not word-like and are counted, not kept
    assert vocab.counts["not_word_like"] > 0
    assert "," not in vocab.words
    assert vocab.counts["rows_read"] == 500


def test_cleaning_merges_and_rejects_with_counts() -> None:
    vectors = np.array(
        [[1, 0], [0, 1], [1, 0], [np.nan, 1], [0, 0], [2, 2], [3, 1], [1, 1]], dtype=np.float32
    )
    words = ["alpha", "beta", "twin", "broken", "zero", None, "Alpha", "gamma"]
    vocab = clean_vocabulary(RawEmbedding(words=words, vectors=vectors))
    assert vocab.words == ["alpha", "beta", "gamma"]
    assert vocab.aliases == {"twin": 0}  # identical vector to "alpha": merged onto it
    assert vocab.counts["non_finite"] == 1
    assert vocab.counts["zero_vector"] == 1
    assert vocab.counts["invalid_key"] == 1  # gensim's stray None key for a repeated word
    assert vocab.counts["duplicate_word"] == 1  # "Alpha" lower-cases onto "alpha"
    assert vocab.counts["identical_vector_merged"] == 1


def test_repeated_word_in_a_file_is_handled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "dup.txt"
    path.write_text("cat 1 0\ndog 0 1\ncat 2 2\nfish 1 1\n")
    vocab = load_vocabulary(EmbeddingSource(str(path), "glove"), None)
    assert sorted(vocab.words) == ["cat", "dog", "fish"]


def test_kv_pickle_is_refused_without_trust_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "vectors.kv"
    path.write_bytes(b"not even a pickle")
    with pytest.raises(EmbeddingError, match="--trust-pickle"):
        load_vocabulary(EmbeddingSource(str(path)), None)


def test_missing_and_malformed_files_give_one_line_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EmbeddingError, match="not found"):
        load_vocabulary(EmbeddingSource(str(tmp_path / "nope.txt")), None)
    bad = tmp_path / "bad.txt"
    bad.write_text("3 2\nonly-one-number 1\n")
    with pytest.raises(EmbeddingError, match="could not read"):
        load_vocabulary(EmbeddingSource(str(bad), "word2vec"), None)
