"""The index cache's reliability contract: damage is an error naming the fix, read-only caches
work without writing, builds are switched in atomically under running readers, touched sources
are hashed once, and opening a cache stays light."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_DEFAULT_VOCAB

from privtext.embeddings import EmbeddingSource
from privtext.errors import IndexCacheError
from privtext.index import POINTER, EmbeddingIndex, IndexSpec, ensure_index

FIX = "privtext index --force"


def _write_glove(path: Path, seed: int = 0, n: int = 80, dim: int = 6) -> None:
    vecs = np.random.default_rng(seed).normal(size=(n, dim))
    path.write_text("".join(f"w{i} " + " ".join(f"{v:.6f}" for v in row) + "\n" for i, row in enumerate(vecs)))


@pytest.fixture
def built(tmp_path: Path) -> tuple[IndexSpec, Path, EmbeddingIndex]:
    src = tmp_path / "vecs.txt"
    _write_glove(src)
    spec = IndexSpec(EmbeddingSource(str(src), "glove"), None, 16)
    cache = tmp_path / "cache"
    index = ensure_index(spec, cache, progress=False).index
    index.close()
    return spec, cache, index


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root with its size and mtime: a write anywhere changes this."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    out["."] = (0, os.lstat(root).st_mtime_ns)
    return out


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privtext", *args], capture_output=True, text=True,
                          timeout=300)


# --- damage is detected, names the fix, and --force repairs it ---------------------------------

def _swap_two_words(version: Path) -> None:
    lines = (version / "words.txt").read_text(encoding="utf-8").split("\n")
    lines[3], lines[7] = lines[7], lines[3]  # same bytes, same size, different ids
    (version / "words.txt").write_text("\n".join(lines), encoding="utf-8")


def _truncate_npy(version: Path) -> None:
    path = version / "neighbors_dist.npy"
    path.write_bytes(path.read_bytes()[:-40])


def _remove_faiss(version: Path) -> None:
    (version / "index.faiss").unlink()


def _garbage_manifest(version: Path) -> None:
    (version / "manifest.json").write_text("{not json")


def _edited_manifest(version: Path) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["geometry"]["delta_min"] *= 2  # valid JSON, but not what CURRENT committed to
    (version / "manifest.json").write_text(json.dumps(manifest))


def _foreign_vectors(version: Path) -> None:
    path = version / "vectors.npy"
    vectors = np.load(path)
    np.save(path, vectors[::-1].copy())  # same size, shape and dtype; rows of another order


def _remove_version(version: Path) -> None:
    import shutil

    shutil.rmtree(version)


@pytest.mark.parametrize("damage", [_swap_two_words, _truncate_npy, _remove_faiss, _garbage_manifest,
                                    _edited_manifest, _foreign_vectors, _remove_version])
def test_damaged_cache_is_an_error_naming_the_fix(built, damage) -> None:  # type: ignore[no-untyped-def]
    spec, cache, index = built
    damage(index.path)
    with pytest.raises(IndexCacheError, match=FIX):
        ensure_index(spec, cache, progress=False)
    repaired = ensure_index(spec, cache, force=True, progress=False)
    assert repaired.built and repaired.index.path != index.path
    assert not index.path.exists()  # the damaged version is removed once nobody holds it
    assert repaired.index.verify()["rows"] == 80


def test_garbage_pointer_is_an_error(built) -> None:  # type: ignore[no-untyped-def]
    spec, cache, index = built
    (index.path.parent / POINTER).write_text("garbage")
    with pytest.raises(IndexCacheError, match=FIX):
        ensure_index(spec, cache, progress=False)


def test_verify_reads_every_byte(built) -> None:  # type: ignore[no-untyped-def]
    spec, cache, index = built
    opened = ensure_index(spec, cache, progress=False).index
    assert set(opened.verify()["files"]) == {"words.txt", "aliases.tsv", "vectors.npy", "neighbors_ids.npy",
                                             "neighbors_dist.npy", "index.faiss"}
    opened.close()
    # one flipped byte in the middle of the FAISS index: same size, so opening does not see it
    path = index.path / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = ensure_index(spec, cache, progress=False).index
    with pytest.raises(IndexCacheError, match=r"index\.faiss does not match its sha256.*" + FIX):
        reopened.verify()


def test_cli_verify_and_damage_are_one_line_errors(built) -> None:  # type: ignore[no-untyped-def]
    spec, cache, _index = built
    args = ["index", "--embeddings", spec.source.spec, "--format", "glove", "--vocab-size", "1000",
            "--neighbors", "16", "--cache-dir", str(cache)]
    # vocab_size 1000 > 80 rows is a different spec key: build the right one through the CLI
    ok = _cli(*args)
    assert ok.returncode == 0, ok.stderr
    good = _cli(*args, "--verify")
    assert good.returncode == 0 and "index verified" in good.stdout
    version = Path(json.loads(_cli(*args, "--json").stdout)["path"])
    _swap_two_words(version)
    bad = _cli(*args, "--verify")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and FIX in bad.stderr and "Traceback" not in bad.stderr
    again = _cli(*args)  # a plain open fails the same way; it never rebuilds silently
    assert again.returncode == 1 and FIX in again.stderr
    assert _cli(*args, "--force").returncode == 0
    assert _cli(*args, "--verify").returncode == 0


# --- read-only caches ----------------------------------------------------------------------

_AUDIT_OPEN = """
import os, sys
from pathlib import Path
root = os.path.realpath(sys.argv[1])
writes = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        mode, flags = args[1], args[2]
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writing and path.startswith(root):
            writes.append(("open", path))
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.unlink",
                   "os.chmod", "os.utime", "os.truncate", "shutil.rmtree", "os.link", "os.symlink"):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(a)).startswith(root):
                writes.append((event, os.fsdecode(a)))
