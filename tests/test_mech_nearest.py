"""Nearest-word search (nearest.py): the certified exact search against a float64 brute force,
near-ties that float32 cannot decide, and the approximate HNSW option with its recall."""

from __future__ import annotations

import os

import numpy as np
import pytest

from privtext.errors import ParameterError
from privtext.mechanisms import amx_search, create
from privtext.mechanisms import nearest as nearest_mod
from privtext.mechanisms.laplace import laplace_noise
from privtext.mechanisms.nearest import measure_recall, nearest_words


def brute_force(vectors: np.ndarray, noisy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest by float64 distance, ties to the smaller id (the contract of nearest_words)."""
    ids = np.empty((len(noisy), k), dtype=np.int64)
    dist = np.empty((len(noisy), k))
    for i, z in enumerate(noisy):
        d = np.linalg.norm(vectors - z, axis=1)
        order = np.lexsort((np.arange(len(d)), d))[:k]
        ids[i], dist[i] = order, d[order]
    return ids, dist


@pytest.mark.parametrize("epsilon", [3.0, 10.0, 40.0])
@pytest.mark.parametrize("k", [1, 2])
def test_exact_search_is_the_float64_brute_force(glove_small, epsilon: float, k: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(int(epsilon) + k)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 600)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, epsilon)
    ids, dist = nearest_words(glove_small, noisy, anchors, k=k)
    want_ids, want_dist = brute_force(v, noisy, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-12)


def require_amx() -> None:
    """Skip where the CPU or the install has no AMX kernel, unless CI says it must be there
    (PRIVTEXT_REQUIRE_AMX=1, set by .ci/run on the machines that have it)."""
    if not amx_search.available():
        if os.environ.get("PRIVTEXT_REQUIRE_AMX") == "1":
            pytest.fail("the AMX kernel is not available (compiled at install? AMX-BF16 CPU?)")
        pytest.skip("no AMX-BF16 on this CPU, or the kernel was not compiled at install")


@pytest.fixture(params=["amx", "threshold"])
def exact_method(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Both implementations of the threshold search: the bf16 AMX kernel and numpy float32."""
    if request.param == "amx":
        require_amx()
    monkeypatch.setattr(nearest_mod, "EXACT_METHOD", request.param)
    return str(request.param)


@pytest.fixture
def small_tiles(monkeypatch):  # type: ignore[no-untyped-def]
    """Tiles far smaller than the defaults, so a 2,000-word index spans many word tiles and a
    few hundred points many query tiles (the tightening of U crosses tile boundaries); for the
    AMX kernel, passes of 32 words and calls of 70 queries (a partial group of 32)."""
    monkeypatch.setattr(nearest_mod, "_TILE_QUERIES", 37)
    monkeypatch.setattr(nearest_mod, "_TILE_WORDS", 128)
    monkeypatch.setattr(amx_search, "_CHUNK_BLOCKS", 2)
    monkeypatch.setattr(amx_search, "_BATCH", 70)


@pytest.fixture(params=["entry", "faiss"])
def hnsw_method(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Both graph searches: the kernel's (entry word among the first words, level-0 search) and
    FAISS's. With the kernel, entry words among the first 64 only: on the 2,000-word test index
    the default (8,192) would make every entry the exact answer, and the graph search idle."""
    if request.param == "entry":
        require_amx()
        monkeypatch.setattr(nearest_mod, "HNSW_ENTRY_WORDS", 64)
    monkeypatch.setattr(nearest_mod, "HNSW_METHOD", request.param)
    return str(request.param)


def test_auto_picks_the_kernel_where_it_runs() -> None:
    assert nearest_mod.EXACT_METHOD == "auto" and nearest_mod.HNSW_METHOD == "auto"
    assert nearest_mod.exact_method() == ("amx" if amx_search.available() else "threshold")
    assert nearest_mod.hnsw_method() == ("entry" if amx_search.available() else "faiss")


def test_the_kernel_can_be_switched_off(glove_small, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """PRIVTEXT_AMX=off (or a CPU without AMX, or no compiled kernel): the numpy path answers,
    with the same ids."""
    rng = np.random.default_rng(21)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 300)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, 10.0)
    default, _ = nearest_words(glove_small, noisy, anchors, k=2)
    monkeypatch.setenv(amx_search.DISABLE_ENV, "off")
    amx_search.reset()
    try:
        assert not amx_search.available()
        assert nearest_mod.exact_method() == "threshold"
        fallback, _ = nearest_words(glove_small, noisy, anchors, k=2)
    finally:
        monkeypatch.delenv(amx_search.DISABLE_ENV)
        amx_search.reset()
    np.testing.assert_array_equal(default, fallback)


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 5.0, 10.0, 30.0, 100.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_threshold_search_is_the_float64_brute_force(glove_small, small_tiles, exact_method: str,
                                                     epsilon: float, k: int) -> None:  # type: ignore[no-untyped-def]
    """Both threshold searches against a float64 scan, over ε from far-away points (most of
    the vocabulary within the first radius) to points next to their word, with Zipf anchors as
    in running text and uniform ones."""
    rng = np.random.default_rng(int(epsilon * 10) + k)
    v = np.asarray(glove_small.vectors, np.float64)
    ranks = 1.0 / np.arange(1, glove_small.n + 1)
    anchors = np.concatenate([rng.integers(0, glove_small.n, 300),
                              rng.choice(glove_small.n, size=300, p=ranks / ranks.sum())])
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, epsilon)
    ids, dist = nearest_words(glove_small, noisy, anchors, k=k)
    want_ids, want_dist = brute_force(v, noisy, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)  # the same float64 formula, bit for bit


@pytest.mark.parametrize("k", [1, 2])
def test_threshold_search_decides_exact_and_near_ties(glove_small, small_tiles, exact_method: str,
                                                      k: int) -> None:  # type: ignore[no-untyped-def]
    """Adversarial points: word vectors themselves (distance 0), points a float32 rounding step
    from halfway between two words (1e-9 and 1e-12 apart, below float32 resolution), points
    equidistant in float64 from two words by symmetry, all from unrelated anchors."""
    v = np.asarray(glove_small.vectors, np.float64)
    rng = np.random.default_rng(11)
    a = rng.integers(0, glove_small.n, 60)
    b = np.asarray(glove_small.neighbor_ids[a, 1 + rng.integers(0, 5, 60)], dtype=np.int64)
    axis = (v[b] - v[a]) / np.linalg.norm(v[b] - v[a], axis=1, keepdims=True)
    points = [v[a], (v[a] + v[b]) / 2]
    for step in (1e-9, 1e-12):
        points.append((v[a] + v[b]) / 2 + axis * rng.choice([-step, step], size=(len(a), 1)))
    # A point on the bisector but away from the segment: equidistant up to float64 rounding.
    normal = rng.normal(size=v[a].shape)
    normal -= axis * np.einsum("ij,ij->i", normal, axis)[:, None]
    points.append((v[a] + v[b]) / 2 + normal * 0.3)
    noisy = np.vstack(points)
    anchors = (np.tile(a, len(points)) + glove_small.n // 2) % glove_small.n
    ids, dist = nearest_words(glove_small, noisy, anchors, k=k)
    want_ids, want_dist = brute_force(v, noisy, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(dist, want_dist)


def test_points_with_too_many_candidates_go_to_the_faiss_certificate(glove_small, small_tiles,
                                                                    exact_method: str,
                                                                    monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Beyond CANDIDATE_CAP collected words a point leaves the threshold search for the FAISS
    certificate (and its float64 scan): the answer is still the brute force's."""
    calls = {"points": 0}
    real = nearest_mod._certified_search

    def counting(index, noisy, k):  # type: ignore[no-untyped-def]
        calls["points"] += len(noisy)
        return real(index, noisy, k)

    monkeypatch.setattr(nearest_mod, "_certified_search", counting)
    monkeypatch.setattr(nearest_mod, "CANDIDATE_CAP", 4)
    # Far noise with k = 2 would go to FAISS's certificate whole; this test is about the cap.
    monkeypatch.setattr(nearest_mod, "_threshold_is_slower", lambda *_: False)
    rng = np.random.default_rng(12)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 400)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, 1.0)
    ids, dist = nearest_words(glove_small, noisy, anchors, k=2)
    want_ids, want_dist = brute_force(v, noisy, 2)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-12)
    assert 0 < calls["points"] < len(anchors)  # some points, not all, took the fallback


