import json
import os
import time

import numpy as np
import pytest

from privtext.embeddings import EmbeddingSource
from privtext.index import IndexSpec, ensure_index


def _write_glove(path, rng, n=60, dim=4):  # type: ignore[no-untyped-def]
    vecs = rng.normal(size=(n, dim))
    path.write_text("".join(f"w{i} " + " ".join(f"{v:.6f}" for v in row) + "\n" for i, row in enumerate(vecs)))
    return vecs


def test_manifest_written_then_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "vecs.txt"
    _write_glove(src, np.random.default_rng(0))
    spec = IndexSpec(EmbeddingSource(str(src), "glove"), None, 16)
    first = ensure_index(spec, tmp_path / "cache", progress=False)
    assert first.built
    manifest = json.loads((first.index.path / "manifest.json").read_text())
    assert manifest["metric"] == "euclidean"
    assert manifest["geometry"]["n"] == 60
    assert len(manifest["source"]["sha256"]) == 64
    assert {"numpy", "faiss", "gensim", "privtext"} <= set(manifest["versions"])
    second = ensure_index(spec, tmp_path / "cache", progress=False)
    assert not second.built
    assert second.index.path == first.index.path


def test_rebuilt_when_source_changes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "vecs.txt"
    _write_glove(src, np.random.default_rng(0))
    spec = IndexSpec(EmbeddingSource(str(src), "glove"), None, 16)
    first = ensure_index(spec, tmp_path / "cache", progress=False)
    old_hash = first.index.manifest["source"]["sha256"]
    time.sleep(0.01)
    _write_glove(src, np.random.default_rng(1))
    os.utime(src)
    again = ensure_index(spec, tmp_path / "cache", progress=False)
    assert again.built and again.reason == "source changed since the cache was built"
    assert again.index.manifest["source"]["sha256"] != old_hash
    # touched but identical content: reused without a rebuild
    os.utime(src, ns=(1, 1))
    assert not ensure_index(spec, tmp_path / "cache", progress=False).built


def test_neighbor_table_equals_brute_force(index_factory) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(200, 5)).astype(np.float32)
    idx = index_factory(vecs, neighbors=10)
    v = vecs.astype(np.float64)
    full = np.linalg.norm(v[:, None, :] - v[None, :, :], axis=2)
    expected = np.argsort(full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx.neighbor_ids, expected)
    np.testing.assert_allclose(idx.neighbor_dist, np.take_along_axis(full, expected, axis=1), rtol=0, atol=1e-12)
    off_diag = full[~np.eye(200, dtype=bool)]
    assert idx.geometry.delta_min == pytest.approx(off_diag.min(), abs=1e-12)
    assert idx.geometry.delta_max >= off_diag.max()  # a conservative upper bound


def test_identical_vectors_are_merged_in_the_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "vecs.txt"
    src.write_text("a 1 0\nb 0 1\nc 1 0\nd 2 3\n")
    result = ensure_index(IndexSpec(EmbeddingSource(str(src), "glove"), None, 3), tmp_path / "cache", progress=False)
    idx = result.index
    assert idx.words == ["a", "b", "d"]
    assert idx.word_to_id["c"] == idx.word_to_id["a"]
    assert idx.manifest["cleaning"]["identical_vector_merged"] == 1
    assert idx.geometry.delta_min > 0


def test_default_embedding_index(glove_small) -> None:  # type: ignore[no-untyped-def]
    idx = glove_small
    assert idx.dim == 50 and idx.neighbors == 64
    assert idx.words[0] == "the"
    np.testing.assert_array_equal(idx.neighbor_ids[:, 0], np.arange(idx.n))
    assert np.all(np.diff(idx.neighbor_dist, axis=1) >= 0)
    # the FAISS index answers exact nearest-neighbour queries for vocabulary vectors
    _, found = idx.faiss_index.search(np.ascontiguousarray(idx.vectors[:50]), 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(50))