sys.addaudithook(hook)
"""


def test_opening_writes_nothing(built) -> None:  # type: ignore[no-untyped-def]
    spec, cache, index = built
    # a derived artifact that exists already (built with write access)
    opened = EmbeddingIndex(index.path)
    opened.derived_artifact("demo", {"p": 1}, lambda ix: np.asarray(ix.vectors).sum(axis=1))
    opened.close()
    before = _tree(cache)
    result = _run(_AUDIT_OPEN + f"""
from privtext.embeddings import EmbeddingSource
from privtext.index import IndexSpec, ensure_index
import numpy as np
res = ensure_index(IndexSpec(EmbeddingSource({spec.source.spec!r}, "glove"), None, 16), Path(root))
ix = res.index
assert not res.built
ix.words, ix.word_to_id, np.asarray(ix.vectors).sum(), np.asarray(ix.neighbor_dist).sum()
ix.faiss_index.search(np.ascontiguousarray(ix.vectors[:3]), 2)
ix.derived_artifact("demo", {{"p": 1}}, lambda i: 1 / 0)
print(writes)
""", str(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert _tree(cache) == before


@contextlib.contextmanager
def _read_only_view(src: Path, dst: Path) -> Iterator[Path]:
    """`src` seen through a truly read-only path: a read-only bind mount (root ignores file
    modes, so chmod would prove nothing), or chmod for an ordinary user."""
    dst.mkdir()
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(src)], check=True)
        try:
            yield src
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(src)], check=True)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(dst)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot create a read-only bind mount here (needs CAP_SYS_ADMIN)")
    try:
        ro = subprocess.run(["touch", str(dst / "probe")], capture_output=True)
        if ro.returncode == 0:  # old kernels ignore ro on the first bind: remount
            (dst / "probe").unlink()
            subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)
        yield dst
    finally:
        gc.collect()  # memory maps of the view must go before it can be unmounted
        if subprocess.run(["umount", str(dst)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(dst)], check=True)


def test_read_only_cache_serves_what_exists_and_names_what_is_missing(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec, cache, index = built
    writable = EmbeddingIndex(index.path)
    prior = np.asarray(writable.derived_artifact("demo", {"p": 1}, lambda ix: np.arange(ix.n) * 2.0))
    writable.close()
    with _read_only_view(cache, tmp_path / "ro") as ro:
        _use_read_only(spec, ro, prior)


def _use_read_only(spec: IndexSpec, ro: Path, prior: np.ndarray) -> None:
    opened = ensure_index(spec, ro, progress=False)
    assert not opened.built
    assert opened.index.words[0] == "w0"
    np.testing.assert_array_equal(opened.index.derived_artifact("demo", {"p": 1}, lambda ix: 1 / 0), prior)
    with pytest.raises(IndexCacheError, match=r"read-only.*lacks the derived file other"):
        opened.index.derived_artifact("other", {"p": 2}, lambda ix: np.zeros(3))
    # an optional artifact is computed in memory instead, and nothing is written
    np.testing.assert_array_equal(opened.index.derived_artifact(
        "other", {"p": 2}, lambda ix: np.ones(3), uncached_if_read_only=True), np.ones(3))
    assert not list((opened.index.path / "derived").glob("other*"))
    # a build is needed (forced): the error says where to build instead of a traceback
    with pytest.raises(IndexCacheError, match=r"cannot build the index.*--cache-dir"):
        ensure_index(spec, ro, force=True, progress=False)
    opened.index.close()


# --- versions: a running reader is never broken by a rebuild --------------------------------

_READER = """
import sys, time
from pathlib import Path
import numpy as np
from privtext.index import EmbeddingIndex
ix = EmbeddingIndex(Path(sys.argv[1]))          # the slot: opens CURRENT's version
print(ix.path, flush=True)
sys.stdin.readline()                            # the parent rebuilds meanwhile
again = EmbeddingIndex(ix.path)                 # what a worker does with index.path
assert again.words == ix.words and np.array_equal(again.neighbor_ids, ix.neighbor_ids)
print("ok", float(np.asarray(ix.neighbor_dist).sum()), flush=True)
"""


def test_rebuild_under_a_running_reader(built) -> None:  # type: ignore[no-untyped-def]
    spec, cache, index = built
    slot = index.path.parent
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(slot)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdin is not None
    held = Path(reader.stdout.readline().strip())
    assert held == index.path
    rebuilt = ensure_index(spec, cache, force=True, progress=False).index
    assert rebuilt.path != held and held.exists()  # in use: kept
    assert EmbeddingIndex(slot).path == rebuilt.path  # new opens get the new version
    out, err = reader.communicate("go\n", timeout=120)
    assert reader.returncode == 0, err
    assert out.startswith("ok")
    # the reader is gone: the next build removes its version
    newest = ensure_index(spec, cache, force=True, progress=False).index
    assert not held.exists()
    assert sorted(p.name for p in slot.iterdir() if p.name.startswith("v-")) == sorted(
        {rebuilt.path.name, newest.path.name})


# --- touched sources are hashed once ---------------------------------------------------------

def test_touched_source_is_hashed_once(built) -> None:  # type: ignore[no-untyped-def]
    spec, cache, _index = built
    src = Path(spec.source.spec)
    os.utime(src, ns=(10**18, 10**18))
    code = _AUDIT_OPEN.replace(
        'if event == "open"',
        'if event == "open" and isinstance(args[0], str) and os.path.realpath(args[0]) == os.path.realpath(sys.argv[2]):'
        '\n        writes.append("read-source")\n    elif event == "open"') + f"""