@pytest.mark.parametrize("epsilon", [3.0, 10.0])
def test_both_exact_methods_agree(glove_small, monkeypatch, epsilon: float) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(13)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 500)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, epsilon)
    new = nearest_words(glove_small, noisy, anchors, k=2)
    monkeypatch.setattr(nearest_mod, "EXACT_METHOD", "faiss")
    old = nearest_words(glove_small, noisy, anchors, k=2)
    np.testing.assert_array_equal(new[0], old[0])


def test_near_ties_beyond_float32_precision_are_decided_in_float64(glove_small, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The FAISS certificate (the fallback): points almost exactly halfway between two words
    (1e-9 apart in distance), searched from unrelated anchors so the table cannot prune: float32
    cannot order the two words, so the first certificate fails and the wider pass decides in
    float64."""
    monkeypatch.setattr(nearest_mod, "EXACT_METHOD", "faiss")
    widths: list[int] = []
    real_search = nearest_mod._faiss_search

    def counting_search(index, queries, k):  # type: ignore[no-untyped-def]
        widths.append(k)
        return real_search(index, queries, k)

    monkeypatch.setattr(nearest_mod, "_faiss_search", counting_search)
    v = np.asarray(glove_small.vectors, np.float64)
    rng = np.random.default_rng(1)
    a = rng.integers(0, glove_small.n, 40)
    b = np.asarray(glove_small.neighbor_ids[a, 1], dtype=np.int64)
    axis = (v[b] - v[a]) / np.linalg.norm(v[b] - v[a], axis=1, keepdims=True)
    mid = (v[a] + v[b]) / 2 + axis * rng.choice([-1e-9, 1e-9], size=(len(a), 1))
    ids, _ = nearest_words(glove_small, mid, (a + glove_small.n // 2) % glove_small.n, k=1)
    want, _ = brute_force(v, mid, 1)
    np.testing.assert_array_equal(ids, want)
    assert nearest_mod.WIDE in widths  # the wider certified pass really was needed


def _sphere_of_ties(index_factory):  # type: ignore[no-untyped-def]
    """200 words on a sphere of radius 3 around the origin (and 100 far away), with points within
    1e-9 of its centre: every sphere word is a near-tie. (index, float64 vectors, points)"""
    rng = np.random.default_rng(2)
    sphere = rng.normal(size=(200, 8))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    idx = index_factory(np.vstack([sphere * 3.0, rng.normal(size=(100, 8)) * 0.2 + 9.0]), neighbors=4)
    centre = np.zeros((3, 8)) + rng.normal(size=(3, 8)) * 1e-9
    return idx, np.asarray(idx.vectors, np.float64), centre


def test_many_near_ties_fall_back_to_the_float64_scan(index_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The FAISS certificate (the fallback): a query equidistant (up to 1e-9) from more words than
    the wider pass returns: only the float64 scan can certify the answer."""
    monkeypatch.setattr(nearest_mod, "EXACT_METHOD", "faiss")
    calls = {"scan": 0}
    real_scan = nearest_mod._scan

    def counting_scan(*args):  # type: ignore[no-untyped-def]
        calls["scan"] += 1
        return real_scan(*args)

    monkeypatch.setattr(nearest_mod, "_scan", counting_scan)
    idx, v, centre = _sphere_of_ties(index_factory)
    ids, _ = nearest_words(idx, centre, np.array([250, 260, 270]), k=2)
    want, _ = brute_force(v, centre, 2)
    np.testing.assert_array_equal(ids, want)
    assert calls["scan"] > 0


def test_many_near_ties_in_the_threshold_search(index_factory, small_tiles,
                                                exact_method: str) -> None:  # type: ignore[no-untyped-def]
    """The same sphere of 200 words around a point, searched by the default method: all of them
    fall inside the collection radius, and float64 decides among them."""
    idx, v, centre = _sphere_of_ties(index_factory)
    for k in (1, 2, 4):  # up to the table width
        ids, _ = nearest_words(idx, centre, np.array([250, 260, 270]), k=k)
        want, _ = brute_force(v, centre, k)
        np.testing.assert_array_equal(ids, want)


def test_answer_does_not_depend_on_the_anchor(glove_small) -> None:  # type: ignore[no-untyped-def]
    """The anchor only prunes: any anchor gives the same exact answer."""
    rng = np.random.default_rng(2)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 300)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, 20.0)
    own, _ = nearest_words(glove_small, noisy, anchors, k=2)
    other, _ = nearest_words(glove_small, noisy, anchors[::-1].copy(), k=2)
    np.testing.assert_array_equal(own, other)


def test_hnsw_returns_near_exact_answers_and_recall_measures_them(glove_small, hnsw_method: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 500)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, 10.0)
    approx, dist = nearest_words(glove_small, noisy, anchors, k=2, search="hnsw", ef=64)
    exact, exact_dist = nearest_words(glove_small, noisy, anchors, k=2)
    assert (approx[:, 0] == exact[:, 0]).mean() > 0.9
    assert (dist[:, 0] >= exact_dist[:, 0] - 1e-12).all()  # never closer than the true nearest
    assert (dist[:, 0] <= dist[:, 1]).all()

    def noise(r: np.random.Generator, count: int) -> np.ndarray:
        return laplace_noise(r, count, glove_small.dim, 10.0)

    wide = measure_recall(glove_small, noise, ef=2000, sample=400)
    narrow = measure_recall(glove_small, noise, ef=1, sample=400)
    assert wide["recall_at_1_uniform"] > 0.98 and wide["recall_at_1_zipf"] > 0.98
    assert narrow["recall_at_1_uniform"] < wide["recall_at_1_uniform"]  # the measure can tell
    lo, hi = narrow["interval_95_uniform"]
    assert lo <= narrow["recall_at_1_uniform"] <= hi


def test_hnsw_answer_does_not_depend_on_the_order_of_points(glove_small, hnsw_method: str) -> None:  # type: ignore[no-untyped-def]
    """nearest_words sorts points (by anchor, or by entry word) before the graph search: each
    point's answer must be the one it gets searched alone."""
    rng = np.random.default_rng(14)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 300)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, 10.0)
    together, dist = nearest_words(glove_small, noisy, anchors, k=2, search="hnsw", ef=8)
    for i in range(0, 300, 29):
        alone, alone_dist = nearest_words(glove_small, noisy[i : i + 1], anchors[i : i + 1], k=2,
                                          search="hnsw", ef=8)
        np.testing.assert_array_equal(together[i], alone[0])
        np.testing.assert_array_equal(dist[i], alone_dist[0])