from privtext.embeddings import EmbeddingSource
from privtext.index import IndexSpec, ensure_index
res = ensure_index(IndexSpec(EmbeddingSource({str(src)!r}, "glove"), None, 16), Path(root))
print(res.built, res.reason, writes.count("read-source"))
"""
    first = _run(code, str(cache), str(src))
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[0] == "False" and first.stdout.split()[-1] == "1"  # hashed once
    second = _run(code, str(cache), str(src))
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[0] == "False" and second.stdout.split()[-1] == "0"  # not again


# --- opening stays light ------------------------------------------------------------------

@pytest.mark.parametrize("source", ["file", "default"])
def test_opening_imports_neither_gensim_scipy_nor_faiss(built, glove_small, cache_root, source) -> None:  # type: ignore[no-untyped-def]
    spec, cache, _index = built
    if source == "default":  # the packaged GloVe (conftest builds it at 2000 words)
        opening = f"IndexSpec(EmbeddingSource(), {SMALL_DEFAULT_VOCAB}, 64), Path({str(cache_root)!r})"
    else:
        opening = f"IndexSpec(EmbeddingSource({spec.source.spec!r}, 'glove'), None, 16), Path({str(cache)!r})"
    result = _run(f"""
import sys
from pathlib import Path
import numpy as np
from privtext.embeddings import EmbeddingSource
from privtext.index import IndexSpec, ensure_index
res = ensure_index({opening})
assert not res.built
ix = res.index
ix.word_to_id, np.asarray(ix.neighbor_dist).sum(), ix.identity()
heavy = sorted(m for m in ("gensim", "scipy", "faiss") if m in sys.modules)
ix.faiss_index
print(heavy, "faiss" in sys.modules)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] True"