def test_hnsw_answer_does_not_depend_on_the_anchor(glove_small, hnsw_method: str) -> None:  # type: ignore[no-untyped-def]
    """The approximate answer is a function of the noisy point alone (post-processing): the
    input word may order the points, never enter the search."""
    rng = np.random.default_rng(15)
    v = np.asarray(glove_small.vectors, np.float64)
    anchors = rng.integers(0, glove_small.n, 400)
    noisy = v[anchors] + laplace_noise(rng, len(anchors), glove_small.dim, 10.0)
    own, own_dist = nearest_words(glove_small, noisy, anchors, k=2, search="hnsw", ef=4)
    other, other_dist = nearest_words(glove_small, noisy, rng.permutation(anchors), k=2,
                                      search="hnsw", ef=4)
    np.testing.assert_array_equal(own, other)
    np.testing.assert_array_equal(own_dist, other_dist)


def test_the_level0_table_is_the_graph_bottom_layer(glove_small) -> None:  # type: ignore[no-untyped-def]
    """The kernel's graph search walks the FAISS graph's own level-0 lists, cached once."""
    import faiss

    table = nearest_mod.hnsw_level0(glove_small)
    graph = nearest_mod.hnsw_index(glove_small).hnsw
    assert table.shape == (glove_small.n, graph.nb_neighbors(0))
    begin, end = np.zeros(1, np.uint64), np.zeros(1, np.uint64)
    for node in (0, 7, glove_small.n - 1):
        graph.neighbor_range(node, 0, faiss.swig_ptr(begin), faiss.swig_ptr(end))
        want = faiss.vector_to_array(graph.neighbors)[int(begin[0]) : int(end[0])]
        np.testing.assert_array_equal(table[node], want)
    assert len(list((glove_small.path / "derived").glob("hnsw-level0-*.npy"))) == 1


def test_hnsw_graph_is_built_once_and_cached(glove_small) -> None:  # type: ignore[no-untyped-def]
    nearest_mod.hnsw_index(glove_small)
    files = list((glove_small.path / "derived").glob("hnsw-graph-*.npy"))
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns
    nearest_mod._HNSW.clear()  # a new process: loads the cached graph, does not rebuild it
    nearest_mod.hnsw_index(glove_small)
    assert files[0].stat().st_mtime_ns == before


@pytest.mark.parametrize("name", ["laplace", "mahalanobis", "vickrey"])
def test_mechanisms_take_the_search_parameter(glove_small, hnsw_method: str, name: str) -> None:  # type: ignore[no-untyped-def]
    exact = create(name, glove_small, 10.0, {})
    approx = create(name, glove_small, 10.0, {"search": "hnsw", "hnsw_ef": "32"})
    assert "exact" in " ".join(exact.guarantee.conditions)
    assert "HNSW" in " ".join(approx.guarantee.conditions)
    assert exact.guarantee.rate == approx.guarantee.rate  # post-processing: same guarantee
    approx.prepare()
    info = approx.derived()
    assert info["search"].startswith("hnsw") and info["hnsw_recall"]["efSearch"] == 32
    assert 0.0 <= info["hnsw_recall"]["recall_at_1_zipf"] <= 1.0
    ids = np.random.default_rng(4).integers(0, glove_small.n, 2000)
    a = exact.perturb_ids(ids, np.random.default_rng(5))
    b = approx.perturb_ids(ids, np.random.default_rng(5))  # same noise, approximate search
    assert (a == b).mean() > 0.8


@pytest.mark.parametrize(("params", "message"), [
    ({"search": "annoy"}, "choose one of exact, hnsw"),
    ({"hnsw_ef": "8"}, "hnsw_ef applies only with --param search=hnsw"),
    ({"search": "hnsw", "hnsw_ef": "0"}, "out of range"),
])
def test_bad_search_parameters_are_refused(glove_small, params, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParameterError, match=message):
        create("laplace", glove_small, 10.0, params)


def test_the_faster_exact_method_is_picked_by_noise_radius(glove_small) -> None:  # type: ignore[no-untyped-def]
    """Both exact methods give the same answer; with two nearest words and noise far beyond the
    table, the FAISS certificate is the faster one (bench/search.py), and it is picked."""
    far = np.full(50, 10.0 * glove_small.geometry.kth_neighbor_distance_median)
    near = np.full(50, 0.5 * glove_small.geometry.kth_neighbor_distance_median)
    assert nearest_mod._threshold_is_slower(glove_small, far, 2)
    assert not nearest_mod._threshold_is_slower(glove_small, near, 2)
    assert not nearest_mod._threshold_is_slower(glove_small, far, 1)
    rng = np.random.default_rng(4)
    anchors = rng.integers(0, glove_small.n, 40)
    v = np.asarray(glove_small.vectors, np.float64)
    for scale in (0.3, 6.0):  # both regimes, through the public entry point
        noisy = v[anchors] + rng.normal(size=(40, v.shape[1])) * scale
        ids, _ = nearest_words(glove_small, noisy, anchors, k=2)
        want, _ = brute_force(v, noisy, 2)
        np.testing.assert_array_equal(ids, want)


def test_hnsw_recall_is_measured_once_per_mechanism_and_epsilon(index_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from privtext.mechanisms import create
    from privtext.mechanisms import nearest as nearest_module

    rng = np.random.default_rng(5)
    index = index_factory(rng.normal(size=(300, 8)))
    calls: list[float] = []
    real = nearest_module.measure_recall

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(nearest_module, "measure_recall", counting)
    first = create("laplace", index, 10.0, {"search": "hnsw"})
    first.prepare()
    again = create("laplace", index, 10.0, {"search": "hnsw"})
    again.prepare()
    assert len(calls) == 1  # the second object read the derived file
    assert again.search_info() == first.search_info()
    other = create("laplace", index, 3.0, {"search": "hnsw"})
    other.prepare()
    assert len(calls) == 2  # another ε is another noise: measured anew
    create("vickrey", index, 10.0, {"search": "hnsw"}).prepare()
    assert len(calls) == 3  # another mechanism: measured anew
